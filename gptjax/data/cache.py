"""Token caches: prepare a corpus once into memory-mapped shards, then draw (seed, step) batches from them.

`prepare(data_cfg, vocab_size)` reads documents, holds out the validation split (`sources.split`), trains a
byte-fallback BPE tokenizer on the training split (or takes a given one), and writes memory-mapped token
shards plus a manifest (source, tokenizer, counts, hashes) into a cache directory. A second call with the
same source reuses it; a changed source is detected by its content hash and rebuilt.

Preparation builds in a temporary directory beside its target, `<target>.tmp-<host>-<pid>-<random>`, and
swaps it in whole, so a cache is either complete or absent. SIGTERM (turned into `PreparationInterrupted`
while preparing, in the main thread, where no other handler is installed), Ctrl-C and errors remove that
directory. SIGKILL cannot be caught: the next preparation into the same cache root removes temporary
directories whose owner pid is no longer running on this host, or (another host's, or of an unknown owner)
in which nothing has changed for `STALE_AFTER_S`; one a live process on this host owns is never touched.

`TokenData.batch(seed, step, ...)` is a pure function of (seed, step): no sampler state, so a resumed run
replays exactly the batches of an uninterrupted one, and each process takes its own rows of the batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from gptjax.config import DataConfig
from gptjax.data.sources import Utf8Report, iter_documents, split, stdlib_root
from gptjax.data.tokenizers import SentencePieceTokenizer, Tokenizer, fingerprint, load_tokenizer, train_tokenizer
from gptjax.errors import DataError

FORMAT_VERSION = 1
STALE_AFTER_S = 24 * 3600  # a temporary directory no process here can vouch for, untouched this long, is dead
_TMP = re.compile(r"^(?P<target>.+)\.tmp-(?:(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


class PreparationInterrupted(DataError):
    """SIGTERM arrived while preparing data: the half-built cache was removed. Exits 143, as SIGTERM does."""

    exit_code = 143


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


def data_dir_for(cfg: DataConfig, vocab_size: int, tokenizer_sha256: str = "") -> Path:
    """The cache directory of a corpus tokenized with its own tokenizer (trained on it), or with the given
    tokenizer (`tokenizer_sha256`, its `fingerprint`: e.g. the tokenizer of a run started with init_from)."""
    spec = _spec(cfg, vocab_size)
    if tokenizer_sha256:
        spec["tokenizer_sha256"] = tokenizer_sha256
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return root / "data" / f"{cfg.source}-v{vocab_size}{'-tok' if tokenizer_sha256 else ''}-{key}"


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _last_change(d: Path) -> float:
    times = [d.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.stat().st_mtime for p in d.iterdir()]
    return max(times)


def _remove_stale_temps(root: Path, log) -> None:
    """Remove the temporary directories of preparations that died (SIGKILL, power loss) under `root`; called
    holding the root's lock, so no preparation that takes it is writing one of them."""
    host, removed = _host(), []
    for d in sorted(root.iterdir()):
        m = _TMP.match(d.name)
        if not (m and d.is_dir()):
            continue
        try:
            if m["pid"] and m["host"] == host:
                dead = not _alive(int(m["pid"]))
            else:  # another host's (a shared disk), or an older gptjax's unnamed one: only by age
                dead = time.time() - _last_change(d) > STALE_AFTER_S
        except OSError:  # vanished meanwhile
            continue
        if dead:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"{d.name}" + (f" (pid {m['pid']} on {m['host']})" if m["pid"] else ""))
    if removed:
        log(f"data: removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} left by an "
            f"interrupted preparation in {root}: {', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")


