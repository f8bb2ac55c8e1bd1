"""Evaluate a trained or imported run: held-out loss, perplexity, bits per byte; zero- and few-shot tasks;
any text file; samples.

  python eval.py runs/tiny                                     # latest checkpoint, the run's held-out split
  python eval.py runs/tiny --tasks code-nextline,code-cloze --shots 0,1,5 --json scores.json
  python eval.py runs/tiny --tasks hellaswag:hellaswag_val.jsonl --limit 500 --skip-heldout
  python eval.py runs/tiny --step 200 --text some_file.py
  python eval.py runs/tiny --prompt "def main(" --prompt "import " --temperature 0.8 --top-p 0.95 --stop "\\n\\n"

A run written by finetune.py is scored on its task instead (its validation split, or --tasks FILE,... of the same
task), with its best checkpoint unless --step is given.

Tasks: code-nextline and code-cloze are built in (generated from the built-in corpus's held-out split);
a JSONL file in one of the documented formats, FORMAT:FILE, or a task spec .json (docs/evaluation.md).

The checkpoint is restored onto whatever devices exist (the mesh is rebuilt here; override with
mesh.data=... mesh.tensor=...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from gptjax.generate import add_sampling_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train.py (or convert.py from-hf)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--text", default=None, help="evaluate this text file instead of the held-out split")
    p.add_argument("--skip-heldout", action="store_true", help="do not evaluate the held-out split")
    p.add_argument("--tasks", default=None, help="comma-separated tasks: built-ins (code-nextline, code-cloze), "
                                                 "JSONL files, FORMAT:FILE or task spec .json files")
    p.add_argument("--shots", default="0", help="comma-separated numbers of solved examples before each item")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items of each task")
    p.add_argument("--num-items", type=int, default=500, help="items generated for each built-in task")
    p.add_argument("--prompt", action="append", default=None, help="print a sample continuing this prompt "
                                                                   "(repeatable: prompts are sampled as one batch)")
    add_sampling_flags(p)
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch (default: the training micro-batch)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. mesh.tensor=2")
    args = p.parse_args(argv)

    from gptjax.errors import run_command

    try:
        shots = [int(s) for s in args.shots.split(",") if s.strip()]
        if not shots or min(shots) < 0:
            raise ValueError
    except ValueError:
        print(f"error: --shots takes comma-separated whole numbers >= 0, e.g. 0,1,5 (got {args.shots!r})",
              file=sys.stderr)
        return 2
    return run_command(_main, args, shots)


def _main(args, shots: list[int]) -> None:
    results = run_eval(args, shots)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def heldout_text(cfg) -> bytes:
    """The held-out documents of the run's corpus, joined as data.prepare joins them (its val.txt)."""
    from gptjax.data import split_documents

    return "\n".join(split_documents(cfg.data)[1]).encode("utf-8")


def token_cache(run):
    """The run's prepared token data (a TokenData, or a Mixture for a run on data.mixture), if its tokens are the
    run's own (made with the run's tokenizer), else None. The run's data.json names the caches; without it, a
    train.py run's corpus is prepared again (found in the cache if it is still there)."""
    from gptjax import data as data_lib
    from gptjax.config import read_json
    from gptjax.errors import DataError

    try:
        own = data_lib.fingerprint(data_lib.load_tokenizer(run.run_dir).files)
    except DataError:
        return None
    data_json = run.run_dir / "data.json"
    handle = read_json(data_json, f"{run.run_dir}") if data_json.exists() else {}
    dirs = [Path(handle["data_dir"])] if "data_dir" in handle else []
    dirs += [Path(e["data_dir"]) for e in handle.get("mixture", [])]
    if not dirs or not all((d / "manifest.json").exists() for d in dirs):
        if not (run.run_dir / "tokenizer.model").exists():  # not trained here (imported, or data.tokenizer): none
            return None
        if run.cfg.data.mixture:
            handle = {"mixture": data_lib.prepare_mixture(run.cfg.data, run.cfg.model.vocab_size)}
        else:
            handle = {"data_dir": str(data_lib.prepare(run.cfg.data, run.cfg.model.vocab_size))}
    td = data_lib.Mixture(handle["mixture"]) if handle.get("mixture") else data_lib.TokenData(handle["data_dir"])
    return td if td.manifest["tokenizer"]["sha256"] == own else None


def eval_finetuned(args) -> dict:
    """A fine-tuned run: its task's metrics on its own validation split, or on the --tasks files (same task)."""
    from gptjax.finetune.evaluate import evaluate_run

    files = [s.strip() for s in (args.tasks or "").split(",") if s.strip()]
    r = evaluate_run(args.run_dir, step=args.step, val_files=files)
    print(f"{r['task']} @ step {r['step']} ({r['checkpoint']}):")
    for split, m in r["metrics_by_split"].items():
        shown = ", ".join(f"{k} {m[k]:.4f} ± {m[k + '_stderr']:.4f}" for k in m if f"{k}_stderr" in m)
        print(f"  {split}: {shown} (n={m['n']})")
    return r


