"""GPT-1's two fine-tuning analyses (Radford et al. 2018) on the built-in tasks, from a pretrained run, over seeds:

  Table 5's shape    pretrained + aux LM (λ = 0.5), pretrained without it (λ = 0), and the same recipe from a
                     random initialisation, on every built-in task; with the zero-shot score of the pretrained
                     model (by likelihood, gptjax/finetune/zeroshot.py), a trivial baseline and, for multiple
                     choice, a model-free identifier-overlap reference beside them; and the two ablations as
                     paired differences per seed (pretraining, aux LM).
  Figure 2 (left)    accuracy against the number of pretrained layers transferred (embeddings + the first k
                     blocks, k = 0 ... L) on one task.

  python bench/finetune_analyses.py runs/tiny --out docs/finetune          # the measured figures in docs/finetune.md
  python bench/finetune_analyses.py runs/tiny --out docs/finetune --plot-only   # redraw from results.json
  python bench/finetune_analyses.py runs/tiny --size code-body=300:128     # another size for one task
  python bench/finetune_analyses.py runs/tiny --seed 0 --tasks code-package --layers-task ''   # one seed, one task

Each seed (--seeds, default 0,1,2) draws new training and validation items, a new head and new batches; every
cell is the mean over the seeds, ± the larger of the spread over seeds and the items' own standard error, with
the per-seed values in results.json. Every fine-tuning run is an ordinary run directory under --runs (rerunning
skips the finished ones), made by `python finetune.py` in a child process with its log beside it (RUN.log).
With --jobs 2 (the default on a machine with 2 or more cores) two runs go at once, each pinned to its own core:
on the 2-core machine a pair of the main job's code-follows / code-package runs finishes in 62 s instead of
2 x 39 s one after the other, because a small model's step, its compiles and its evaluations do not keep two
cores busy. Writes OUT/results.json, OUT/table5.png and OUT/figure2.png, and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROWS = (("pretrained, λ=0.5", "pretrained", 0.5), ("pretrained, λ=0", "pretrained", 0.0),
        ("random init, λ=0.5", "random", 0.5))
# training items and max_len per task, sized so each run trains on about 200k tokens (3 epochs): one row per item
# for classification and entailment, two (both orders) for similarity, four (one per choice) for multiple choice.
# Inputs are cut to max_len longest segment first (the hypothesis and the choices never); code-body's choices
# are never cut, so it gets the longer rows and leaves out (drop_long) the items whose body does not fit. code-body
# gets 4x the items (about 1M tokens): with 250 (201 left after drop_long) every model stayed at chance, with
# 1,000 (847 left) the pretrained one learns it (docs/finetune.md).
SIZES = {"code-package": (1000, 64), "code-follows": (1000, 64), "code-renamed": (500, 64), "code-body": (1000, 96)}


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
    p.add_argument("--seeds", default="0,1,2",
                   help="seeds, each drawing new training and validation items, a new head and new batches; every "
                        "cell is the mean over them (with the per-seed values in results.json)")
    p.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds N)")
    p.add_argument("--single-seed", default="code-body", metavar="TASKS",
                   help="tasks run with the first seed only: code-body's held-out pool (108 functions) is smaller "
                        "than n_val, so every seed draws nearly the same validation items")
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


def _mean_se(values: list[float], stderrs: list[float]) -> tuple[float, float]:
    """The mean over seeds of a score, and its standard error: the larger of the spread over seeds (std / sqrt n)
    and the items' own standard error of the mean (sqrt(sum se^2) / n). Seeds that draw the same validation items
    (a task whose held-out pool is smaller than n_val) vary less than independent samples would, so the spread
    alone would understate the error; one seed has only the items' error."""
    n = len(values)
    m = sum(values) / n
    se_items = math.sqrt(sum(s * s for s in stderrs)) / n
    se_seeds = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return m, max(se_items, se_seeds)


def _cell(values: list[float], stderrs: list[float], key: str, **extra) -> dict:
    m, se = _mean_se(values, stderrs)
    return {key: m, "stderr": se, "seeds": values, "seed_stderrs": stderrs, **extra}


