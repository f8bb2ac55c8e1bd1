"""Token caches: prepare a corpus once into memory-mapped shards, then draw (seed, step) batches from them.

`prepare(data_cfg, vocab_size)` streams the documents: each is held out for validation or not by its hash
(`sources.is_validation`), tokenized (in `data.workers` processes, ids as numpy arrays) and appended to the
memory-mapped shards of its split, and held-out text is written to val.txt as it goes, so memory does not grow
with the corpus. A byte-fallback BPE tokenizer is first trained on a bounded, deterministic sample of the
training split (one reading pass that keeps only the sample), unless a tokenizer is given. The result is the
same as preparing the whole corpus in memory (tests/test_data_stream.py proves it), with a manifest (source,
tokenizer, counts, hashes).

A second call reuses the cache when the corpus's fingerprint (file names, sizes, modification times and a
content sample: seconds on a 40 GB corpus) is unchanged; a changed fingerprint falls back to the full content
hash (touched but identical files are kept), and `data.verify=true` always checks the content.

Preparation builds in a temporary directory beside its target, `<target>.tmp-<host>-<pid>-<random>`, and
swaps it in whole, so a cache is either complete or absent. After every finished training shard it writes a
checkpoint (progress.json). SIGTERM (turned into `PreparationInterrupted` while preparing, in the main thread,
where no other handler is installed) and Ctrl-C keep the finished shards when there are any (else remove the
directory); errors remove it. The next preparation of the same corpus into the same cache takes over the
temporary directory of a dead one (SIGKILL, power loss, or the above) on this host and resumes from its
checkpoint; it then removes the other temporary directories whose owner pid is no longer running on this
host, or (another host's, or of an unknown owner) in which nothing has changed for `STALE_AFTER_S`; one a live
process on this host owns is never touched.

`TokenData.batch(seed, step, ...)` is a pure function of (seed, step): no sampler state, so a resumed run
replays exactly the batches of an uninterrupted one, and each process takes its own rows of the batch, with
random windows or (data.sampling=epoch) every window once per epoch in a seeded order.
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

from gptjax.config import DataConfig, write_atomic
from gptjax.data.sources import (
    Utf8Report,
    corpus_files,
    fingerprint_files,
    is_validation,
    iter_documents,
    stdlib_root,
)
from gptjax.data.tokenizers import (
    Tokenizer,
    fingerprint,
    load_tokenizer,
    train_tokenizer,
)
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
    for k in ("cache_dir", "workers", "verify", "sampling", "tokenizer", "mixture"):  # the tokens do not depend on them
        d.pop(k)
    if not d["separator"]:  # a field added later: caches made before it keep their directory names
        d.pop("separator")
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


class _SplitWriter:
    """One split's token shards, written as documents stream in: a shard closes at the first document boundary
    at or past `shard_tokens` (so no document straddles two shards), never held whole in memory."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype, state: dict | None = None):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, np.dtype(dtype)
        self.shards: list[dict] = list(state["shards"]) if state else []
        self.f, self.n = None, 0
        if state and state.get("open_tokens"):  # a resumed shard: keep what the last checkpoint covered
            path = out_dir / self._name()
            with open(path, "r+b") as f:
                f.truncate(state["open_tokens"] * self.dtype.itemsize)
            self.f, self.n = open(path, "ab"), state["open_tokens"]

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):04d}.bin"

    def add(self, ids: np.ndarray) -> bool:
        """Append one document's tokens; True if that closed a shard."""
        if self.f is None:
            self.f = open(self.out_dir / self._name(), "wb")
        ids.astype(self.dtype, copy=False).tofile(self.f)
        self.n += ids.size
        if self.n >= self.shard_tokens:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.shards.append({"file": self._name(), "tokens": int(self.n)})
            self.f, self.n = None, 0

    def state(self) -> dict:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
        return {"shards": list(self.shards), "open_tokens": int(self.n)}

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n


def _encode_init(tok_dir: str) -> None:  # in each tokenizing process
    global _WORKER_TOK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    _WORKER_TOK = load_tokenizer(tok_dir)


