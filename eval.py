"""Evaluate a trained run: held-out loss, perplexity, bits per byte; any text file; a sample.

  python eval.py runs/tiny                         # latest checkpoint, the run's held-out split
  python eval.py runs/tiny --step 200 --json out.json
  python eval.py runs/tiny --text some_file.py
  python eval.py runs/tiny --prompt "def main(" --temperature 0.8 --top-k 40 --max-tokens 200

The checkpoint is restored onto whatever devices exist (the mesh is rebuilt here; override with
mesh.data=... mesh.tensor=...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--text", default=None, help="evaluate this text file instead of the held-out split")
    p.add_argument("--prompt", default=None, help="print a sample continuing this prompt")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch (default: the training micro-batch)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. mesh.tensor=2")
    args = p.parse_args(argv)

    from gptjax import config as config_lib
    from gptjax.checkpoint import CheckpointError
    from gptjax.data import DataError

    try:
        results = evaluate(args)
    except (config_lib.ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def evaluate(args) -> dict:
    import numpy as np

    from gptjax import config as config_lib
    from gptjax import data as data_lib
    from gptjax.checkpoint import CheckpointError, Checkpoints
    from gptjax.evaluate import bits_per_byte, eval_batch_size, evaluate_windows, heldout
    from gptjax.generate import sample
    from gptjax.sharding import make_mesh
    from gptjax.train_lib import make_trainer

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; pass a run directory written by train.py")
    ckpts = Checkpoints(run_dir, read_only=True)
    steps = ckpts.all_steps()
    if not steps:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint; train first (python train.py run_dir={run_dir})")
    step = args.step if args.step is not None else steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {ckpts.dir}; available steps: {steps}")

    # The checkpoint's own config, rebuilt for the devices here.
    stored = config_lib.from_dict(config_lib.TrainConfig, ckpts.config(step))
    cfg = config_lib.apply_overrides(stored, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"] + list(args.overrides))
    mesh = make_mesh(cfg.mesh)
    trainer = make_trainer(cfg, mesh)
    _, state = ckpts.restore(trainer.abstract_state(), step, params_only=True)
    params = state["params"]
    tok = data_lib.Tokenizer(run_dir / "tokenizer.model")
    bs = eval_batch_size(cfg, mesh, args.batch_size)
    T = cfg.model.block_size
    results: dict = {"run_dir": str(run_dir), "step": step, "model": cfg.model.name}

    if args.text:
        raw = Path(args.text).read_bytes()
        ids = tok.encode(raw.decode("utf-8", errors="replace"))
        if len(ids) < 2:
            raise data_lib.DataError(f"{args.text} is too short to evaluate (fewer than two tokens)")
        batches = data_lib.windows([np.asarray(ids)], T, bs)
        r = evaluate_windows(trainer.eval, params, batches, trainer.eval_batch_sharding,
                             total=math.ceil(len(ids) / T / bs))
        r["bits_per_byte"] = bits_per_byte(r["loss"], len(ids), len(raw))
        r["gzip_bits_per_byte"] = data_lib.gzip_bits_per_byte(raw)
        results.update(split=f"text:{args.text}", **r)
    else:
        data_json = run_dir / "data.json"
        data_dir = Path(json.loads(data_json.read_text())["data_dir"]) if data_json.exists() else None
        if data_dir is None or not (data_dir / "manifest.json").exists():
            data_dir = data_lib.prepare(cfg.data, cfg.model.vocab_size)
        td = data_lib.TokenData(data_dir)
        r = heldout(trainer, params, td, batch_size=args.batch_size)
        r["gzip_bits_per_byte"] = data_lib.gzip_bits_per_byte((data_dir / "val.txt").read_bytes())
        results.update(split="val", **r)

    print(f"{results['split']} @ step {step}: loss {results['loss']:.4f} nats/token, perplexity "
          f"{results['perplexity']:.2f}, {results['bits_per_byte']:.4f} bits/byte "
          f"(gzip -9: {results['gzip_bits_per_byte']:.4f}) over {results['tokens']:,} tokens")

    if args.prompt is not None:
        new = sample(cfg.model, params, tok.encode(args.prompt), args.max_tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed, stop_id=tok.eot_id)
        results["sample"] = args.prompt + tok.decode(new)
        print("-" * 60 + "\n" + results["sample"] + "\n" + "-" * 60)
    return results


if __name__ == "__main__":
    sys.exit(main())
