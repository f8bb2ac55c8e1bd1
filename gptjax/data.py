"""Corpus sources, the SentencePiece tokenizer, cached token shards, and a deterministic batch loader.

`prepare(data_cfg, vocab_size)` reads documents, holds out a validation split chosen by a hash of each
document, trains a byte-fallback BPE tokenizer on the training split, and writes memory-mapped token
shards plus a manifest (source, tokenizer, counts, hashes) into a cache directory. A second call with the
same source reuses it; a changed source is detected by its content hash and rebuilt.

`TokenData.batch(seed, step, ...)` is a pure function of (seed, step): no sampler state, so a resumed run
replays exactly the batches of an uninterrupted one, and each process takes its own rows of the batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from gptjax.config import DataConfig

FORMAT_VERSION = 1
EOT, PAD = "<|endoftext|>", "<|pad|>"
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """The corpus or cache cannot be used; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------
# Sources: each yields (name, text) documents in a fixed order.


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library source, without its test suites."""
    root = stdlib_root()
    return [p for p in sorted(root.rglob("*.py")) if not (STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))]


def _expand(paths: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"data.paths entry '{pattern}' matches no file; check the path or quote the glob")
        files += [Path(m) for m in matches]
    return files


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if cfg.source == "stdlib":
        root = stdlib_root()
        for p in stdlib_files():
            yield str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")
    elif cfg.source == "text":
        for p in _expand(cfg.paths):
            yield str(p), p.read_text(encoding="utf-8", errors="replace")
    elif cfg.source == "jsonl":
        for p in _expand(cfg.paths):
            for i, rec in iter_jsonl(p):
                if not isinstance(rec, dict) or not isinstance(rec.get(cfg.text_field), str):
                    raise DataError(f"{p}:{i} has no string field '{cfg.text_field}'; "
                                    f"set data.text_field to the field that holds the text")
                yield f"{p}:{i}", rec[cfg.text_field]
    else:
        raise DataError(f"unknown data.source '{cfg.source}'")


def iter_jsonl(path: Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSONL file; a bad line raises `error` naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove that line") from None


def is_validation(text: str, fraction: float) -> bool:
    """Held-out membership from a hash of the document's content: stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


# ----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A SentencePiece BPE model with byte fallback, end-of-text, pad and reserved task tokens."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"tokenizer file {self.path} is missing; re-run data preparation (python train.py)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.piece_to_id(EOT)
        self.pad_id = self.sp.piece_to_id(PAD)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        # control tokens (end-of-text, pad, task tokens) decode to nothing
        return self.sp.decode([int(i) for i in ids])