def _encode(texts: list[str], fraction: float, tok: Tokenizer | None = None) -> list[tuple[bool, np.ndarray]]:
    """(held out?, token ids + end-of-text) of each document: the work a tokenizing process does (with `tok`:
    the same in this process, using the tokenizer's own threads)."""
    ids = tok.encode_batch(texts) if tok is not None else [_WORKER_TOK.encode(t) for t in texts]
    tok = tok or _WORKER_TOK
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    out = []
    for t, i in zip(texts, ids):
        a = np.empty(len(i) + 1, dtype)
        a[:-1] = i
        a[-1] = tok.eot_id  # documents are separated by end-of-text
        out.append((is_validation(t, fraction), a))
    return out


_WORKER_TOK: Tokenizer | None = None
CHUNK_CHARS = 1 << 20  # text per unit of work handed to a tokenizing process
POOL_MIN_BYTES = 16 << 20  # below this much corpus, tokenizing processes cost more than they save


class _Encoder:
    """Documents in, (document, held out?, ids) out, in corpus order. With several workers the encoding runs in
    as many processes (spawned: the parent may hold JAX's threads), at most 2 chunks per worker in flight, so
    memory stays bounded whatever the corpus size; otherwise in this process (the tokenizer's own threads)."""

    def __init__(self, tok: Tokenizer, tok_dir: Path, workers: int, fraction: float):
        self.tok, self.fraction, self.pool = tok, fraction, None
        if workers > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, _encode_init, (str(tok_dir),))
        self.limit = 2 * max(workers, 1)

    def run(self, docs: Iterator[str]) -> Iterator[tuple[str, bool, np.ndarray]]:
        from collections import deque

        inflight: deque = deque()
        chunk, size = [], 0

        def submit(texts):
            if self.pool is None:
                inflight.append((texts, _encode(texts, self.fraction, self.tok)))
            else:
                inflight.append((texts, self.pool.apply_async(_encode, (texts, self.fraction))))

        def drain(keep: int):
            while len(inflight) > keep:
                texts, res = inflight.popleft()
                for t, (val, ids) in zip(texts, res if isinstance(res, list) else res.get()):
                    yield t, val, ids

        for text in docs:
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                submit(chunk)
                chunk, size = [], 0
                yield from drain(self.limit)
        if chunk:
            submit(chunk)
        yield from drain(0)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _write_tokens(docs: Iterator[tuple[str, str]], tok: Tokenizer, tmp: Path, cfg: DataConfig, state: dict,
                  total_bytes: int) -> dict:
    """Tokenize the document stream into train/val shards in `tmp`, checkpointing after every finished training
    shard (progress.json), so a killed preparation resumes where that left off. `state` is the last checkpoint
    (or a fresh one). Returns the final counts. The last training document is held back one step: a corpus whose
    hash split holds nothing out gives its last document to validation, as `sources.split` does."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    w = {sp: _SplitWriter(tmp, sp, cfg.shard_tokens, dtype, state.get(sp)) for sp in ("train", "val")}
    counts = dict(state.get("counts", {"docs_train": 0, "docs_val": 0, "bytes_train": 0}))
    val_txt = open(tmp / "val.txt", "ab")
    val_txt.truncate(state.get("val_txt_bytes", 0))
    start = state.get("next_doc", 0)
    workers = cfg.workers or os.cpu_count() or 1
    if total_bytes < POOL_MIN_BYTES:
        workers = 1
    enc = _Encoder(tok, tmp, workers, cfg.val_fraction)
    held = None  # (index, text, ids) of the latest training document, not yet written
    index = iter(range(start, 1 << 62))

    def checkpoint(next_doc: int) -> None:
        val_txt.flush()
        os.fsync(val_txt.fileno())
        write_atomic(tmp / "progress.json", json.dumps({
            **state["key"], "next_doc": next_doc, "train": w["train"].state(), "val": w["val"].state(),
            "val_txt_bytes": val_txt.tell(), "counts": counts}))

    def add_val(text: str, ids: np.ndarray) -> None:
        if counts["docs_val"]:
            val_txt.write(b"\n")
        val_txt.write(text.encode("utf-8"))
        w["val"].add(ids)
        counts["docs_val"] += 1

    def add_train(text: str, ids: np.ndarray) -> bool:
        counts["docs_train"] += 1
        counts["bytes_train"] += len(text.encode("utf-8"))
        return w["train"].add(ids)

    def texts():
        for i, (_, text) in enumerate(docs):
            if i >= start:  # documents before the checkpoint are read (for the content hash) but not encoded
                yield text
            bar.update(len(text))

    with tqdm(total=total_bytes, desc="tokenizing", unit="B", unit_scale=True, leave=False) as bar:
        try:
            for text, val, ids in enc.run(texts()):
                i = next(index)
                if val:
                    add_val(text, ids)
                    continue
                if held is not None and add_train(held[1], held[2]):
                    checkpoint(i)  # documents [0, i) are all written now
                held = (i, text, ids)
            if held is not None:
                if counts["docs_val"] == 0:
                    add_val(held[1], held[2])
                else:
                    add_train(held[1], held[2])
        finally:
            enc.close()
    w["train"].close()
    w["val"].close()
    val_txt.close()
    return {"shards": {sp: w[sp].shards for sp in w}, "tokens": {sp: w[sp].tokens for sp in w}, **counts,
            "bytes_val": (tmp / "val.txt").stat().st_size}


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

    With `tokenizer` (a run's own, e.g. the parent's of a run started with init_from, or data.tokenizer), the
    corpus is tokenized with it instead of a SentencePiece model trained on it. The corpus's own cache is reused
    when it was made with that very tokenizer (a run continued on the corpus it was trained on).

    Invalid UTF-8 in the corpus is reported in one line (and recorded in the manifest's "utf8"); binary files
    are refused (sources.py has the rule). See the module docstring for reuse, interruption and resumption."""
    with _sigterm_raises():
        if cfg.source == "bin":
            from gptjax.data.binsource import prepare_bin

            return prepare_bin(cfg, vocab_size, tokenizer, log)
        return _read_and_prepare(cfg, vocab_size, tokenizer, log)


