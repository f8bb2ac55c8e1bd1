"""Already-tokenized corpora (`data.source=bin`): nanoGPT's headerless uint16 `.bin` files and llm.c's (a
1024-byte header, then uint16 or uint32 tokens), read in place.

Nothing is copied or re-tokenized: the cache holds a manifest naming the files, offsets and token counts, the
tokenizer that made them (`data.tokenizer`, required: the ids mean nothing without it) and `val.txt`, the held-out
tokens decoded back to text, which bits per byte and the gzip baseline are measured against. Files whose name
contains "val" are held out (llm.c's fineweb_val_*.bin, nanoGPT's val.bin); the others are trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptjax.config import DataConfig
from gptjax.data.sources import corpus_files, fingerprint_files, read_bin_header
from gptjax.data.tokenizers import Tokenizer, fingerprint, load_tokenizer
from gptjax.errors import DataError

SCAN = 1 << 26  # tokens per read when checking ids and decoding


def _content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _max_id(arr: np.ndarray) -> int:
    return max((int(arr[i:i + SCAN].max()) for i in range(0, len(arr), SCAN)), default=-1)


def _decode_val(arrays: list[np.ndarray], tok: Tokenizer, out: Path) -> tuple[int, int]:
    """Write the held-out documents (end-of-text separated) as text, joined by newlines as text sources are;
    returns (documents, bytes)."""
    docs = written = 0
    with open(out, "wb") as f:
        for arr in arrays:
            tail = np.zeros(0, arr.dtype)
            for i in range(0, len(arr), SCAN):
                block = np.concatenate([tail, np.asarray(arr[i:i + SCAN])])
                cuts = np.flatnonzero(block == tok.eot_id)
                end = cuts[-1] + 1 if cuts.size else 0
                pieces = np.split(block[:end], cuts[:-1] + 1) if cuts.size else []
                tail = block[end:]
                for p in pieces:
                    text = tok.decode(p[p != tok.eot_id]).encode("utf-8")
                    if not text:
                        continue
                    written += f.write((b"\n" if docs else b"") + text)
                    docs += 1
            if tail.size:
                written += f.write((b"\n" if docs else b"") + tok.decode(tail).encode("utf-8"))
                docs += 1
    return docs, written


def prepare_bin(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer | None, log) -> Path:
    from gptjax.data import cache

    if tokenizer is None:
        from gptjax.data.tokenizers import open_tokenizer

        tokenizer = open_tokenizer(cfg.tokenizer)
    files = corpus_files(cfg)
    val = [f for f in files if "val" in f.name]
    train = [f for f in files if "val" not in f.name]
    if not val or not train:
        raise DataError(f"data.source=bin needs training files and held-out files (a file is held out when its name "
                        f"contains 'val', like llm.c's fineweb_val_000000.bin or nanoGPT's val.bin); data.paths "
                        f"matches {len(train)} training and {len(val)} held-out file(s)")
    headers = {f: read_bin_header(f) for f in files}
    dtypes = {np.dtype(h[1]).name for h in headers.values()}
    if len(dtypes) > 1:
        raise DataError(f"data.paths mixes token widths ({', '.join(sorted(dtypes))}); use files of one layout")
    dtype = np.dtype(dtypes.pop())
    fp_files = fingerprint_files(files)
    out = cache.data_dir_for(cfg, vocab_size, fingerprint(tokenizer.files))
    with cache._cache_lock(out.parent):
        manifest = cache._read_manifest(out)
        if manifest and all(Path(s["path"]).exists() for sp in ("train", "val") for s in manifest["shards"][sp]):
            same = manifest.get("fingerprint") == fp_files and not cfg.verify
            if not same and manifest.get("source_hash") == _content_hash(files):
                same = True
            if same:
                log(f"data: reusing the token files named in {out}")
                return out
            log(f"data: the .bin files changed since {out} was made; re-reading them")
        cache._remove_stale_temps(out.parent, log)
        t0 = time.time()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{cache._host()}-{os.getpid()}-", dir=out.parent))
        try:
            shards = {}
            for sp, group in (("train", train), ("val", val)):
                shards[sp] = []
                for f in tqdm(group, desc=f"data: checking {sp} token files", leave=False):
                    offset, _, n = headers[f]
                    arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=(n,))
                    top = _max_id(arr)
                    if top >= tokenizer.vocab_size:
                        raise DataError(f"{f} holds token id {top}, outside the {tokenizer.vocab_size} ids of "
                                        f"data.tokenizer={cfg.tokenizer}; name the tokenizer these files were made with")
                    shards[sp].append({"file": f.name, "path": str(f.absolute()), "offset": offset, "tokens": int(n)})
            for f in tokenizer.files:
                shutil.copyfile(f, tmp / Path(f).name)
            tok = load_tokenizer(tmp)
            val_arrays = [np.memmap(Path(s["path"]), dtype=dtype, mode="r", offset=s["offset"], shape=(s["tokens"],))
                          for s in shards["val"]]
            val_docs, val_bytes = _decode_val(val_arrays, tok, tmp / "val.txt")
            tokens = {sp: sum(s["tokens"] for s in shards[sp]) for sp in shards}
            manifest = {
                "format_version": cache.FORMAT_VERSION,
                "source": cache._spec(cfg, vocab_size),
                "source_hash": _content_hash(files),
                "fingerprint": fp_files,
                "tokenizer": {"files": [f.name for f in tok.files], "vocab_size": tok.vocab_size,
                              "sha256": fingerprint(tok.files), "trained_here": False,
                              "eot_id": tok.eot_id, "pad_id": tok.pad_id},
                "dtype": dtype.name,
                "docs": {"train": None, "val": val_docs},  # training documents are not counted: never decoded
                "bytes": {"train": None, "val": val_bytes},
                "tokens": tokens,
                "shards": shards,
                "utf8": {"files": 0, "invalid_files": 0, "invalid_bytes": 0, "examples": []},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"data: {len(train)} training / {len(val)} held-out token file(s), {tokens['train']:,} / {tokens['val']:,} "
        f"tokens, read in place ({time.time() - t0:.1f}s) -> {out}")
    return out