@contextlib.contextmanager
def _sigterm_raises():
    """While preparing, SIGTERM raises PreparationInterrupted, so the try/except that owns the temporary
    directory removes it (the default action would kill the process and leave it). Only in the main thread,
    and only where SIGTERM still has its default action (a caller's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    fired = False

    def on_term(signum, frame):
        nonlocal fired
        if fired:  # a second SIGTERM must not interrupt the cleanup of the first
            return
        fired = True
        raise PreparationInterrupted("data preparation was stopped by SIGTERM before it finished; nothing half-"
                                     "written was kept; rerun to prepare the data")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare(cfg: DataConfig, vocab_size: int, *, tokenizer: Tokenizer | None = None, log=print) -> Path:
    """Make (or reuse) the token cache for this source and vocabulary; returns its directory.

    With `tokenizer` (a run's own, e.g. the parent's of a run started with init_from), the corpus is tokenized
    with it instead of a SentencePiece model trained on it. The corpus's own cache is reused when it was made
    with that very tokenizer (a run continued on the corpus it was trained on).

    Invalid UTF-8 in the corpus is reported in one line (and recorded in the manifest's "utf8"); binary files
    are refused (sources.py has the rule). See the module docstring for interruption and cleanup."""
    with _sigterm_raises():
        return _read_and_prepare(cfg, vocab_size, tokenizer, log)


def _read_and_prepare(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer | None, log) -> Path:
    utf8 = Utf8Report()
    docs = list(iter_documents(cfg, utf8))
    if utf8.line():
        log(utf8.line())
    if not docs:
        raise DataError("the corpus holds no documents; check data.source and data.paths")
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace") + b"\0")
    source_hash = h.hexdigest()
    texts = [t for _, t in docs]
    out = data_dir_for(cfg, vocab_size)
    if tokenizer is not None:
        fp = fingerprint(tokenizer.files)
        own = _read_manifest(out)
        if not (own and own.get("source_hash") == source_hash and own["tokenizer"]["sha256"] == fp):
            out = data_dir_for(cfg, vocab_size, fp)
    with _cache_lock(out.parent):
        _remove_stale_temps(out.parent, log)
        return _prepare(cfg, vocab_size, out, texts, source_hash, tokenizer, utf8, log)


def _prepare(cfg: DataConfig, vocab_size: int, out: Path, texts: list[str], source_hash: str,
             tokenizer: Tokenizer | None, utf8: Utf8Report, log) -> Path:
    manifest = _read_manifest(out) if (out / "manifest.json").exists() else None
    if manifest and manifest.get("source_hash") == source_hash:
        missing = [s["file"] for sp in ("train", "val") for s in manifest["shards"][sp] if not (out / s["file"]).exists()]
        tok_files = manifest["tokenizer"].get("files", [manifest["tokenizer"].get("file", "tokenizer.model")])
        missing += [f for f in tok_files if not (out / f).exists()]
        if not missing:
            log(f"data: reusing cached tokens in {out}")
            return out
        log(f"data: cache in {out} is incomplete ({len(missing)} file(s) missing); rebuilding")
    elif manifest:
        log(f"data: the source changed since {out} was built (hash {manifest.get('source_hash', '?')[:12]} -> "
            f"{source_hash[:12]}); rebuilding")

    t0 = time.time()
    train_docs, val_docs = split(texts, cfg.val_fraction)
    if not train_docs:
        raise DataError("the corpus needs at least two documents (one is held out for validation)")

    # Build in a temporary directory beside the target and swap it in, so a kill never leaves a
    # half-written cache that looks complete. Its name says who owns it, for _remove_stale_temps.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{_host()}-{os.getpid()}-", dir=out.parent))
    old = tmp.with_name(tmp.name + "_old")  # the replaced cache, under a name _remove_stale_temps knows
    try:
        if tokenizer is None:
            train_tokenizer(train_docs, vocab_size, tmp / "tokenizer.model", cfg.num_task_tokens,
                            cfg.tokenizer_sample_bytes)
            tok = SentencePieceTokenizer(tmp / "tokenizer.model")
        else:  # a copy of the given tokenizer's files travels with the tokens it made
            for f in tokenizer.files:
                shutil.copyfile(f, tmp / Path(f).name)
            tok = load_tokenizer(tmp)
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        shards = {split: _write_tokens(d, tok, tmp, split, cfg.shard_tokens, dtype)
                  for split, d in (("train", train_docs), ("val", val_docs))}
        val_text = "\n".join(val_docs).encode("utf-8")
        (tmp / "val.txt").write_bytes(val_text)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": _spec(cfg, vocab_size),
            "source_hash": source_hash,
            "tokenizer": {"files": [f.name for f in tok.files], "vocab_size": tok.vocab_size,
                          "sha256": fingerprint(tok.files), "trained_here": tokenizer is None,
                          "eot_id": tok.eot_id, "pad_id": tok.pad_id},
            "dtype": np.dtype(dtype).name,
            "docs": {"train": len(train_docs), "val": len(val_docs)},
            "bytes": {"train": sum(len(d.encode("utf-8")) for d in train_docs), "val": len(val_text)},
            "tokens": {sp: sum(s["tokens"] for s in shards[sp]) for sp in shards},
            "shards": shards,
            "utf8": utf8.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # stopped mid-swap: put the previous cache back
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
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
        self.tokenizer = load_tokenizer(self.path)

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