class BPETokenizer:
    """GPT-2's byte-level BPE, read from local files with the `tokenizers` library: a `tokenizer.json`, or
    GPT-2's original `vocab.json` + `merges.txt`. The same interface as `Tokenizer`; pad is end-of-text,
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

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # like Tokenizer: end-of-text and other special tokens decode to nothing
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
        return Tokenizer(d / "tokenizer.model")
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
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_with_progress(_chunks(sample), used), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9999,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
            unk_id=0, eos_id=1, eos_piece=EOT, pad_id=2, pad_piece=PAD, bos_id=-1,
            control_symbols=[f"<|task{i}|>" for i in range(num_task_tokens)],
            num_threads=os.cpu_count() or 1, input_sentence_size=0, minloglevel=2)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg:
            raise DataError(f"the corpus is too small for model.vocab_size={vocab_size} ({msg.strip()}); "
                            f"lower model.vocab_size or add text") from None
        raise
    out_path.write_bytes(model.getvalue())


# ----------------------------------------------------------------------------------------------
# Preparation and cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTJAX_CACHE", Path.home() / ".cache" / "gptjax"))


def _spec(cfg: DataConfig, vocab_size: int) -> dict:
    d = asdict(cfg)
    d.pop("cache_dir")
    d["paths"] = [os.path.abspath(os.path.expanduser(p)) for p in cfg.paths]
    d["vocab_size"] = vocab_size
    d["format_version"] = FORMAT_VERSION
    if cfg.source == "stdlib":
        d["stdlib"] = str(stdlib_root())
    return d


def data_dir_for(cfg: DataConfig, vocab_size: int) -> Path:
    spec = json.dumps(_spec(cfg, vocab_size), sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return root / "data" / f"{cfg.source}-v{vocab_size}-{key}"


def _write_tokens(docs: list[str], tok: Tokenizer, out_dir: Path, split: str, shard_tokens: int,
                  dtype) -> list[dict]:
    shards, buf, buf_len = [], [], 0

    def flush():
        nonlocal buf, buf_len
        if not buf_len:
            return
        arr = np.concatenate(buf).astype(dtype)
        name = f"{split}_{len(shards):04d}.bin"
        arr.tofile(out_dir / name)
        shards.append({"file": name, "tokens": int(arr.size)})
        buf, buf_len = [], 0

    total = sum(len(d) for d in docs)
    with tqdm(total=total, desc=f"tokenizing {split}", unit="B", unit_scale=True, leave=False) as bar:
        for start in range(0, len(docs), 64):
            batch = docs[start:start + 64]
            for ids in tok.encode_batch(batch):
                ids.append(tok.eot_id)  # documents are separated by end-of-text
                arr = np.asarray(ids, dtype=np.int64)
                buf.append(arr)
                buf_len += arr.size
                if buf_len >= shard_tokens:
                    flush()
            bar.update(sum(len(d) for d in batch))
    flush()
    return shards


@contextlib.contextmanager
def _cache_lock(root: Path):
    """Processes preparing into one cache directory (several per host) take turns: the first builds, the
    others then reuse. An exclusive lock on the directory itself, so no lock file is left behind; where the
    file system cannot lock a directory, go on without (process 0 prepares first in any case)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare(cfg: DataConfig, vocab_size: int, *, log=print) -> Path:
    """Make (or reuse) the token cache for this source and vocabulary; returns its directory."""
    out = data_dir_for(cfg, vocab_size)
    with _cache_lock(out.parent):
        return _prepare(cfg, vocab_size, out, log)


def _prepare(cfg: DataConfig, vocab_size: int, out: Path, log) -> Path:
    docs = list(iter_documents(cfg))
    if not docs:
        raise DataError("the corpus holds no documents; check data.source and data.paths")
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace") + b"\0")
    source_hash = h.hexdigest()

    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = None
        if manifest and manifest.get("source_hash") == source_hash:
            missing = [s["file"] for sp in ("train", "val") for s in manifest["shards"][sp] if not (out / s["file"]).exists()]
            if not missing and (out / "tokenizer.model").exists():
                log(f"data: reusing cached tokens in {out}")
                return out
            log(f"data: cache in {out} is incomplete ({len(missing)} shard(s) missing); rebuilding")
        elif manifest:
            log(f"data: the source changed since {out} was built (hash {manifest.get('source_hash', '?')[:12]} -> "
                f"{source_hash[:12]}); rebuilding")

    t0 = time.time()
    train_docs = [t for _, t in docs if not is_validation(t, cfg.val_fraction)]
    val_docs = [t for _, t in docs if is_validation(t, cfg.val_fraction)]
    if not val_docs:  # tiny corpora: hold out the last document rather than none
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]
    if not train_docs:
        raise DataError("the corpus needs at least two documents (one is held out for validation)")

    # Build in a temporary directory beside the target and swap it in, so a kill never leaves a
    # half-written cache that looks complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        train_tokenizer(train_docs, vocab_size, tmp / "tokenizer.model", cfg.num_task_tokens, cfg.tokenizer_sample_bytes)
        tok = Tokenizer(tmp / "tokenizer.model")
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        shards = {split: _write_tokens(d, tok, tmp, split, cfg.shard_tokens, dtype)
                  for split, d in (("train", train_docs), ("val", val_docs))}
        val_text = "\n".join(val_docs).encode("utf-8")
        (tmp / "val.txt").write_bytes(val_text)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": _spec(cfg, vocab_size),
            "source_hash": source_hash,
            "tokenizer": {"file": "tokenizer.model", "vocab_size": tok.vocab_size,
                          "sha256": hashlib.sha256((tmp / "tokenizer.model").read_bytes()).hexdigest(),
                          "eot_id": tok.eot_id, "pad_id": tok.pad_id},
            "dtype": np.dtype(dtype).name,
            "docs": {"train": len(train_docs), "val": len(val_docs)},
            "bytes": {"train": sum(len(d.encode("utf-8")) for d in train_docs), "val": len(val_text)},
            "tokens": {sp: sum(s["tokens"] for s in shards[sp]) for sp in shards},
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"data: {manifest['docs']['train']} train / {manifest['docs']['val']} val documents, "
        f"{manifest['tokens']['train']:,} / {manifest['tokens']['val']:,} tokens, prepared in {time.time() - t0:.1f}s "
        f"-> {out}")
    return out


