"""Tokenizers behind one protocol, and the SentencePiece trainer for a corpus's own tokenizer.

A run owns its tokenizer: the files named by `Tokenizer.files` are copied into the run directory (and into
every token cache made with them), `load_tokenizer(dir)` reads them back, and `fingerprint(files)` is the
hash that says whether two token streams were made by the same tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

from tqdm.auto import tqdm

from gptjax.config import write_atomic
from gptjax.errors import DataError

EOT, PAD = "<|endoftext|>", "<|pad|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer gptjax reads offers. End-of-text separates documents and stops samples; it is
    never the padding a loss sees (masks do that), although GPT-2's files use it as pad too."""

    vocab_size: int
    eot_id: int
    pad_id: int
    files: list[Path]  # the files that make it up, copied into run directories and token caches

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def token_id(self, token: str) -> int | None:
        """The id of a whole token (e.g. a special token), or None if the vocabulary has no such token."""


def fingerprint(files: Sequence[Path]) -> str:
    """sha256 naming a tokenizer by its files' contents. One file: the hash of its bytes (what token caches
    have always recorded for tokenizer.model); several: the hash of their names and bytes in order."""
    files = list(files)
    if len(files) == 1:
        return hashlib.sha256(Path(files[0]).read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()

class SentencePieceTokenizer:
    """A SentencePiece BPE model with byte fallback, end-of-text, pad and reserved task tokens: what
    data preparation trains for a corpus (`tokenizer.model`)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"tokenizer file {self.path} is missing; re-run data preparation (python train.py)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.piece_to_id(EOT)
        self.pad_id = self.sp.piece_to_id(PAD)
        self.files = [self.path]

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        # control tokens (end-of-text, pad, task tokens) decode to nothing
        return self.sp.decode([int(i) for i in ids])


class BPETokenizer:
    """GPT-2's byte-level BPE, read from local files with the `tokenizers` library: a `tokenizer.json`, or
    GPT-2's original `vocab.json` + `merges.txt`. The same interface as `SentencePieceTokenizer`; pad is end-of-text,
    as GPT-2 has no pad token."""

    def __init__(self, path: str | Path):
        try:
            import tokenizers
        except ImportError:
            raise DataError('reading a GPT-2 tokenizer needs the tokenizers package: pip install -e ".[hf]"') from None
        self.path = Path(path)
        try:
            if self.path.is_dir():  # vocab.json + merges.txt, as GPT-2 shipped them
                self.tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
                    str(self.path / "vocab.json"), str(self.path / "merges.txt")))
                self.tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                self.tok.decoder = tokenizers.decoders.ByteLevel()
                if self.tok.token_to_id(EOT) is not None:
                    self.tok.add_special_tokens([EOT])  # matched whole in text, never split into pieces
            else:
                self.tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises plain Exceptions for unreadable files
            raise DataError(f"cannot read the BPE tokenizer in {self.path}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eot = self.tok.token_to_id(EOT)
        if eot is None:
            raise DataError(f"the tokenizer in {self.path} has no {EOT} token; gptjax separates documents and stops "
                            f"samples with it, so use GPT-2's tokenizer files (or add {EOT} as a special token)")
        self.eot_id = self.pad_id = eot
        self.files = [self.path] if not self.path.is_dir() else [self.path / "vocab.json", self.path / "merges.txt"]

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # like SentencePieceTokenizer: end-of-text and other special tokens decode to nothing
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


# GPT-2's pre-tokenizer pattern (tiktoken's r50k_base / gpt2)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TiktokenTokenizer:
    """GPT-2's BPE from a local tiktoken rank file (`*.tiktoken`, e.g. r50k_base.tiktoken: one
    `base64(token bytes) rank` per line) with GPT-2's pre-tokenizer pattern; end-of-text takes the next id
    after the ranks, as in GPT-2 (50256)."""

    def __init__(self, path: str | Path):
        try:
            import base64

            import tiktoken
        except ImportError:
            raise DataError('reading a .tiktoken file needs the tiktoken package: pip install tiktoken') from None
        self.path = Path(path)
        try:
            ranks = {}
            for line in self.path.read_text().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the tiktoken file {self.path}: {e}") from None
        self.eot_id = self.pad_id = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(self.path.stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={EOT: self.eot_id})
        self.vocab_size = self.eot_id + 1
        self.files = [self.path]

    def token_id(self, token: str) -> int | None:
        if token == EOT:
            return self.eot_id
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_batch(texts, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) != self.eot_id], errors="replace")


def load_tokenizer(run_dir: str | Path):
    """The tokenizer of a run directory, by the files it holds, first match wins:
    tokenizer.model (SentencePiece, what train.py writes); tokenizer.json or vocab.json + merges.txt
    (GPT-2 byte-level BPE, via `tokenizers`); a single *.tiktoken file (GPT-2 BPE ranks, via `tiktoken`)."""
    d = Path(run_dir)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d / "tokenizer.model")
    if (d / "tokenizer.json").is_file():
        return BPETokenizer(d / "tokenizer.json")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return BPETokenizer(d)
    tk = sorted(d.glob("*.tiktoken"))
    if len(tk) == 1:
        return TiktokenTokenizer(tk[0])
    if len(tk) > 1:
        raise DataError(f"{d} holds several .tiktoken files ({', '.join(p.name for p in tk)}); keep one")
    raise DataError(f"{d} holds no tokenizer (tokenizer.model, tokenizer.json, vocab.json + merges.txt, or a "
                    f".tiktoken file). For a run imported from Hugging Face, copy the model's tokenizer.json (or "
                    f"vocab.json and merges.txt) into {d}, or convert again with "
                    f"python convert.py from-hf HF_DIR RUN_DIR --tokenizer DIR; for a train.py run, re-run "
                    f"python train.py run_dir={d} to write tokenizer.model")


SUPPLIED_KINDS = ("a Hugging Face tokenizer.json (e.g. GPT-2's), a tiktoken rank file *.tiktoken (e.g. "
                  "r50k_base.tiktoken), a SentencePiece tokenizer.model, or a directory holding one of them "
                  "(or GPT-2's vocab.json + merges.txt)")


def open_tokenizer(path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer a user supplies to pretrain with (`key`, data.tokenizer): a file by its name (tokenizer.json:
    `BPETokenizer`; *.tiktoken: `TiktokenTokenizer`; tokenizer.model: `SentencePieceTokenizer`), or a directory
    (`load_tokenizer`). Its files keep their names when copied into token caches and run directories, which
    `load_tokenizer` reads back by name, so a file of another name is refused. Every failure is one DataError
    naming `key`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key}={path} does not exist; give {SUPPLIED_KINDS}")
    if p.is_dir():
        kinds = [p / "tokenizer.model", p / "tokenizer.json"]
        if not (any(f.is_file() for f in kinds) or (p / "vocab.json").is_file() and (p / "merges.txt").is_file()
                or any(p.glob("*.tiktoken"))):
            raise DataError(f"{key}={path} is a directory without a tokenizer in it; give {SUPPLIED_KINDS}")
        opener = load_tokenizer
    elif p.name == "tokenizer.json":
        opener = BPETokenizer
    elif p.suffix == ".tiktoken":
        opener = TiktokenTokenizer
    elif p.name == "tokenizer.model":
        opener = SentencePieceTokenizer
    else:
        hint = {".json": "tokenizer.json", ".model": "tokenizer.model"}.get(p.suffix)
        raise DataError(f"{key}={path} is not a tokenizer file gptjax knows by its name"
                        + (f" (rename it to {hint}: its copies in caches and run directories are read back by "
                           f"that name)" if hint else "") + f"; give {SUPPLIED_KINDS}")
    try:
        tok = opener(p)
    except DataError as e:
        raise DataError(f"{key}={path}: {e}") from None
    except (RuntimeError, OSError, ValueError) as e:  # e.g. sentencepiece, for a file that is not a model
        raise DataError(f"{key}={path}: cannot read it as a tokenizer ({e})") from None
    if tok.token_id(EOT) != tok.eot_id:  # a SentencePiece model not made by gptjax
        raise DataError(f"{key}={path} has no {EOT} token; gptjax separates documents and stops samples with it "
                        f"(GPT-2's files have it; a SentencePiece model needs it as a control symbol)")
    return tok


def _chunks(texts: list[str], max_bytes: int = 8000) -> Iterator[str]:
    """Split documents into runs of whole lines: SentencePiece trains on 'sentences', and keeping
    the newlines inside them lets pieces like '):\\n' and indentation runs form."""
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > max_bytes:
                yield "".join(buf)
                buf, size = [], 0
            if n > max_bytes:  # a giant line: let SentencePiece see a prefix of it only
                line = line[: max_bytes // 4]
                n = len(line.encode("utf-8"))
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def _with_progress(chunks: Iterator[str], total_bytes: int) -> Iterator[str]:
    """SentencePiece pulls every sentence before it learns merges (which takes seconds), so the bar
    tracks the bytes it has read, then names the merge phase."""
    bar = tqdm(total=total_bytes, desc="tokenizer: reading", unit="B", unit_scale=True, leave=False)
    for c in chunks:
        bar.update(len(c))
        yield c
    bar.set_description("tokenizer: learning merges")
    bar.refresh()
    bar.close()


def train_tokenizer(texts: list[str], vocab_size: int, out_path: Path, num_task_tokens: int,
                    sample_bytes: int) -> None:
    import sentencepiece as spm

    # A deterministic, spread-out sample: documents in hash order until the byte budget is used.
    order = sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i][:4096].encode()).digest())
    sample, used = [], 0
    for i in order:
        if used >= sample_bytes:
            break
        sample.append(texts[i])
        used += len(texts[i])
    model = io.BytesIO()
    specials = 3 + num_task_tokens + 256  # unk, eot, pad, task tokens, byte pieces
    if vocab_size < specials + 64:
        raise DataError(f"model.vocab_size={vocab_size} is too small; use at least {specials + 64}")
    raised: list[BaseException] = []

    def sentences():  # SentencePiece turns an exception in its iterator (SIGTERM, Ctrl-C) into a RuntimeError
        try:
            yield from _with_progress(_chunks(sample), used)
        except BaseException as e:
            raised.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9999,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
            unk_id=0, eos_id=1, eos_piece=EOT, pad_id=2, pad_piece=PAD, bos_id=-1,
            control_symbols=[f"<|task{i}|>" for i in range(num_task_tokens)],
            num_threads=os.cpu_count() or 1, input_sentence_size=0, minloglevel=2)
    except RuntimeError as e:
        if raised:
            raise raised[0] from None
        msg = str(e)
        if "Vocabulary size" in msg:
            raise DataError(f"the corpus is too small for model.vocab_size={vocab_size} ({msg.strip()}); "
                            f"lower model.vocab_size or add text") from None
        raise
    out_path.write_bytes(model.getvalue())



TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt")


def install(tok: Tokenizer, run_dir: Path) -> None:
    """Copy `tok`'s files into a run directory, first removing any other tokenizer's files there (load_tokenizer
    takes the first kind it finds, so a leftover of another kind would shadow this one)."""
    run_dir = Path(run_dir)
    names = {Path(f).name for f in tok.files}
    for old in [run_dir / n for n in TOKENIZER_FILES] + sorted(run_dir.glob("*.tiktoken")):
        if old.is_file() and old.name not in names:
            old.unlink()
    for f in tok.files:
        if Path(f).absolute() != (run_dir / Path(f).name).absolute():
            write_atomic(run_dir / Path(f).name, Path(f).read_bytes())  # a kill never leaves half a tokenizer
