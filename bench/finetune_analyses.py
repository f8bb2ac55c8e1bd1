"""GPT-1's two fine-tuning analyses (Radford et al. 2018) on the built-in tasks, from a pretrained run:

  Table 5's shape    pretrained + aux LM (λ = 0.5), pretrained without it (λ = 0), and the same recipe from a
                     random initialisation, on every built-in task; with the zero-shot score of the pretrained
                     model (by likelihood, gptjax/finetune/zeroshot.py) and a trivial baseline beside them.
  Figure 2 (left)    accuracy against the number of pretrained layers transferred (embeddings + the first k
                     blocks, k = 0 ... L) on one task.

  python bench/finetune_analyses.py runs/tiny --out docs/finetune          # the measured figures in docs/finetune.md
  python bench/finetune_analyses.py runs/tiny --size code-body=300:128     # another size for one task
  python bench/finetune_analyses.py runs/tiny --seed 1 --tasks code-package,code-follows --layers-task '' \
      --runs runs/ft-analyses-seed1 --out docs/finetune/seed1                 # a second seed of two tasks

Every fine-tuning run is an ordinary run directory under --runs (rerunning skips the finished ones), made by
`python finetune.py` in a child process with its log beside it (RUN.log). With --jobs 2 (the default
on a machine with 2 or more cores) two runs go at once, each pinned to its own core: on the 2-core machine that
finishes a pair of runs in 216 s instead of 2 x 138 s, because a small model's step, its compiles and its
evaluations do not keep two cores busy. Writes OUT/results.json, OUT/table5.png and OUT/figure2.png, and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROWS = (("pretrained, λ=0.5", "pretrained", 0.5), ("pretrained, λ=0", "pretrained", 0.0),
        ("random init, λ=0.5", "random", 0.5))
# training items and max_len per task, sized so each run trains on about 200k tokens (3 epochs): one row per item
# for classification and entailment, two (both orders) for similarity, four (one per choice) for multiple choice.
# Inputs are cut to max_len longest segment first (the hypothesis and the choices never); code-body's choices
# are never cut, so it gets the longer rows and leaves out (drop_long) the items whose body does not fit.
SIZES = {"code-package": (1000, 64), "code-follows": (1000, 64), "code-renamed": (500, 64), "code-body": (250, 96)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the pretrained run (the main job's: runs/tiny)")
    p.add_argument("--out", default="docs/finetune", help="folder for results.json and the plots")
    p.add_argument("--runs", default="runs/ft-analyses", help="folder for the fine-tuning run directories")
    p.add_argument("--tasks", default="code-package,code-follows,code-renamed,code-body")
    p.add_argument("--layers-task", default="code-follows", help="the task of the layer-transfer curve")
    p.add_argument("--size", action="append", default=[], metavar="TASK=N_TRAIN:MAX_LEN",
                   help=f"training items and max_len of a task (default {SIZES})")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="one learning rate for every run (GPT-1's 6.25e-5 barely moves a 4M model in 100 steps)")
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="fine-tuning runs at once, each pinned to its own core")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of every run and of the tasks' items (train and validation) and zero-shot's")
    p.add_argument("--plot-only", action="store_true", help="redraw OUT's plots and table from OUT/results.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning overrides for every run")
    args = p.parse_intermixed_args(argv)
    from gptjax.errors import run_command

    return run_command(run, args)


def _sizes(specs: list[str]) -> dict:
    from gptjax.errors import ConfigError

    sizes = dict(SIZES)
    for spec in specs:
        name, _, rest = spec.partition("=")
        n, _, m = rest.partition(":")
        if not (name in SIZES and n.isdigit() and m.isdigit()):
            raise ConfigError(f"--size {spec!r}: expected TASK=N_TRAIN:MAX_LEN with TASK one of {', '.join(SIZES)}")
        sizes[name] = (int(n), int(m))
    return sizes


def _run_pool(jobs: list[tuple[Path, list[str]]], n_procs: int, log) -> None:
    """Run `python finetune.py OVERRIDES run_dir=DIR` for every job without a summary.json, n_procs at
    a time, each child pinned to one core when n_procs > 1; a failed child stops the pool and names its log."""
    from gptjax.procpool import Job, run_pool

    todo = [Job(str(d), "import runpy; sys.argv[0] = 'finetune.py'; "
                "runpy.run_module('gptjax.cli.finetune', run_name='__main__')", [*o, f"run_dir={d}"],
                d.parent / f"{d.name}.log") for d, o in jobs if not (d / "summary.json").exists()]
    done, t_pool = len(jobs) - len(todo), time.time()

    def finished(job, seconds: float) -> None:
        nonlocal done
        done += 1
        run_dir = Path(job.name)
        s = json.loads((run_dir / "summary.json").read_text())
        m = s["best"]["metric"]
        log(f"  [{done}/{len(jobs)}] {run_dir.name}: final {m} {s[f'val_{m}']:.4f}, "
            f"{seconds:.0f} s (pool {time.time() - t_pool:.0f} s)")

    run_pool(todo, n_procs, on_done=finished, what="fine-tuning")


def run(args) -> int:
    if args.plot_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        results.setdefault("layers_task", args.layers_task)
        _report(results, Path(args.out))
        return 0
    from gptjax import config as config_lib
    from gptjax.eval.scoring import Scorer, load_run
    from gptjax.finetune import metrics as metrics_lib
    from gptjax.finetune.builtin import builtin_task
    from gptjax.finetune.zeroshot import zero_shot

    t_start = time.time()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sizes = _sizes(args.size)
    base = [args.run_dir, f"n_val={args.n_val}", f"optim.lr={args.lr}", "drop_long=true", f"seed={args.seed}"
            ] + list(args.overrides)
    parent_cfg = config_lib.load_json(Path(args.run_dir) / "config.json")
    results: dict = {"run_dir": args.run_dir, "settings": base, "sizes": {}, "layers_task": args.layers_task,
                     "table5": {}, "figure2": {}}
    jobs: list[tuple[Path, list[str]]] = []
    rows: dict = {}

    def job(tag: str, name: str, extra: list[str]) -> Path:
        n_train, max_len = sizes[name]
        results["sizes"][name] = {"n_train": n_train, "max_len": max_len}
        jobs.append((runs / tag, base + [f"task={name}", f"n_train={n_train}", f"max_len={max_len}"] + extra))
        return runs / tag

    # the zero-shot scores first (this process, every core), then the fine-tuning runs (child processes)
    run = load_run(args.run_dir)
    scorer = Scorer(run, batch_size=32, progress=False)
    for name in tasks:
        task = builtin_task(name, parent_cfg.data, n_train=sizes[name][0], n_val=args.n_val, seed=args.seed)
        key = task.metrics[0]
        row = {"metric": key, "baseline": metrics_lib.baseline(task)}
        t0 = time.time()
        row["zero-shot"] = zero_shot(task, scorer, run.tokenizer)
        print(f"{name}: zero-shot {key} {row['zero-shot'][key]:.4f} ({time.time() - t0:.0f} s)", flush=True)
        rows[name] = (row, [(label, job(f"{name}-{init}-lm{lam:g}", name, [f"init={init}", f"lm_coef={lam}"]))
                            for label, init, lam in ROWS])
    layers: dict = {}
    if args.layers_task:
        name, L = args.layers_task, parent_cfg.model.n_layer
        for k in range(L + 1):
            if k == L and name in rows:
                layers[k] = runs / f"{name}-pretrained-lm0.5"
            else:
                extra = ["init=pretrained", "lm_coef=0.5"] + ([] if k == L else [f"transfer_layers={k}"])
                layers[k] = job(f"{name}-pretrained-lm0.5" if k == L else f"{name}-layers{k}", name, extra)
    print(f"{len(jobs)} fine-tuning runs, {args.jobs} at a time:", flush=True)
    _run_pool(jobs, args.jobs, print)

    for name, (row, cells) in rows.items():
        key = row["metric"]
        for label, run_dir in cells:
            s = json.loads((run_dir / "summary.json").read_text())
            info = json.loads((run_dir / "finetune.json").read_text())
            row.update(n_train=info["n_train"], n_val=info["n_val"], dropped=info["dropped"])
            # the score at the end of training (no selection on the validation set it is reported on)
            row[label] = {key: s[f"val_{key}"], "stderr": s[f"val_{key}_stderr"], "best": s["best"]["value"],
                          "best_step": s["best"]["step"], "steps": s["step"], "train_seconds": s["train_seconds"]}
        results["table5"][name] = row
    for k, run_dir in layers.items():
        s = json.loads((run_dir / "summary.json").read_text())
        m = s["best"]["metric"]
        results["figure2"][k] = {"value": s[f"val_{m}"], "metric": m, "stderr": s[f"val_{m}_stderr"]}
    results["seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    _report(results, out)
    return 0


def _report(results: dict, out: Path) -> None:
    """OUT/table5.png and OUT/figure2.png from results.json's numbers, and the Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Table 5's shape: one group of bars per task, ± one standard error
    names = list(results["table5"])
    series = ["zero-shot"] + [r[0] for r in ROWS] + ["baseline"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        cells = [results["table5"][n][s] for n in names]
        keys = [results["table5"][n]["metric"] for n in names]
        errs = [c.get("stderr", c.get(f"{k}_stderr")) or 0 for c, k in zip(cells, keys)]
        ax.bar([i + j * width for i in range(len(names))], [c[k] for c, k in zip(cells, keys)], width, label=s,
               yerr=errs, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))],
                  [f"{n}\n({results['table5'][n]['metric']}, {results['table5'][n]['n_val']} val)" for n in names])
    ax.set_ylabel("validation score (end of training)")
    ax.set_title("Table 5's ablations on the built-in tasks (± 1 s.e.)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "table5.png", dpi=120)
    plt.close(fig)
    layers_task = results.get("layers_task")
    if results["figure2"]:
        ks = sorted(results["figure2"], key=int)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        vals = [results["figure2"][k]["value"] for k in ks]
        errs = [results["figure2"][k]["stderr"] or 0 for k in ks]
        ax.errorbar([int(k) for k in ks], vals, yerr=errs, marker="o", capsize=3, label="fine-tuned (± 1 s.e.)")
        ax.set_xticks([int(k) for k in ks])
        t5 = results["table5"].get(layers_task)
        if t5:
            ax.axhline(t5["baseline"][t5["metric"]], ls=":", color="gray", label="majority class")
            ax.axhline(t5["zero-shot"][t5["metric"]], ls="--", color="C2", label="zero-shot")
        ax.set_xlabel("pretrained blocks transferred (embeddings always)")
        ax.set_ylabel(f"validation {results['figure2'][ks[0]]['metric']}")
        ax.set_title(f"Figure 2 (left): {layers_task}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "figure2.png", dpi=120)
        plt.close(fig)
    print("\n| task | metric | baseline | zero-shot | " + " | ".join(r[0] for r in ROWS) + " |")
    print("|---|---|---|---|" + "---|" * len(ROWS))
    for n in names:
        r = results["table5"][n]
        k = r["metric"]
        print(f"| {n} | {k} | {r['baseline'][k]:.3f} | {r['zero-shot'][k]:.3f} | "
              + " | ".join(f"{r[x[0]][k]:.3f}" for x in ROWS) + " |")
    if results["figure2"]:
        print("\nlayers transferred: " + ", ".join(f"{k}: {v['value']:.3f}" for k, v in results["figure2"].items()))
    files = [out / "results.json", out / "table5.png"] + ([out / "figure2.png"] if results["figure2"] else [])
    print(f"\n{results['seconds'] / 60:.1f} minutes; " + ", ".join(map(str, files)))


if __name__ == "__main__":
    sys.exit(main())