def aggregate(per_seed: dict, seeds: list[int]) -> dict:
    """Table 5's and Figure 2's cells over seeds from each seed's scores.

    per_seed[seed] = {"table5": {task: {"metric", "baseline", "zero-shot", ROW label: {metric, "stderr", ...}}},
    "figure2": {k: {"value", "stderr", "metric"}}}. Each cell becomes the mean over the seeds that ran it, with
    `_mean_se`'s error and the per-seed values; "effects" holds, per task and seed, the paired differences
    the paper's ablations are about (pretrained - random init at λ = 0.5; λ = 0.5 - λ = 0, pretrained)."""
    table5, effects, figure2 = {}, {}, {}
    tasks = list(dict.fromkeys(t for s in seeds for t in per_seed[s]["table5"]))
    for name in tasks:
        have = [s for s in seeds if name in per_seed[s]["table5"]]
        rows = [per_seed[s]["table5"][name] for s in have]
        key = rows[0]["metric"]
        cell = {"metric": key, "seeds": have, "n_train": [r["n_train"] for r in rows],
                "n_val": [r["n_val"] for r in rows], "dropped": [r["dropped"] for r in rows]}
        for col in ("baseline", "zero-shot"):
            cell[col] = _cell([r[col][key] for r in rows], [r[col].get(f"{key}_stderr") or 0.0 for r in rows], key,
                              name=rows[0][col].get("name") or rows[0][col].get("how", ""))
        for label, _, _ in ROWS:
            cell[label] = _cell([r[label][key] for r in rows], [r[label]["stderr"] for r in rows], key,
                                steps=[r[label]["steps"] for r in rows])
        if "reference" in rows[0]:
            cell["reference"] = _cell([r["reference"][key] for r in rows],
                                      [r["reference"][f"{key}_stderr"] for r in rows], key, name=rows[0]["reference"]["name"])
        table5[name] = cell
        eff = {}
        for what, (a, b) in (("pretraining", (ROWS[0][0], ROWS[2][0])), ("aux_lm", (ROWS[0][0], ROWS[1][0]))):
            d = [r[a][key] - r[b][key] for r in rows]
            se = [math.hypot(r[a]["stderr"], r[b]["stderr"]) for r in rows]
            m, s = _mean_se(d, se)
            eff[what] = {"mean": m, "stderr": s, "seeds": d, "positive": sum(x > 0 for x in d), "of": len(d)}
        effects[name] = eff
    f2 = {s: {int(k): v for k, v in per_seed[s]["figure2"].items()} for s in seeds}  # JSON keys are strings
    for k in sorted({k for s in seeds for k in f2[s]}):
        cells = [f2[s][k] for s in seeds if k in f2[s]]
        m, se = _mean_se([c["value"] for c in cells], [c["stderr"] or 0.0 for c in cells])
        figure2[k] = {"value": m, "stderr": se, "metric": cells[0]["metric"], "seeds": [c["value"] for c in cells]}
    return {"table5": table5, "effects": effects, "figure2": figure2}


def overlap_reference(task) -> dict:
    """A model-free reference for a multiple-choice task: the choice that shares the most identifiers with the
    context and question (ties broken at random, seeded). On code-body it measures how much of the task is
    copying: a body usually uses its signature's argument names."""
    import keyword
    import random
    import re

    import numpy as np

    from gptjax.finetune import metrics as metrics_lib

    ident = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")

    def names(text: str) -> set[str]:
        return {w for w in ident.findall(text) if not keyword.iskeyword(w)} - {"self", "cls", "None", "True", "False"}

    rng = random.Random(f"overlap-{task.name}")
    preds = []
    for ex in task.val:
        have = names(" ".join(ex.segments))
        scores = [len(have & names(c)) for c in ex.choices]
        preds.append(rng.choice([i for i, s in enumerate(scores) if s == max(scores)]))
    m = metrics_lib.score(("acc",), np.asarray(preds), np.asarray([ex.label for ex in task.val]))
    return {"name": "identifier overlap (no model)", **m}


