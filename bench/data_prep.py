"""Data preparation at size: throughput, peak memory and a second start, beside the raw tokenizer speed.

    python bench/data_prep.py --gb 1 2 --out docs/data_prep.json

For each size it writes a synthetic JSONL corpus made from this interpreter's standard library, repeated
with per-copy perturbations (identifiers renamed per copy, a copy header) so no two documents are equal, then
in a fresh process prepares it (data.source=jsonl, SentencePiece trained on it, data.workers = all cores)
while sampling the resident memory of that process and its workers every 0.1 s; then times a second start
(a new process up to "reusing cached tokens"). Beside it, the raw speed of the same tokenizer alone: encode
the same text in a tight loop in one process per core, so the pipeline's overhead shows as a ratio.
`--tiny` runs the same code on a few MB (the CI check that the script works).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptjax.data import load_tokenizer, stdlib_files  # noqa: E402

WORD = re.compile(r"\b(self|value|result|name|data|path|args|key|items|text)\b")


def make_corpus(out: Path, target_bytes: int, shard_bytes: int = 64 << 20) -> tuple[int, int]:
    """JSONL shards of about shard_bytes until target_bytes; returns (documents, bytes of text)."""
    base = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    out.mkdir(parents=True, exist_ok=True)
    docs = written = shard = copy = 0
    f = open(out / f"part_{shard:04d}.jsonl", "w", encoding="utf-8")
    size = 0
    while written < target_bytes:
        suffix = f"_{copy}"
        for i, text in enumerate(base):
            doc = f"# copy {copy} of document {i}\n" + WORD.sub(lambda m: m.group(0) + suffix, text)
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
            written += len(doc.encode("utf-8"))
            docs += 1
            if size >= shard_bytes:
                f.close()
                shard += 1
                f = open(out / f"part_{shard:04d}.jsonl", "w", encoding="utf-8")
                size = 0
            if written >= target_bytes:
                break
        copy += 1
    f.close()
    return docs, written


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(p, [])
    return total


PREPARE = r"""
import json, sys, time
t0 = time.time()
from gptjax.config import DataConfig
from gptjax.data import prepare
cfg = DataConfig(source="jsonl", paths=(sys.argv[1] + "/*.jsonl",), cache_dir=sys.argv[2], workers=int(sys.argv[4]))
t1 = time.time()
out = prepare(cfg, int(sys.argv[3]), log=lambda m: print(m, file=sys.stderr))
t2 = time.time()
print(json.dumps({"data_dir": str(out), "import_s": t1 - t0, "prepare_s": t2 - t1}))
"""


def run_prepare(corpus: Path, cache: Path, vocab: int, workers: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus), str(cache), str(vocab), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"preparation failed:\n{err}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": peak, "log": err.strip().splitlines()}


def _raw_encode(args) -> tuple[int, float]:
    tok_dir, texts = args
    tok = load_tokenizer(tok_dir)
    t = time.perf_counter()
    n = sum(len(tok.encode(x)) for x in texts)
    return n, time.perf_counter() - t


def raw_tokenizer_speed(tok_dir: Path, corpus: Path, sample_bytes: int, workers: int) -> dict:
    """Tokens/s and MB/s of the tokenizer alone, `workers` processes each encoding its own share of the same
    documents in a tight loop (no reading, splitting or writing)."""
    texts, size = [], 0
    for f in sorted(corpus.glob("*.jsonl")):
        for line in open(f, encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode("utf-8"))
            if size >= sample_bytes:
                break
        if size >= sample_bytes:
            break
    shares = [texts[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        t = time.perf_counter()
        res = pool.map(_raw_encode, [(str(tok_dir), s) for s in shares])
        wall = time.perf_counter() - t
    tokens = sum(n for n, _ in res)
    busy = max(s for _, s in res)  # the slowest process's encoding time: startup excluded
    return {"bytes": size, "tokens": tokens, "tokens_per_s": tokens / busy, "mb_per_s": size / busy / 1e6,
            "wall_s_with_startup": wall}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, nargs="+", default=[1.0, 2.0], help="corpus sizes, in GB of text")
    ap.add_argument("--tiny", action="store_true", help="a few MB only: checks that the benchmark runs")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: one per core)")
    ap.add_argument("--work-dir", default=None, help="where corpora and caches go (default: a temporary dir)")
    ap.add_argument("--raw-sample-mb", type=float, default=200)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = [0.004] if args.tiny else args.gb
    raw_mb = 2 if args.tiny else args.raw_sample_mb
    workers = args.workers or os.cpu_count() or 1
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gptjax-data-bench-"))
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "workers": workers, "vocab": args.vocab,
               "runs": []}
    try:
        for gb in sizes:
            corpus, cache = work / f"corpus-{gb:g}gb", work / f"cache-{gb:g}gb"
            shutil.rmtree(cache, ignore_errors=True)
            t = time.time()
            docs, nbytes = make_corpus(corpus, int(gb * 1e9))
            print(f"{gb:g} GB corpus: {docs:,} documents, {nbytes / 1e9:.2f} GB of text, written in "
                  f"{time.time() - t:.0f}s", flush=True)
            first = run_prepare(corpus, cache, args.vocab, workers)
            manifest = json.loads((Path(first["data_dir"]) / "manifest.json").read_text())
            tokens = manifest["tokens"]["train"] + manifest["tokens"]["val"]
            second = run_prepare(corpus, cache, args.vocab, workers)
            assert any("reusing" in line for line in second["log"]), second["log"]
            raw = raw_tokenizer_speed(Path(first["data_dir"]), corpus, int(raw_mb * 1e6), workers)
            run = {"gb": gb, "documents": docs, "text_bytes": nbytes, "tokens": tokens,
                   "prepare_s": first["prepare_s"], "mb_per_s": nbytes / first["prepare_s"] / 1e6,
                   "tokens_per_s": tokens / first["prepare_s"], "peak_rss_gb": first["peak_rss_bytes"] / 1e9,
                   "second_start_s": second["prepare_s"], "second_start_with_imports_s": second["prepare_s"] +
                   second["import_s"], "raw_tokenizer": raw,
                   "pipeline_vs_raw": (tokens / first["prepare_s"]) / raw["tokens_per_s"]}
            results["runs"].append(run)
            print(f"  prepared in {run['prepare_s']:.0f}s: {run['mb_per_s']:.2f} MB/s, {run['tokens_per_s']:,.0f} "
                  f"tokens/s, peak RSS {run['peak_rss_gb']:.2f} GB (process + workers); second start "
                  f"{run['second_start_s']:.2f}s", flush=True)
            print(f"  raw tokenizer ({workers} processes, {raw['bytes'] / 1e6:.0f} MB): {raw['tokens_per_s']:,.0f} "
                  f"tokens/s, {raw['mb_per_s']:.2f} MB/s -> pipeline {run['pipeline_vs_raw']:.2f}x raw", flush=True)
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
