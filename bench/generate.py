"""Sampling speed with and without the KV cache, batch 1 and 8: new tokens per second after compilation.

  python bench/generate.py                                  # the tiny preset, random weights, CPU
  python bench/generate.py --run runs/tiny                  # a trained run's weights and config
  python bench/generate.py --config gpt2-small --batches 1,8 --new-tokens 256 --modes cache   # GPU

"cache" is gptjax.generate.generate (prefill, then compiled decode chunks over the KV cache); "no-cache"
recomputes the forward pass over the whole [B, block_size] window for every token. Greedy decoding unless
--temperature is set; no end-of-text stop, so every row produces exactly --new-tokens tokens. Each number is the median of
--repeats timed runs after one warm-up run that compiles. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset for random weights (ignored with --run)")
    p.add_argument("--run", default=None, help="a run directory: its config and latest checkpoint")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="cache,no-cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args()

    from gptjax import config as config_lib
    from gptjax.generate import generate, generate_uncached
    from gptjax.model import init_params

    if args.run:
        from gptjax.eval.scoring import load_run

        r = load_run(args.run, overrides=args.overrides)
        cfg, params = r.cfg.model, r.params
    else:
        cfg = config_lib.resolve(args.config, args.overrides).model
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    print(f"model {cfg.name}: {cfg.n_layer} layers, d_model {cfg.d_model}, context {cfg.block_size}, "
          f"pattern {','.join(cfg.attention_pattern)}; {jax.devices()[0].device_kind} x {len(jax.devices())}, "
          f"jax {jax.__version__}")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}"
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, {how}")
    rng = np.random.default_rng(0)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [list(rng.integers(0, cfg.vocab_size, args.prompt_len)) for _ in range(B)]
        for mode in args.modes.split(","):
            if mode == "cache":
                fn = lambda: generate(cfg, params, prompts, args.new_tokens, batch_size=B, **sampling)  # noqa: E731
            elif mode == "no-cache":
                fn = lambda: generate_uncached(cfg, params, prompts, args.new_tokens, **sampling)  # noqa: E731
            else:
                raise SystemExit(f"unknown mode {mode!r}: use cache, no-cache")
            t0 = time.perf_counter()
            out = fn()
            warm = time.perf_counter() - t0
            assert all(len(o) == args.new_tokens for o in out)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            rows.append({"batch": B, "mode": mode, "seconds": s, "tokens_per_s": B * args.new_tokens / s,
                         "first_run_s": warm})
            print(f"batch {B:3d}  {mode:9s}  {s:8.3f} s  {B * args.new_tokens / s:10.1f} tokens/s  "
                  f"(first run, compiling: {warm:.1f} s)", flush=True)
    for B in sorted({r["batch"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["batch"] == B}
        if {"cache", "no-cache"} <= set(by):
            print(f"batch {B}: the cache is {by['cache']['tokens_per_s'] / by['no-cache']['tokens_per_s']:.1f}x faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_lib.to_dict(cfg), "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
