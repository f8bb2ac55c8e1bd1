"""One command for a GPU machine: every throughput figure gptjax reports, into one JSON, in well under 10 minutes.

  pip install -e . --no-deps                   # on a machine whose jax already has CUDA
  python bench/gpu.py --out docs/gpu.json      # H100/H200: GPT-2 small/medium, attention, sampling, vs torch
  python bench/gpu.py --tiny --out /tmp/g.json # the same sections at toy sizes (what CI runs on the CPU)

Sections, each a subprocess of an existing benchmark with its own time limit, so one that fails (out of memory,
a missing kernel) is recorded with its reason and the others still run:
  train       GPT-2 small and medium, bf16, T = 1024: tokens/s and MFU at the largest batch that fits
              (bench/train_throughput.py; batches tried largest first, remat 'dots' as the last resort)
  attention   fwd+bwd time and memory of dense causal vs banded (w = 256) attention, cuDNN vs the blockwise
              pure-JAX path, T = 2k ... 32k (bench/attention.py)
  sample      KV-cache sampling tokens/s of GPT-2 small, random weights (bench/generate.py)
  vs_torch    the same GPT-2 small shape in PyTorch eager, torch.compile and gptjax (bench/compare_torch.py)
Prints a summary; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

FULL = {
    "train": [("gpt2-small", [(32, "none"), (16, "none"), (8, "none"), (8, "dots")]),
              ("gpt2-medium", [(32, "none"), (16, "none"), (8, "none"), (8, "dots")])],
    "train_args": ["model.dtype=bfloat16", "--steps", "10", "--warmup", "2"],
    "attention": ["--dtype", "bfloat16", "--impls", "cudnn,blockwise", "--lengths", "2048,4096,8192,16384,32768",
                  "--heads", "12", "--head-dim", "64", "--repeats", "5", "--max-gib", "120"],
    "sample": ["--config", "gpt2-small", "--batches", "1,8,32", "--new-tokens", "256", "--prompt-len", "64",
               "--modes", "cache", "model.dtype=bfloat16"],
    "vs_torch": ["--device", "cuda", "--bf16", "--n-layer", "12", "--d-model", "768", "--n-head", "12",
                 "--block", "1024", "--vocab", "50257", "--batch", "16", "--steps", "10", "--rounds", "3"],
    "timeout": {"train": 150, "attention": 180, "sample": 90, "vs_torch": 240},
}
TINY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=64",
              "model.vocab_size=512"]
TINY = {
    "train": [("gpt2-small", [(4, "none")]), ("gpt2-medium", [(4, "none")])],
    # dropout off: the toy run checks the section's plumbing, and compiles a third faster without it
    "train_args": TINY_MODEL + ["model.embd_pdrop=0", "model.attn_pdrop=0", "model.resid_pdrop=0", "--steps", "2",
                                "--warmup", "1"],
    "attention": ["--impls", "cudnn,blockwise", "--lengths", "256", "--window", "64", "--heads", "2",
                  "--head-dim", "16", "--repeats", "1"],
    "sample": ["--config", "tiny", "--batches", "2", "--new-tokens", "8", "--prompt-len", "4", "--modes", "cache",
               "--repeats", "1"] + TINY_MODEL,
    "vs_torch": ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--block", "32", "--vocab", "256",
                 "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "1", "--no-compile"],
    "timeout": {"train": 120, "attention": 120, "sample": 120, "vs_torch": 180},
}


def run(script: str, args: list[str], timeout: float) -> dict:
    """One benchmark subprocess writing --json; its rows, or why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": round(time.time() - t0, 1)}
        secs = round(time.time() - t0, 1)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"ok": False, "error": " | ".join(tail)[-600:], "seconds": secs}
        text = out.read_text()
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:  # bench/attention.py appends one JSON line per row
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {"ok": True, "result": rows, "seconds": secs}


def train_section(plan: dict) -> dict:
    out = {}
    for preset, tries in plan["train"]:
        attempts = []
        for batch, remat in tries:
            r = run("train_throughput.py", ["--config", preset, f"batch_size={batch}", f"model.remat={remat}",
                                            "mesh.fsdp=1", *plan["train_args"]], plan["timeout"]["train"])
            attempts.append({"batch_size": batch, "remat": remat, **({"error": r["error"]} if not r["ok"] else {})})
            if r["ok"]:
                out[preset] = {**r["result"], "attempts": attempts}
                break
        else:
            out[preset] = {"ok": False, "attempts": attempts}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_bench.json", help="the JSON to write")
    p.add_argument("--tiny", action="store_true", help="toy sizes: checks every section runs (CI, on the CPU)")
    p.add_argument("--sections", default="train,attention,sample,vs_torch")
    args = p.parse_args(argv)
    plan = TINY if args.tiny else FULL
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    import jax

    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "host": platform.node(),
                 "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "python": platform.python_version(), "sections": {}}
    t0 = time.time()
    for s in sections:
        print(f"[{time.time() - t0:6.0f} s] {s} ...", flush=True)
        if s == "train":
            res["sections"][s] = train_section(plan)
        elif s == "attention":
            res["sections"][s] = run("attention.py", plan["attention"], plan["timeout"]["attention"])
        elif s == "sample":
            res["sections"][s] = run("generate.py", plan["sample"], plan["timeout"]["sample"])
        elif s == "vs_torch":
            res["sections"][s] = run("compare_torch.py", plan["vs_torch"], plan["timeout"]["vs_torch"])
        else:
            raise SystemExit(f"unknown section '{s}' (train, attention, sample, vs_torch)")
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")  # what is done so far survives a later hang
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for preset, r in res["sections"].get("train", {}).items():
        if "tokens_per_s" in r:
            mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            print(f"train {preset}: batch {r['batch_size']} remat {r['remat']}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {mfu}")
        else:
            print(f"train {preset}: failed ({r['attempts'][-1].get('error', '')[:200]})")
    vt = res["sections"].get("vs_torch", {})
    if vt.get("ok"):
        print(f"vs torch: {vt['result']['tokens_per_s']}")
    print(f"wrote {args.out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # sections are separate processes anyway
    sys.exit(main())
