"""Data: corpus sources and the held-out split (sources.py), tokenizers behind one protocol
(tokenizers.py), token caches and (seed, step) batches (cache.py), already-tokenized .bin corpora (binsource.py),
weighted mixtures of sources (mixture.py). The names below are the package's API."""

from gptjax.data.cache import (FORMAT_VERSION, PreparationInterrupted, TokenData, data_dir_for, default_cache_dir, gzip_bits_per_byte,
                               prepare, windows)
from gptjax.data.mixture import Mixture, prepare_mixture
from gptjax.data.sources import (STDLIB_SKIP, is_validation, iter_documents, iter_jsonl, split, split_documents,
                                 stdlib_files, stdlib_root)
from gptjax.data.tokenizers import (EOT, PAD, BPETokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer,
                                    fingerprint, install, load_tokenizer, train_tokenizer)
from gptjax.errors import DataError

__all__ = ["FORMAT_VERSION", "PreparationInterrupted", "TokenData", "data_dir_for", "default_cache_dir", "gzip_bits_per_byte", "prepare",
           "windows", "Mixture", "prepare_mixture", "STDLIB_SKIP", "is_validation", "iter_documents", "iter_jsonl", "split", "split_documents",
           "stdlib_files", "stdlib_root", "EOT", "PAD", "BPETokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
           "Tokenizer", "fingerprint", "install", "load_tokenizer", "train_tokenizer", "DataError"]