def _doc_hash_update(h, name: str, text: str) -> None:
    h.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace") + b"\0")


class _Corpus:
    """A corpus's identity: a fingerprint that costs seconds at any size (names, sizes, modification times,
    and a content sample: sources.fingerprint_files), and, only when that is not enough, the full content hash
    (every document, as the manifest's source_hash records it)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.files = corpus_files(cfg)
        self.fingerprint = fingerprint_files(self.files)
        self.bytes = sum(f.stat().st_size for f in self.files)
        self._hash: str | None = None

    def content_hash(self) -> str:
        if self._hash is None:
            h = hashlib.sha256()
            for name, text in tqdm(iter_documents(self.cfg, Utf8Report()), desc="data: hashing the corpus",
                                   unit=" docs", leave=False):
                _doc_hash_update(h, name, text)
            self._hash = h.hexdigest()
        return self._hash

    def matches(self, manifest: dict, out: Path, log) -> bool:
        """Whether `manifest` was made from this corpus. An equal fingerprint is enough unless data.verify; a
        different one (files touched, copied, or from a gptjax that recorded none) falls back to the content."""
        if manifest.get("fingerprint") == self.fingerprint and not self.cfg.verify:
            return True
        if manifest.get("source_hash") != self.content_hash():
            return False
        if manifest.get("fingerprint") != self.fingerprint:  # same content: remember the new fingerprint
            with contextlib.suppress(OSError):
                write_atomic(out / "manifest.json", json.dumps({**manifest, "fingerprint": self.fingerprint}, indent=2) + "\n")
            if "fingerprint" in manifest:
                log(f"data: the corpus files' sizes or times changed but not their content; keeping {out}")
        return True


def _tokenizer_sample(docs: Iterator[str], fraction: float, budget: int) -> list[str]:
    """The training split's documents that `train_tokenizer` would pick from the whole split (the lowest hashes of
    their first 4096 characters, until `budget` characters), kept in a heap of about `budget` characters while
    the corpus streams past. The last training document joins only once another follows it or the split holds
    something out (`sources.split` gives a corpus with nothing held out its last document as validation)."""
    import heapq

    heap: list = []  # (complement of the key, -order, text): the largest key on top, the latest first among equals
    used, held, any_val, order = 0, None, False, 0

    def push(text: str) -> None:
        nonlocal used, order
        order += 1
        heapq.heappush(heap, (_neg(hashlib.sha256(text[:4096].encode()).digest()), -order, text))
        used += len(text)
        while heap and used - len(heap[0][2]) >= budget:  # the largest key is not needed to reach the budget
            used -= len(heapq.heappop(heap)[2])

    for text in docs:
        if is_validation(text, fraction):
            any_val = True
            continue
        if held is not None:
            push(held)
        held = text
    if held is not None and any_val:
        push(held)
    return [t for _, _, t in sorted(heap, key=lambda e: (_neg(e[0]), -e[1]))]


def _neg(digest: bytes) -> bytes:
    return bytes(255 - b for b in digest)


def _read_and_prepare(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer | None, log) -> Path:
    corpus = _Corpus(cfg)
    out = data_dir_for(cfg, vocab_size)
    if tokenizer is not None:
        fp = fingerprint(tokenizer.files)
        own = _read_manifest(out)
        if not (own and own["tokenizer"]["sha256"] == fp and corpus.matches(own, out, log)):
            out = data_dir_for(cfg, vocab_size, fp)
    new_dirs = [d for d in (out.parent, out.parent.parent) if not d.exists()]
    try:
        with _cache_lock(out.parent):
            return _prepare(cfg, vocab_size, out, corpus, tokenizer, log)
    except DataError as e:
        for d in new_dirs if not isinstance(e, PreparationInterrupted) else ():  # bad input leaves no trace
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _utf8_line(d: dict) -> str:
    """The manifest's record of invalid UTF-8, as the line preparation printed (a reused cache says it again)."""
    r = Utf8Report(files=d.get("files", 0), invalid_bytes=d.get("invalid_bytes", 0))
    r.invalid_files = list(d.get("examples", [])) + [""] * (d.get("invalid_files", 0) - len(d.get("examples", [])))
    return r.line()


