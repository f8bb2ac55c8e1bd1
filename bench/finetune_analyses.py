"""GPT-1's two fine-tuning analyses (Radford et al. 2018) on the built-in tasks, from a pretrained run:

  Table 5's shape    pretrained + aux LM (λ = 0.5), pretrained without it (λ = 0), and the same recipe from a
                     random initialisation, on every built-in task; with the zero-shot score of the pretrained
                     model (by likelihood, gptjax/finetune/zeroshot.py) and a trivial baseline beside them.
  Figure 2 (left)    accuracy against the number of pretrained layers transferred (embeddings + the first k
                     blocks, k = 0 ... L) on one task.

  python bench/finetune_analyses.py runs/tiny --out docs/finetune          # the measured figures in docs/finetune.md

Every fine-tuning run is an ordinary run directory under --runs (rerunning skips the finished ones). Writes
OUT/results.json, OUT/table5.png and OUT/figure2.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROWS = (("pretrained, λ=0.5", "pretrained", 0.5), ("pretrained, λ=0", "pretrained", 0.0),
        ("random init, λ=0.5", "random", 0.5))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the pretrained run (the main job's: runs/tiny)")
    p.add_argument("--out", default="docs/finetune", help="folder for results.json and the plots")
    p.add_argument("--runs", default="runs/ft-analyses", help="folder for the fine-tuning run directories")
    p.add_argument("--tasks", default="code-package,code-follows,code-renamed,code-body")
    p.add_argument("--layers-task", default="code-follows", help="the task of the layer-transfer curve")
    p.add_argument("--n-train", type=int, default=500, help="training items per task")
    p.add_argument("--mc-n-train", type=int, default=250, help="training items for multiple choice (4 rows each)")
    p.add_argument("--lr", type=float, default=2.5e-4,
                   help="one learning rate for every run (GPT-1's 6.25e-5 barely moves a 4M model in 50 steps)")
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning overrides for every run")
    args = p.parse_intermixed_args(argv)
    from gptjax.errors import run_command

    return run_command(run, args)


def _finetune(base: list[str], run_dir: Path, extra: list[str], log) -> dict:
    from gptjax.finetune.config import resolve
    from gptjax.finetune.stage import finetune

    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    t0 = time.time()
    s = finetune(resolve(base + extra + [f"run_dir={run_dir}"]), log=lambda *_: None)
    log(f"  {run_dir.name}: {s['best']['metric']} {s['best']['value']:.4f} (best @ {s['best']['step']}), "
        f"{time.time() - t0:.0f} s")
    return s


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptjax import config as config_lib
    from gptjax.eval.scoring import Scorer, load_run
    from gptjax.finetune import metrics as metrics_lib
    from gptjax.finetune.builtin import builtin_task
    from gptjax.finetune.zeroshot import zero_shot

    t_start = time.time()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    base = [f"init_from={args.run_dir}", f"n_val={args.n_val}", f"max_len={args.max_len}", f"optim.lr={args.lr}",
            "drop_long=true"] + list(args.overrides)
    parent_cfg = config_lib.load_json(Path(args.run_dir) / "config.json")
    results: dict = {"run_dir": args.run_dir, "settings": base, "table5": {}, "figure2": {}}
    run = load_run(args.run_dir)
    scorer = Scorer(run, batch_size=32, progress=False)
    for name in tasks:
        print(f"{name}:", flush=True)
        n_train = args.mc_n_train if name == "code-body" else args.n_train
        task = builtin_task(name, parent_cfg.data, n_train=n_train, n_val=args.n_val)
        key = task.metrics[0]
        row = {"metric": key, "n_train": len(task.train), "n_val": len(task.val),
               "baseline": metrics_lib.baseline(task)}
        t0 = time.time()
        row["zero-shot"] = zero_shot(task, scorer, run.tokenizer)
        print(f"  zero-shot: {key} {row['zero-shot'][key]:.4f} ({time.time() - t0:.0f} s)", flush=True)
        for label, init, lam in ROWS:
            tag = f"{name}-{init}-lm{lam:g}"
            s = _finetune(base, runs / tag, [f"task={name}", f"init={init}", f"lm_coef={lam}", f"n_train={n_train}"],
                          print)
            info = json.loads((runs / tag / "finetune.json").read_text())
            row.update(n_train=info["n_train"], n_val=info["n_val"], dropped=info["dropped"])
            best_step = s["best"]["step"]
            # the score at the end of training (no selection on the validation set it is reported on)
            row[label] = {key: s[f"val_{key}"], "stderr": s[f"val_{key}_stderr"], "best": s["best"]["value"],
                          "best_step": best_step, "steps": s["step"], "train_seconds": s["train_seconds"]}
        results["table5"][name] = row
    if args.layers_task:
        name = args.layers_task
        print(f"layers transferred, {name}:", flush=True)
        L = parent_cfg.model.n_layer
        for k in range(L + 1):
            tag = f"{name}-pretrained-lm0.5" if k == L else f"{name}-layers{k}"
            extra = [f"task={name}", "init=pretrained", "lm_coef=0.5", f"n_train={args.n_train}"] + (
                [] if k == L else [f"transfer_layers={k}"])
            s = _finetune(base, runs / tag, extra, print)
            m = s["best"]["metric"]
            results["figure2"][k] = {"value": s[f"val_{m}"], "metric": m, "stderr": s[f"val_{m}_stderr"]}
    results["seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    # Table 5's shape: one group of bars per task
    names = list(results["table5"])
    series = ["zero-shot"] + [r[0] for r in ROWS] + ["baseline"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        vals = [results["table5"][n][s][results["table5"][n]["metric"]] for n in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))],
                  [f"{n}\n({results['table5'][n]['metric']})" for n in names])
    ax.set_ylabel("validation score (end of training)")
    ax.set_title("Table 5's ablations on the built-in tasks")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "table5.png", dpi=120)
    plt.close(fig)
    if results["figure2"]:
        ks = sorted(results["figure2"])
        fig, ax = plt.subplots(figsize=(5.5, 4))
        vals = [results["figure2"][k]["value"] for k in ks]
        errs = [results["figure2"][k]["stderr"] or 0 for k in ks]
        ax.errorbar(ks, vals, yerr=errs, marker="o", capsize=3, label="fine-tuned")
        t5 = results["table5"].get(args.layers_task)
        if t5:
            ax.axhline(t5["baseline"][t5["metric"]], ls=":", color="gray", label="majority class")
            ax.axhline(t5["zero-shot"][t5["metric"]], ls="--", color="C2", label="zero-shot")
        ax.set_xlabel("pretrained layers transferred (embeddings always)")
        ax.set_ylabel(f"validation {results['figure2'][ks[0]]['metric']}")
        ax.set_title(f"Figure 2 (left): {args.layers_task}")
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
    print(f"\n{results['seconds'] / 60:.1f} minutes; {out / 'results.json'}, {out / 'table5.png'}, {out / 'figure2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
