"""Training curves of one or more runs from their metrics.jsonl (matplotlib, Agg; plot.py is the command):
training and held-out loss, the learning rate and tokens/s against the step, then one panel for every other
held-out metric the runs logged (bits per byte, a fine-tuning task's accuracy or F1, ...). One colour per run,
labelled by its run directory."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

from gptjax.errors import CheckpointError, DataError

TRAIN_PANELS = (("loss", "loss (nats/token)"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))
# not an eval panel of their own: drawn elsewhere (val_loss beside the training loss, gzip as bits/byte's baseline,
# X_stderr as X's error bars), or not a curve (val_n, the number of items scored)
NOT_CURVES = ("step", "time", "val_loss", "gzip_bits_per_byte", "val_n")


def read_metrics(run_dir: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train, eval): step -> record. Training records are the ones with a loss. The last record per step wins
    (a resumed run rewrites the steps after its checkpoint); a line that does not parse (torn by a kill) is
    skipped."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; pass run directories that train.py or finetune.py wrote")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no metrics.jsonl: it is not a run directory, or its run has not logged "
                              f"a step yet; pass run directories that train.py or finetune.py wrote")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if "loss" in rec:
            train[step] = rec
        else:  # evaluations at one step (an in-loop one, then the final one) add up
            evals.setdefault(step, {}).update(rec)
    if not train and not evals:
        raise DataError(f"{path} holds no metrics records (it is empty, or holds only a line torn by a kill); let "
                        f"the run log a step and plot again")
    return train, evals


def _curve(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in sorted(records.items())
           if isinstance(r.get(key), numbers.Real) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def eval_keys(runs: list[tuple[dict, dict]]) -> list[str]:
    """The held-out metrics beside val_loss that some run logged, each drawn in a panel of its own."""
    keys = {k for _, evals in runs for r in evals.values() for k, v in r.items()
            if k not in NOT_CURVES and not k.endswith("_stderr") and isinstance(v, numbers.Real)
            and not isinstance(v, bool)}
    return sorted(keys)


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draw `run_dirs` into one PNG: `out`, else RUN_DIR/plot.png for one run and ./plot.png for several."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    runs = [read_metrics(d) for d in run_dirs]  # every directory is checked before anything is drawn
    extra = eval_keys(runs)
    panels = [*TRAIN_PANELS, *((k, f"held-out {k[4:]}" if k.startswith("val_") else k) for k in extra)]
    cols = 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, (d, (train, evals)) in enumerate(zip(run_dirs, runs)):
        color, label = f"C{i % 10}", str(d)
        for ax, (key, _) in zip(axes, panels):
            src = train if key in dict(TRAIN_PANELS) else evals
            x, y = _curve(src, key)
            xe, err = _curve(src, f"{key}_stderr")
            if x and xe == x:
                ax.errorbar(x, y, yerr=err, color=color, label=label, marker="o", ms=4, capsize=2)
            elif x:
                ax.plot(x, y, color=color, label=label, marker="o" if len(x) < 3 else None, ms=4)
            if key == "loss":  # held-out loss on the same axes as the training loss
                x, y = _curve(evals, "val_loss")
                if x:
                    ax.plot(x, y, color=color, ls="--", marker="o", ms=4, label=f"{label} (held-out)")
            if key == "val_bits_per_byte":  # gzip -9 on the same text, the baseline a model must beat
                _, y = _curve(evals, "gzip_bits_per_byte")
                if y:
                    ax.axhline(y[-1], color=color, ls=":", lw=1, label=f"{label} (gzip -9)")
    last = max((s for train, evals in runs for s in (*train, *evals)), default=1)
    for ax, (key, title) in zip(axes, panels):
        ax.set_xlim(0, last * 1.02 or 1)  # one step axis for every panel, even one with a single point
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out) if out else (Path(run_dirs[0]) / "plot.png" if len(run_dirs) == 1 else Path("plot.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
