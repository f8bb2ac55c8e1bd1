"""Held-out loss by position in the context, and the in-context-learning score, of trained runs.

    python bench/icl_score.py RUN [RUN ...]                       # the latest checkpoint of each
    python bench/icl_score.py RUN --all-steps --json out.json     # every kept checkpoint of RUN: the score over training

Olsson et al. (2022, "In-context learning and induction heads") measure in-context learning as the loss late in
the context minus the loss early in it: a model that uses what the context already holds (copying an identifier
from the lines above, the way induction heads do) predicts late tokens much better than early ones. Their score
is the loss at token 500 minus the loss at token 50 of 512; with a context of T tokens this script takes the mean
loss over the last T/8 positions minus the mean over positions T/16 .. T/8 (16 of 128 at T = 128: positions
112-127 against 8-15). A score that grows sharply more negative at a point in training is their phase change.

Every held-out token is predicted once, in windows of T + 1 tokens with stride T (the windows `eval.py` uses),
so the overall mean equals `eval.py`'s held-out loss. Prints a table; `--json` writes the per-position losses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bands(T: int) -> dict[str, tuple[int, int]]:
    """Position ranges [lo, hi) the table reports; 'early' and 'late' make the ICL score."""
    e = max(T // 16, 1)
    return {"0": (0, 1), "1-7": (1, min(8, T)), "early": (e, 2 * e), "mid": (T // 4, T // 2), "late": (T - 2 * e, T)}


def token_nll(cfg):
    """A jitted (params, tokens [B, T+1]) -> nats of each predicted token [B, T], padded vocabulary rows masked."""
    import jax
    import jax.numpy as jnp

    from gptjax.model import forward, vocab_mask

    mask = vocab_mask(cfg)

    @jax.jit
    def nll(params, tokens):
        lp = jax.nn.log_softmax(forward(cfg, params, tokens[:, :-1]) + mask, axis=-1)
        return -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]

    return nll


def per_position(run) -> tuple[list[float], list[int]]:
    """Mean held-out nats at each context position of a restored run (gptjax.eval.scoring.Run), and the number of
    tokens at each position."""
    import jax.numpy as jnp
    import numpy as np

    from gptjax.cli.eval import token_cache
    from gptjax.errors import DataError
    from gptjax.eval.scoring import eval_batch_size

    td = token_cache(run)
    if td is None:
        raise DataError(f"{run.run_dir} has no token cache of its own (an imported model?); this needs a train.py run")
    T = run.cfg.model.block_size
    nll = token_nll(run.cfg.model)
    total, count = np.zeros(T), np.zeros(T)
    for tokens, weights in td.eval_windows(seq_len=T, batch_size=eval_batch_size(run.cfg, run.mesh)):
        x = np.asarray(nll(run.params, jnp.asarray(tokens)))
        total += (x * weights).sum(0)
        count += weights.sum(0)
    return [float(v) for v in total / np.maximum(count, 1)], [int(c) for c in count]


def summary(losses: list[float], counts: list[int]) -> dict:
    """The bands' mean losses, the ICL score (late - early) and the overall mean (every held-out token once)."""
    import numpy as np

    x, c = np.asarray(losses), np.asarray(counts, float)
    out = {name: float((x[lo:hi] * c[lo:hi]).sum() / c[lo:hi].sum()) for name, (lo, hi) in bands(len(x)).items()}
    out["icl_score"] = out["late"] - out["early"]
    out["mean"] = float((x * c).sum() / c.sum())
    out["tokens"] = int(c.sum())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (train.py runs)")
    ap.add_argument("--all-steps", action="store_true", help="every kept checkpoint of each run, not only the latest")
    ap.add_argument("--json", help="write every run's per-position losses and summary here")
    ap.add_argument("--plot", help="write a PNG here: each run's loss by position (its latest checkpoint), and with "
                                   "--all-steps the ICL score against tokens seen")
    args = ap.parse_args(argv)

    from gptjax.errors import GptjaxError
    from gptjax.eval.scoring import load_run

    rows, records = [], []
    try:
        for rd in args.runs:
            steps = _steps(rd) if args.all_steps else [None]
            for step in steps:
                run = load_run(rd, step)
                losses, counts = per_position(run)
                s = summary(losses, counts)
                T = len(losses)
                records.append({"run": str(rd), "step": run.step, "tokens_seen": run.step * run.cfg.batch_size * T,
                                "parameters": _n_params(run.params), "per_position": losses, "counts": counts, **s})
                rows.append((rd, run.step, s))
    except GptjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b = bands(len(records[0]["per_position"]))
    print(f"{'run':<40} {'step':>6} {'mean':>7} " + " ".join(f"{k + ' ' + str(v[0]) + '-' + str(v[1] - 1):>13}"
                                                      for k, v in b.items()) + f" {'ICL score':>10}")
    for rd, step, s in rows:
        print(f"{str(rd)[-40:]:<40} {step:>6} {s['mean']:>7.4f} " + " ".join(f"{s[k]:>13.4f}" for k in b)
              + f" {s['icl_score']:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    if args.plot:
        plot(records, args.plot)
    return 0


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = list(dict.fromkeys(r["run"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in runs:
        last = [r for r in records if r["run"] == name][-1]
        x, c = np.asarray(last["per_position"]), np.asarray(last["counts"], float)
        k = 8  # positions per point: one position's loss is noisy (about 1,300 windows of held-out text)
        pos = np.arange(0, len(x), k)
        sm = [(x[i:i + k] * c[i:i + k]).sum() / c[i:i + k].sum() for i in pos]
        label = f"{Path(name).name} ({last['parameters'] / 1e3:.0f}K, step {last['step']})"
        axes[0].plot(pos + (k - 1) / 2, sm, marker=".", label=label)
        steps = [r for r in records if r["run"] == name]
        axes[1].plot([r["tokens_seen"] for r in steps], [r["icl_score"] for r in steps], marker="o", label=label)
    axes[0].set(xlabel="position in the context (mean of 8)", ylabel="held-out loss (nats/token)",
                title="loss by position, latest checkpoint")
    axes[1].set(xscale="log", xlabel="tokens seen", ylabel="ICL score: late - early (nats)",
                title="in-context learning score over training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _steps(run_dir) -> list[int]:
    from gptjax.checkpoint import complete_steps

    return complete_steps(Path(run_dir) / "checkpoints") or [None]


def _n_params(params) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


if __name__ == "__main__":
    sys.exit(main())
