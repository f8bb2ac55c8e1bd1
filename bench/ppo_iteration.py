"""Where a PPO iteration's time goes: generation (the compiled KV-cache sampler), scoring (the reward model and the
labelers) and the update (reference log-probs, values, advantages and the PPO epochs), and rollout tokens/s.

  python bench/ppo_iteration.py --sft runs/igpt/sft --reward runs/igpt/reward --iterations 6 --out ppo_timing.json
  python bench/ppo_iteration.py --from-run runs/igpt/ppo        # the split of a PPO run that already trained

Runs a short PPO run (rlhf.py ppo with the given settings) into a temporary directory, or reads a finished run's
metrics.jsonl, and prints the median seconds per iteration of each part over the iterations after the first (which
compiles). Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

PARTS = ("time/generate", "time/score", "time/update")


def split_of(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = {r["step"]: r for r in recs if "loss" in r and "time/update" in r}
    steps = sorted(train)[1:] or sorted(train)  # the first iteration compiles
    med = {k: statistics.median(train[s][k] for s in steps) for k in PARTS + ("rollout_tokens_per_s",
                                                                             "response_tokens")}
    total = sum(med[k] for k in PARTS)
    cfg = json.loads((run_dir / "config.json").read_text())
    return {"run_dir": str(run_dir), "iterations_measured": len(steps), "prompts": cfg["prompts"],
            "max_new_tokens": cfg["max_new_tokens"], "ppo_epochs": cfg["ppo_epochs"], "minibatch": cfg["minibatch"],
            "seconds_per_iteration": total, **{k.split("/")[1] + "_seconds": med[k] for k in PARTS},
            **{k.split("/")[1] + "_share": med[k] / total for k in PARTS},
            "rollout_tokens_per_s": med["rollout_tokens_per_s"], "response_tokens_per_rollout": med["response_tokens"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", help="the SFT run")
    p.add_argument("--reward", help="the reward-model run")
    p.add_argument("--from-run", help="a PPO run directory to read instead of training one")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more PPO settings")
    args = p.parse_args(argv)
    if args.from_run:
        out = split_of(Path(args.from_run))
    else:
        if not (args.sft and args.reward):
            p.error("give --sft and --reward (or --from-run)")
        from gptjax.rlhf.config import resolve_ppo
        from gptjax.rlhf.ppo_stage import train_ppo

        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "ppo"
            cfg = resolve_ppo([f"init_from={args.sft}", f"reward={args.reward}", f"run_dir={run}",
                               f"iterations={args.iterations}", f"prompts={args.prompts}",
                               f"minibatch={args.minibatch}", f"max_new_tokens={args.max_new_tokens}",
                               "eval_every=0", "eval_samples=1", *args.overrides])
            train_ppo(cfg, log=lambda *a: None)
            out = split_of(run)
    import gptjax  # noqa: F401  (first: on a machine without a TPU it keeps an installed libtpu quiet)
    import jax

    out["device"] = str(jax.devices()[0].device_kind)
    for k, v in out.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