def _seed_list(args) -> list[int]:
    from gptjax.errors import ConfigError

    spec = str(args.seed) if args.seed is not None else args.seeds
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {spec!r}: expected distinct integers separated by commas, e.g. --seeds 0,1,2")
    return seeds


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
    single = {t.strip() for t in args.single_seed.split(",") if t.strip()}
    seeds = _seed_list(args)
    sizes = _sizes(args.size)
    base = [args.run_dir, f"n_val={args.n_val}", f"optim.lr={args.lr}", "drop_long=true"] + list(args.overrides)
    parent_cfg = config_lib.load_json(Path(args.run_dir) / "config.json")
    results: dict = {"run_dir": args.run_dir, "settings": base, "seeds": seeds, "single_seed": sorted(single),
                     "sizes": {}, "layers_task": args.layers_task}
    jobs: list[tuple[Path, list[str]]] = []
    plan: dict = {}  # seed -> (rows: task -> (scores, [(label, run_dir)]), layers: k -> run_dir)

    def job(tag: str, name: str, seed: int, extra: list[str]) -> Path:
        n_train, max_len = sizes[name]
        results["sizes"][name] = {"n_train": n_train, "max_len": max_len}
        jobs.append((runs / tag, base + [f"seed={seed}", f"task={name}", f"n_train={n_train}",
                                         f"max_len={max_len}"] + extra))
        return runs / tag

    # the zero-shot scores first (this process, every core), then the fine-tuning runs (child processes)
    run = load_run(args.run_dir)
    scorer = Scorer(run, batch_size=32, progress=False)
    for i, seed in enumerate(seeds):
        rows, layers = {}, {}
        for name in tasks:
            if i and name in single:
                continue
            task = builtin_task(name, parent_cfg.data, n_train=sizes[name][0], n_val=args.n_val, seed=seed)
            key = task.metrics[0]
            row = {"metric": key, "baseline": metrics_lib.baseline(task)}
            if task.kind == "multiple_choice":
                row["reference"] = overlap_reference(task)
            t0 = time.time()
            row["zero-shot"] = zero_shot(task, scorer, run.tokenizer)
            print(f"seed {seed}, {name}: zero-shot {key} {row['zero-shot'][key]:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
            rows[name] = (row, [(label, job(f"{name}-{init}-lm{lam:g}-s{seed}", name, seed,
                                             [f"init={init}", f"lm_coef={lam}"])) for label, init, lam in ROWS])
        if args.layers_task and not (i and args.layers_task in single):
            name, L = args.layers_task, parent_cfg.model.n_layer
            for k in range(L + 1):
                if k == L and name in rows:
                    layers[k] = runs / f"{name}-pretrained-lm0.5-s{seed}"
                else:
                    extra = ["init=pretrained", "lm_coef=0.5"] + ([] if k == L else [f"transfer_layers={k}"])
                    tag = f"{name}-pretrained-lm0.5-s{seed}" if k == L else f"{name}-layers{k}-s{seed}"
                    layers[k] = job(tag, name, seed, extra)
        plan[seed] = (rows, layers)
    print(f"{len(jobs)} fine-tuning runs, {args.jobs} at a time:", flush=True)
    _run_pool(jobs, args.jobs, print)

    per_seed: dict = {}
    for seed, (rows, layers) in plan.items():
        t5, f2 = {}, {}
        for name, (row, cells) in rows.items():
            key = row["metric"]
            for label, run_dir in cells:
                s = json.loads((run_dir / "summary.json").read_text())
                info = json.loads((run_dir / "finetune.json").read_text())
                row.update(n_train=info["n_train"], n_val=info["n_val"], dropped=info["dropped"])
                # the score at the end of training (no selection on the validation set it is reported on)
                row[label] = {key: s[f"val_{key}"], "stderr": s[f"val_{key}_stderr"], "best": s["best"]["value"],
                              "best_step": s["best"]["step"], "steps": s["step"], "train_seconds": s["train_seconds"]}
            t5[name] = row
        for k, run_dir in layers.items():
            s = json.loads((run_dir / "summary.json").read_text())
            m = s["best"]["metric"]
            f2[k] = {"value": s[f"val_{m}"], "metric": m, "stderr": s[f"val_{m}_stderr"]}
        per_seed[seed] = {"table5": t5, "figure2": f2}
    results.update(aggregate(per_seed, seeds))
    results["per_seed"] = per_seed
    results["seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    _report(results, out)
    return 0


def _report(results: dict, out: Path) -> None:
    """OUT/table5.png and OUT/figure2.png from results.json's numbers, and the Markdown tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results.get("seeds", [0])
    # Table 5's shape: one group of bars per task, the mean over seeds ± one standard error
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
    refs = [(i, results["table5"][n]["reference"]) for i, n in enumerate(names) if "reference" in results["table5"][n]]
    for i, ref in refs:
        ax.hlines(ref["acc"], i - width / 2, i + (len(series) - 0.5) * width, colors="k", linestyles="--", lw=1,
                  label=ref["name"] if i == refs[0][0] else None)

    def seeds_of(n):
        k = len(results["table5"][n].get("seeds", [0]))
        return f"{k} seed{'s' if k > 1 else ''}"

    def n_val(n):
        v = results["table5"][n]["n_val"]
        return v[0] if isinstance(v, list) else v

    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))],
                  [f"{n}\n({results['table5'][n]['metric']}, {n_val(n)} val, {seeds_of(n)})" for n in names],
                  fontsize=8)
    ax.set_ylabel("validation score (end of training)")
    ax.set_title("Table 5's ablations on the built-in tasks (mean over seeds ± 1 s.e.)")
    ax.set_ylim(0, 1.25)  # the legend's band above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper center")
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
        ax.errorbar([int(k) for k in ks], vals, yerr=errs, marker="o", capsize=3,
                    label=f"fine-tuned, mean of {len(results['figure2'][ks[0]].get('seeds', [0]))} (± 1 s.e.)")
        for k in ks:
            ys = results["figure2"][k].get("seeds", [])
            ax.scatter([int(k)] * len(ys), ys, s=10, color="C0", alpha=0.35)
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

    def pm(c, k):
        return f"{c[k]:.3f} ± {c.get('stderr', c.get(f'{k}_stderr')) or 0:.3f}"

    print(f"\nseeds {', '.join(map(str, seeds))}; each cell the mean over the task's seeds ± one standard error")
    print("\n| task (val items, seeds) | metric | baseline | zero-shot | " + " | ".join(r[0] for r in ROWS) + " |")
    print("|---|---|---|---|" + "---|" * len(ROWS))
    for n in names:
        r = results["table5"][n]
        k = r["metric"]
        ref = f" (identifier overlap, no model: {r['reference'][k]:.3f})" if "reference" in r else ""
        print(f"| {n} ({n_val(n)}, {seeds_of(n)}){ref} | {k} | {r['baseline'][k]:.3f} | {pm(r['zero-shot'], k)} | "
              + " | ".join(pm(r[x[0]], k) for x in ROWS) + " |")
    if results.get("effects"):
        print("\n| task | pretraining (pretrained - random init, λ = 0.5) | aux LM (λ = 0.5 - λ = 0) |")
        print("|---|---|---|")
        for n, e in results["effects"].items():
            cells = [f"{e[w]['mean']:+.3f} ± {e[w]['stderr']:.3f} (per seed "
                     f"{', '.join(f'{x:+.3f}' for x in e[w]['seeds'])}; ahead in {e[w]['positive']} of {e[w]['of']})"
                     for w in ("pretraining", "aux_lm")]
            print(f"| {n} | " + " | ".join(cells) + " |")
    if results["figure2"]:
        print("\nlayers transferred: " + ", ".join(f"{k}: {v['value']:.3f} ± {v['stderr']:.3f}"
                                               for k, v in results["figure2"].items()))
    files = [out / "results.json", out / "table5.png"] + ([out / "figure2.png"] if results["figure2"] else [])
    print(f"\n{results['seconds'] / 60:.1f} minutes; " + ", ".join(map(str, files)))


if __name__ == "__main__":
    sys.exit(main())
