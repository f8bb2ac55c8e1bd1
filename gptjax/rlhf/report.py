"""The InstructGPT demonstration's tables and plots, from the run directories and JSON files the stages wrote.

  python rlhf.py report --out docs/instructgpt --reward runs/igpt/reward --rank-report runs/igpt/val_rankings.jsonl
      --ppo PPO=runs/igpt/ppo --ppo PPO-ptx=runs/igpt/ppo-ptx --bon runs/igpt/bon.json
      --eval pretrained=runs/igpt/eval-pre.json --eval SFT=runs/igpt/eval-sft.json ...

writes OUT/report.json (every number below), OUT/tables.md (markdown tables), OUT/overoptimisation.png (proxy and
true score against sqrt(KL) for best-of-n and each PPO run's held-out evaluations) and OUT/ppo.png (each PPO run's
held-out true score, win rate against SFT, KL and reward-model score against the iteration).

Reward model: held-out pairwise accuracy of each labeler's rankings and, pooled by prompt, of the training and the
held-out labelers (code_task.TRAIN_LABELERS / HELDOUT_LABELERS), beside the labelers' agreement on those samples
(the rank report). PPO vs SFT: the first evaluation of a PPO run is the SFT policy itself (the same samples), so
each run's step-0 row is SFT's. The alignment tax: eval.py --json results (held-out bits per byte, the built-in
zero/few-shot tasks) of each named run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptjax.errors import DataError


def _read(path, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {p} is not valid JSON ({e}); rerun the command that wrote it") from None


def _named(specs: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        if "=" not in s:
            raise DataError(f"--{what} {s}: give NAME=PATH (e.g. --{what} PPO=runs/igpt/ppo)")
        name, path = s.split("=", 1)
        out.append((name, path))
    return out


def _pool(summary: dict, names) -> tuple[float | None, float | None, int]:
    """Accuracy, standard error and prompts of the records of `names`, pooled by prompt (each labeler's records are
    distinct prompts: a weighted mean, and the standard errors combined)."""
    n = [summary.get(f"val_prompts/{x}") or 0 for x in names]
    acc = [summary.get(f"val_acc/{x}") for x in names]
    se = [summary.get(f"val_acc_se/{x}") for x in names]
    tot = sum(n)
    if not tot or any(a is None for a, k in zip(acc, n) if k):
        return None, None, tot
    mean = sum(a * k for a, k in zip(acc, n) if k) / tot
    var = sum((s or 0.0) ** 2 * k * k for s, k in zip(se, n) if k) / tot ** 2
    return mean, math.sqrt(var), tot


def reward_table(reward_dir, rank_report) -> dict:
    from gptjax.rlhf import code_task

    s = _read(Path(reward_dir) / "summary.json", "the reward run's summary")
    out = {"val_acc": s.get("val_acc"), "val_acc_se": s.get("val_acc_se"), "val_prompts": s.get("val_prompts"),
           "val_acc_at_step_0": s.get("val_acc_at_step_0"), "per_labeler": {}}
    for lab in code_task.LABELERS:
        if s.get(f"val_acc/{lab.name}") is not None:
            out["per_labeler"][lab.name] = {"acc": s[f"val_acc/{lab.name}"], "se": s.get(f"val_acc_se/{lab.name}"),
                                            "prompts": s.get(f"val_prompts/{lab.name}")}
    for group, labs in (("train", code_task.TRAIN_LABELERS), ("heldout", code_task.HELDOUT_LABELERS)):
        acc, se, n = _pool(s, [x.name for x in labs])
        out[group] = {"acc": acc, "se": se, "prompts": n}
    if rank_report:
        out["agreement"] = _read(rank_report, "the rank report")["agreement"]
    return out


def ppo_rows(ppo_dir) -> dict:
    s = _read(Path(ppo_dir) / "summary.json", "the PPO run's summary")
    if "true_score" not in s.get("at_step_0", {}):
        raise DataError(f"{ppo_dir} has no policy evaluations on the held-out prompts (a DPO run trained without "
                        f"--reward?); rerun it with --reward RM_RUN to put it beside PPO")
    return {"history": s["history"], "first": s["at_step_0"], "last": {k: v for k, v in s.items()
                                                                      if k not in ("history", "at_step_0", "lineage")}}


def _fmt(x, se=None, digits=3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def tables_md(rep: dict) -> str:
    lines = []
    r = rep.get("reward")
    if r:
        lines += ["| held-out rankings by | pairwise accuracy | prompts |", "|---|---|---|"]
        for g, label in (("train", "training labelers"), ("heldout", "held-out labelers")):
            lines.append(f"| {label} | {_fmt(r[g]['acc'], r[g]['se'])} | {r[g]['prompts']} |")
        for name, v in r["per_labeler"].items():
            lines.append(f"| {name} | {_fmt(v['acc'], v['se'])} | {v['prompts']} |")
        lines.append(f"| all (at step 0, before training) | {_fmt(r['val_acc_at_step_0'])} | {r['val_prompts']} |")
        ag = r.get("agreement")
        if ag:
            lines += ["", f"Labelers' agreement on these samples: all six {_fmt(ag['all'])}, training labelers "
                          f"{_fmt(ag['train'])}, held-out {_fmt(ag['heldout'])}, training vs held-out "
                          f"{_fmt(ag['train_vs_heldout'])}."]
        lines.append("")
    runs = rep.get("ppo", {})
    if runs:
        feats = [k for k in next(iter(runs.values()))["last"] if k.startswith("feat/")]
        head = ["policy", "true score", "reward model", "win rate vs SFT", "KL (nats/seq)", "ended"] + \
            [f[5:] for f in feats]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        first = next(iter(runs.values()))["first"]
        rows = [("SFT", first)] + [(name, v["last"]) for name, v in runs.items()]
        for name, m in rows:
            lines.append("| " + " | ".join([name, _fmt(m["true_score"], m.get("true_score_se")),
                                            _fmt(m["rm_score"], m.get("rm_score_se")),
                                            _fmt(m["win_rate"], m.get("win_rate_se")), _fmt(m["kl"], m.get("kl_se"), 2),
                                            _fmt(m["ended"], None, 2)] + [_fmt(m[f], None, 3) for f in feats]) + " |")
        lines.append("")
    b = rep.get("bon")
    if b:
        lines += ["| best-of-n | sqrt(KL) | reward model | true score |", "|---|---|---|---|"]
        for c in b["curve"]:
            lines.append(f"| {c['n']} | {c['sqrt_kl']:.3f} | {_fmt(c['rm_score'], c['rm_score_se'])} | "
                         f"{_fmt(c['true_score'], c['true_score_se'])} |")
        lines.append("")
    ev = rep.get("evals")
    if ev:
        tasks = sorted({(t, k) for e in ev.values() for t, by in e.get("tasks", {}).items() for k in by})
        head = ["run", "held-out bits/byte"] + [f"{t} {k}-shot acc" for t, k in tasks]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, e in ev.items():
            cells = [name, _fmt(e.get("bits_per_byte"), None, 4)]
            for t, k in tasks:
                m = e.get("tasks", {}).get(t, {}).get(k, {})
                cells.append(_fmt(m.get("acc"), m.get("acc_stderr")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(rep: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, (ax_p, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    b = rep.get("bon")
    if b:
        x = [c["sqrt_kl"] for c in b["curve"]]
        for ax, key in ((ax_p, "rm_score"), (ax_t, "true_score")):
            ax.errorbar(x, [c[key] for c in b["curve"]], yerr=[c[f"{key}_se"] or 0 for c in b["curve"]],
                        marker="o", capsize=2, label="best-of-n (n = 1, 2, 4, ...)", color="black")
    for i, (name, v) in enumerate(rep.get("ppo", {}).items()):
        h = v["history"]
        x = [e["sqrt_kl"] for e in h]
        for ax, key in ((ax_p, "rm_score"), (ax_t, "true_score")):
            ax.errorbar(x, [e[key] for e in h], yerr=[e.get(f"{key}_se") or 0 for e in h], marker="s", capsize=2,
                        label=f"{name} (held-out evaluations)", color=f"C{i}")
    ax_p.set(xlabel="sqrt(KL to the SFT policy) (sqrt nats)", ylabel="reward-model score (proxy)",
             title="proxy reward")
    ax_t.set(xlabel="sqrt(KL to the SFT policy) (sqrt nats)", ylabel="true score (labelers' noise-free mean)",
             title="true (labeler) score")
    for ax in (ax_p, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Reward over-optimisation on held-out prompts (Gao et al. 2022's axes)")
    fig.tight_layout()
    p = out / "overoptimisation.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    runs = rep.get("ppo", {})
    if runs:
        keys = [("true_score", "true score"), ("win_rate", "held-out labelers' win rate vs SFT"),
                ("kl", "KL to SFT (nats / sequence)"), ("rm_score", "reward-model score")]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        for i, (name, v) in enumerate(runs.items()):
            h = v["history"]
            for ax, (k, label) in zip(axes, keys):
                ax.errorbar([e["step"] for e in h], [e[k] for e in h], yerr=[e.get(f"{k}_se") or 0 for e in h],
                            marker="o", capsize=2, label=name, color=f"C{i}")
                ax.set(xlabel="PPO iteration (DPO: step)", title=label)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        p = out / "ppo.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def make_report(out, *, reward=None, rank_report=None, ppo=(), bon=None, evals=(), log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep: dict = {}
    if reward:
        rep["reward"] = reward_table(reward, rank_report)
    if ppo:
        rep["ppo"] = {name: ppo_rows(path) for name, path in _named(list(ppo), "ppo")}
    if bon:
        rep["bon"] = _read(bon, "the best-of-n file")
    if evals:
        rep["evals"] = {name: _read(path, "the eval.py --json file") for name, path in _named(list(evals), "eval")}
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "tables.md").write_text(tables_md(rep) + "\n")
    for p in plots(rep, out):
        log(f"wrote {p}")
    log(f"wrote {out / 'report.json'} and {out / 'tables.md'}")
    return rep