# ----------------------------------------------------------------------------------------------
# Loading


class TokenData:
    """Memory-mapped token shards of one prepared cache directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise DataError(f"{self.path} holds no prepared data (manifest.json missing); run python train.py to prepare it")
        self.manifest = json.loads(mf.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = {sp: [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in self.manifest["shards"][sp]]
                       for sp in ("train", "val")}
        self.tokenizer = Tokenizer(self.path / "tokenizer.model")

    def tokens(self, split: str) -> int:
        return int(self.manifest["tokens"][split])

    def bytes_per_token(self, split: str = "val") -> float:
        return self.manifest["bytes"][split] / self.manifest["tokens"][split]

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, *, split: str = "train",
              process_index: int = 0, process_count: int = 1, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows [process_index * B/P, (process_index + 1) * B/P) of the global batch of `step` (or the rows
        numbered `rows`): int32 [B/P, seq_len + 1] windows at offsets drawn from (seed, step) alone."""
        shards = self.shards[split]
        starts = np.array([max(len(s) - seq_len - 1, 0) + 1 if len(s) > seq_len else 0 for s in shards])
        if starts.sum() == 0:
            raise DataError(f"the {split} split has fewer than {seq_len + 1} tokens in every shard; "
                            f"lower model.block_size or add data")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by {process_count} processes")
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        flat = rng.integers(0, starts.sum(), size=batch_size)
        per = batch_size // process_count
        flat = flat[process_index * per:(process_index + 1) * per] if rows is None else flat[rows]
        bounds = np.cumsum(starts)
        which = np.searchsorted(bounds, flat, side="right")
        offsets = flat - (bounds[which] - starts[which])
        return np.stack([np.asarray(shards[w][o:o + seq_len + 1], dtype=np.int32) for w, o in zip(which, offsets)])

    def eval_windows(self, tokens: np.ndarray | None = None, *, split: str = "val", seq_len: int,
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every token of a split (or of `tokens`) predicted exactly once: windows of seq_len + 1 with
        stride seq_len. Yields (int32 [B, T+1], float32 weights [B, T]); the last batch is zero-padded."""
        streams = [np.asarray(tokens)] if tokens is not None else self.shards[split]
        yield from windows(streams, seq_len, batch_size)


def windows(streams: list[np.ndarray], seq_len: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rows, weights = [], []
    for s in streams:
        for start in range(0, max(len(s) - 1, 0), seq_len):
            chunk = np.asarray(s[start:start + seq_len + 1], dtype=np.int32)
            n = len(chunk) - 1
            if n <= 0:
                continue
            row = np.zeros(seq_len + 1, np.int32)
            row[:len(chunk)] = chunk
            w = np.zeros(seq_len, np.float32)
            w[:n] = 1.0
            rows.append(row)
            weights.append(w)
            if len(rows) == batch_size:
                yield np.stack(rows), np.stack(weights)
                rows, weights = [], []
    if rows:
        pad = batch_size - len(rows)
        rows += [np.zeros(seq_len + 1, np.int32)] * pad
        weights += [np.zeros(seq_len, np.float32)] * pad
        yield np.stack(rows), np.stack(weights)


def gzip_bits_per_byte(data: bytes) -> float:
    """The gzip -9 baseline: compressed bits per byte of the same text."""
    return len(gzip.compress(data, compresslevel=9)) * 8 / max(len(data), 1)