def _key(cfg: DataConfig, vocab_size: int, corpus: _Corpus, tokenizer: Tokenizer | None) -> dict:
    """What a half-finished preparation must share with this one to be resumed."""
    return {"spec": _spec(cfg, vocab_size), "fingerprint": corpus.fingerprint,
            "tokenizer": fingerprint(tokenizer.files) if tokenizer is not None else "trained here"}


def _resumable(out: Path, key: dict) -> tuple[Path, dict] | None:
    """The temporary directory (and checkpoint) of a dead preparation of this very cache, if one is left."""
    best = None
    for d in out.parent.iterdir():
        m = _TMP.match(d.name)
        if not (m and m["target"] == out.name and m["pid"] and m["host"] == _host() and d.is_dir()):
            continue
        if d.name.endswith("_old") or _alive(int(m["pid"])):
            continue
        try:
            state = json.loads((d / "progress.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if all(state.get(k) == v for k, v in key.items()) and (best is None or state["next_doc"] > best[1]["next_doc"]):
            best = (d, state)
    return best


def _prepare(cfg: DataConfig, vocab_size: int, out: Path, corpus: _Corpus, tokenizer: Tokenizer | None,
             log) -> Path:
    manifest = _read_manifest(out) if (out / "manifest.json").exists() else None
    if manifest:
        missing = [s["file"] for sp in ("train", "val") for s in manifest["shards"][sp] if not (out / s["file"]).exists()]
        tok_files = manifest["tokenizer"].get("files", [manifest["tokenizer"].get("file", "tokenizer.model")])
        missing += [f for f in tok_files if not (out / f).exists()]
        if missing:
            log(f"data: cache in {out} is incomplete ({len(missing)} file(s) missing); rebuilding")
        elif corpus.matches(manifest, out, log):
            if _utf8_line(manifest.get("utf8", {})):
                log(_utf8_line(manifest["utf8"]))
            log(f"data: reusing cached tokens in {out}")
            return out
        else:
            log(f"data: the source changed since {out} was built (hash {manifest.get('source_hash', '?')[:12]} -> "
                f"{corpus.content_hash()[:12]}); rebuilding")

    t0 = time.time()
    key = _key(cfg, vocab_size, corpus, tokenizer)
    # Build in a temporary directory beside the target and swap it in, so a kill never leaves a half-written
    # cache that looks complete. Its name says who owns it: _resumable takes over a dead one's finished
    # shards, _remove_stale_temps removes what is left.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{_host()}-{os.getpid()}-", dir=out.parent))
    found = _resumable(out, key)
    state = {"key": key}
    if found:
        tmp.rmdir()
        os.replace(found[0], tmp)
        state = {**found[1], "key": key}
        done = found[1]["train"]["shards"] if found[1].get("train") else []
        log(f"data: resuming the preparation that {found[0].name.split('.tmp-')[1].rsplit('-', 1)[0]} left: "
            f"{len(done)} finished shard(s), {sum(s['tokens'] for s in done):,} tokens, from document "
            f"{found[1]['next_doc']:,}")
    _remove_stale_temps(out.parent, log)
    old = tmp.with_name(tmp.name + "_old")  # the replaced cache, under a name _remove_stale_temps knows
    utf8 = Utf8Report()
    h = hashlib.sha256()

    def docs():
        for name, text in iter_documents(cfg, utf8):
            _doc_hash_update(h, name, text)
            yield name, text

    try:
        if "next_doc" not in state:
            if tokenizer is None:
                sample = _tokenizer_sample((t for _, t in iter_documents(cfg, Utf8Report())), cfg.val_fraction,
                                           cfg.tokenizer_sample_bytes)
                if not sample:
                    raise DataError("the corpus needs at least two documents (one is held out for validation)")
                train_tokenizer(sample, vocab_size, tmp / "tokenizer.model", cfg.num_task_tokens,
                                cfg.tokenizer_sample_bytes)
            else:  # a copy of the given tokenizer's files travels with the tokens it made
                for f in tokenizer.files:
                    shutil.copyfile(f, tmp / Path(f).name)
            state["next_doc"] = 0
            write_atomic(tmp / "progress.json", json.dumps({**key, "next_doc": 0}))
        tok = load_tokenizer(tmp)
        res = _write_tokens(docs(), tok, tmp, cfg, state, corpus.bytes)
        if utf8.line():
            log(utf8.line())
        if res["docs_train"] + res["docs_val"] == 0:
            raise DataError("the corpus holds no documents; check data.source and data.paths")
        if res["docs_train"] == 0:
            raise DataError("the corpus needs at least two documents (one is held out for validation)")
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": _spec(cfg, vocab_size),
            "source_hash": h.hexdigest(),
            "fingerprint": corpus.fingerprint,
            "tokenizer": {"files": [f.name for f in tok.files], "vocab_size": tok.vocab_size,
                          "sha256": fingerprint(tok.files), "trained_here": tokenizer is None,
                          "eot_id": tok.eot_id, "pad_id": tok.pad_id},
            "dtype": np.dtype(dtype).name,
            "docs": {"train": res["docs_train"], "val": res["docs_val"]},
            "bytes": {"train": res["bytes_train"], "val": res["bytes_val"]},
            "tokens": res["tokens"],
            "shards": res["shards"],
            "utf8": utf8.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "progress.json").unlink()
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except (PreparationInterrupted, KeyboardInterrupt) as e:
        if old.exists() and not out.exists():  # stopped mid-swap: put the previous cache back
            os.replace(old, out)
        kept = _kept_shards(tmp)
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        what = "SIGTERM" if isinstance(e, PreparationInterrupted) else "Ctrl-C"
        msg = (f"data preparation was stopped by {what} before it finished; its {kept} finished shard(s) are kept "
               f"in {tmp} and the next preparation of this corpus resumes from them")
        if isinstance(e, PreparationInterrupted):
            raise PreparationInterrupted(msg) from None
        log(f"data: {msg}")
        raise
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


def _kept_shards(tmp: Path) -> int:
    """How many finished training shards the last checkpoint in `tmp` covers (0: nothing worth keeping)."""
    try:
        return len(json.loads((tmp / "progress.json").read_text())["train"]["shards"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return 0


# ----------------------------------------------------------------------------------------------
# Loading


class TokenData:
    """Memory-mapped token shards of one prepared cache directory (or of the .bin files a data.source=bin cache
    names, read in place)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise DataError(f"{self.path} holds no prepared data (manifest.json missing); run python train.py to prepare it")
        self.manifest = json.loads(mf.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = {sp: [self._open(s, dtype) for s in self.manifest["shards"][sp]] for sp in ("train", "val")}
        self.tokenizer = load_tokenizer(self.path)

    def _open(self, shard: dict, dtype) -> np.ndarray:
        path = Path(shard["path"]) if "path" in shard else self.path / shard["file"]
        try:
            return np.memmap(path, dtype=dtype, mode="r", offset=shard.get("offset", 0), shape=(shard["tokens"],))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the token shard {path} of {self.path} ({e}); restore it, or delete "
                            f"{self.path} to prepare the data again") from None

    def tokens(self, split: str) -> int:
        return int(self.manifest["tokens"][split])

    def bytes_per_token(self, split: str = "val") -> float:
        return self.manifest["bytes"][split] / self.manifest["tokens"][split]

    def windows_per_epoch(self, seq_len: int, split: str = "train") -> int:
        """How many disjoint windows of seq_len + 1 tokens (stride seq_len: each token a target once) an epoch has."""
        return int(sum(max((len(s) - 1) // seq_len, 0) for s in self.shards[split]))

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, *, split: str = "train",
              process_index: int = 0, process_count: int = 1, rows: np.ndarray | None = None,
              sampling: str = "random") -> np.ndarray:
        """Rows [process_index * B/P, (process_index + 1) * B/P) of the global batch of `step` (or the rows
        numbered `rows`): int32 [B/P, seq_len + 1] windows chosen from (seed, step) alone. sampling="random":
        windows at uniformly drawn offsets; "epoch": row r of step s is window s * B + r of a seeded permutation
        of the epoch's disjoint windows (a new permutation each epoch), so every window is seen once per epoch."""
        shards = self.shards[split]
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by {process_count} processes")
        per = batch_size // process_count
        picked = np.arange(process_index * per, (process_index + 1) * per) if rows is None else np.asarray(rows)
        if sampling == "epoch":
            counts = np.array([max((len(s) - 1) // seq_len, 0) for s in shards])
            n = int(counts.sum())
            if n == 0:
                raise DataError(f"the {split} split has fewer than {seq_len + 1} tokens in every shard; "
                                f"lower model.block_size or add data")
            g = np.int64(step) * batch_size + picked.astype(np.int64)
            flat = np.empty_like(g)
            for epoch in np.unique(g // n):  # a batch may straddle two epochs
                at = g // n == epoch
                key = int(np.random.default_rng([seed, int(epoch), 3]).integers(1 << 62))
                flat[at] = permute(g[at] % n, n, key)
            bounds = np.cumsum(counts)
            which = np.searchsorted(bounds, flat, side="right")
            offsets = (flat - (bounds[which] - counts[which])) * seq_len
        else:
            starts = np.array([max(len(s) - seq_len - 1, 0) + 1 if len(s) > seq_len else 0 for s in shards])
            if starts.sum() == 0:
                raise DataError(f"the {split} split has fewer than {seq_len + 1} tokens in every shard; "
                                f"lower model.block_size or add data")
            rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
            flat = rng.integers(0, starts.sum(), size=batch_size)[picked]
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


def _mix(x: np.ndarray, key: int, r: int) -> np.ndarray:
    """A 64-bit integer hash (splitmix64's finaliser) of x under (key, round)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((key + 0x9E3779B97F4A7C15 * (r + 1)) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """A bijection of [0, n) chosen by `key`, applied to `i`: a 4-round Feistel network on the smallest even number
    of bits that holds n, walked until it lands inside [0, n). O(1) memory for any n (a permutation array of an
    epoch's windows would not fit for a 10B-token corpus)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, np.uint64((1 << (bits // 2)) - 1)

    def once(x):
        left, right = x >> np.uint64(half), x & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key, r) & mask)
        return (left << np.uint64(half)) | right

    y = once(np.asarray(i, dtype=np.uint64))
    while (out := y >= n).any():
        y[out] = once(y[out])
    return y.astype(np.int64)


def gzip_bits_per_byte(data: bytes) -> float:
    """The gzip -9 baseline: compressed bits per byte of the same text."""
    return len(gzip.compress(data, compresslevel=9)) * 8 / max(len(data), 1)