def run_eval(args, shots: list[int]) -> dict:
    from gptjax.finetune.evaluate import is_finetuned

    if is_finetuned(args.run_dir):
        return eval_finetuned(args)
    import numpy as np

    from gptjax import data as data_lib
    from gptjax.eval import tasks as tasks_lib
    from gptjax.eval.scoring import Scorer, bits_per_byte, eval_batch_size, heldout, load_run, mean_nats
    from gptjax.generate import check_sampling, cut_at_stop, generate, unescape

    if args.prompt:  # refused before anything is loaded or scored
        prompts = [unescape(p) for p in args.prompt]
        stop = [unescape(s, "a --stop text") for s in args.stop]
        check_sampling(args.temperature, args.top_k, args.top_p)
    run = load_run(args.run_dir, args.step, args.overrides)
    cfg, tok, step = run.cfg, run.tokenizer, run.step
    results: dict = {"run_dir": str(run.run_dir), "step": step, "model": cfg.model.name}

    def eval_text(raw: bytes, name: str) -> dict:
        ids = tok.encode(raw.decode("utf-8", errors="replace"))
        if len(ids) < 2:
            raise data_lib.DataError(f"{name} is too short to evaluate (fewer than two tokens)")
        bs, T = eval_batch_size(cfg, run.mesh, args.batch_size), cfg.model.block_size
        r = mean_nats(run.trainer.eval_step, run.params, data_lib.windows([np.asarray(ids)], T, bs),
                             run.trainer.eval_batch_sharding, total=math.ceil(len(ids) / T / bs))
        r["bits_per_byte"] = bits_per_byte(r["loss"], len(ids), len(raw))
        r["gzip_bits_per_byte"] = data_lib.gzip_bits_per_byte(raw)
        return r

    if args.text or not args.skip_heldout:
        if args.text:
            results.update(split=f"text:{args.text}", **eval_text(Path(args.text).read_bytes(), args.text))
        else:
            td = token_cache(run)
            if td is not None:  # a train.py run: its own token cache (a mixture: all its sources' held-out tokens)
                r = heldout(run.trainer, run.params, td, batch_size=args.batch_size)
                val = b"\n".join((p.path / "val.txt").read_bytes() for p in getattr(td, "parts", [td]))
                r["gzip_bits_per_byte"] = data_lib.gzip_bits_per_byte(val)
            else:  # an imported model with its own tokenizer: the same held-out text in its tokens
                r = eval_text(heldout_text(cfg), "the held-out split")
            results.update(split="val", **r)
        print(f"{results['split']} @ step {step}: loss {results['loss']:.4f} nats/token, perplexity "
              f"{results['perplexity']:.2f}, {results['bits_per_byte']:.4f} bits/byte "
              f"(gzip -9: {results['gzip_bits_per_byte']:.4f}) over {results['tokens']:,} tokens")

    if args.tasks:
        scorer = Scorer(run, batch_size=args.batch_size)
        scores: dict = {}
        for spec in [s.strip() for s in args.tasks.split(",") if s.strip()]:
            task = tasks_lib.resolve(spec, cfg.data, n=args.num_items, seed=0)
            scores[task.name] = {}
            for k in ([0] if task.kind == "perplexity" else shots):
                t0 = time.time()
                m = tasks_lib.score_task(task, scorer, tok, shots=k, limit=args.limit)
                m["seconds"] = round(time.time() - t0, 2)
                scores[task.name][k] = m
                if m.get("truncated"):
                    print(f"warning: {task.name} {k}-shot: {m['truncated']} of the scored sequences were longer "
                          f"than the {cfg.model.block_size}-token context and lost their beginning", file=sys.stderr)
        results["tasks"] = scores
        print(tasks_lib.table(scores))

    if args.prompt:
        t0 = time.time()
        new = generate(cfg.model, run.params, [tok.encode(p) or [tok.eot_id] for p in prompts], args.max_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       eot_id=tok.eot_id, stop=stop, decode=tok.decode,
                       batch_size=min(len(prompts), 8))
        results["samples"] = [p + cut_at_stop(tok.decode(n), stop) for p, n in zip(prompts, new)]
        for s in results["samples"]:
            print("-" * 60 + "\n" + s)
        print("-" * 60 + f"\n{sum(map(len, new))} tokens in {time.time() - t0:.1f}s (compile included)")
        results["sample"] = results["samples"][0]
    return results


if __name__ == "__main__":
    sys.exit(main())
