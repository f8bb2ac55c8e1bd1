"""Sample from a trained or imported run with the KV cache.

  python sample.py runs/tiny --prompt "def parse(" --max-tokens 200
  python sample.py runs/tiny --prompt "import os" --prompt "class " --num-samples 4 --top-p 0.95 --stop "\\n\\n\\n"
  python sample.py runs/tiny --prompt "def " --temperature 0 --json samples.json       # greedy

Prompts (and --num-samples copies of each) are decoded together in batches of --batch-size. The same seed,
prompts and batch size give the same samples. --no-cache recomputes the whole forward pass for every token
(the slow reference the cache is checked against).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from gptjax.generate import add_sampling_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train.py (or convert.py from-hf)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (repeatable; default: start from end-of-text)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    add_sampling_flags(p)
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--no-cache", action="store_true", help="recompute the forward pass for every token")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--json", default=None, help="also write the samples to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. mesh.tensor=2")
    args = p.parse_args(argv)

    from gptjax.errors import run_command

    if args.num_samples < 1 or args.batch_size < 1 or args.max_tokens < 0:
        print("error: --num-samples and --batch-size must be at least 1, --max-tokens at least 0", file=sys.stderr)
        return 2
    return run_command(_main, args)


def _main(args) -> None:
    samples = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=2) + "\n")
        print(f"wrote {args.json}")


def run(args) -> dict:
    from gptjax.errors import GenerationError
    from gptjax.eval.scoring import load_run
    from gptjax.generate import check_sampling, cut_at_stop, generate, generate_uncached, unescape

    # the cheap checks come before the run is loaded
    prompts = [unescape(p) for p in (args.prompt or [""])]
    stop = [unescape(s, "a --stop text") for s in args.stop]
    check_sampling(args.temperature, args.top_k, args.top_p)
    r = load_run(args.run_dir, args.step, args.overrides)
    tok = r.tokenizer
    texts = [p for p in prompts for _ in range(args.num_samples)]
    ids = [tok.encode(t) or [tok.eot_id] for t in texts]
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eot_id=tok.eot_id)
    t0 = time.time()
    if args.no_cache:
        if stop:
            raise GenerationError("--stop needs the cache; drop --no-cache")
        new = generate_uncached(r.cfg.model, r.params, ids, args.max_tokens, **kw)
    else:
        new = generate(r.cfg.model, r.params, ids, args.max_tokens, stop=stop, decode=tok.decode,
                       batch_size=min(args.batch_size, len(ids)), **kw)
    seconds = time.time() - t0
    out = [t + cut_at_stop(tok.decode(n), stop) for t, n in zip(texts, new)]
    for s in out:
        print("-" * 60 + "\n" + s)
    n_tok = sum(map(len, new))
    print("-" * 60 + f"\n{len(out)} samples, {n_tok} tokens in {seconds:.1f}s ({n_tok / max(seconds, 1e-9):.1f} tokens/s, "
          f"compile included) from step {r.step} of {r.run_dir}")
    return {"run_dir": str(r.run_dir), "step": r.step, "samples": out, "tokens": n_tok, "seconds": seconds,
            "settings": {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_k", "top_p", "seed")}}


if __name__ == "__main__":
    sys.exit(main())
