"""InstructGPT's comparison data (Ouyang et al. 2022, section 3.5): K completions of each prompt sampled from a policy
(the SFT run), ranked by our programmatic labelers (code_task.py), for the reward model to learn from.

A ranking here vs the paper's:
  paper  a labeler (one of ~40 people) saw one prompt and K = 4..9 model outputs (K varied per prompt) and ranked them
         all; the K(K-1)/2 comparisons of a ranking were one batch element of the reward model.
  here   the policy samples K completions of a code_task prompt (a function's signature, docstring and first body
         line), and one programmatic labeler (round robin over the set given: `--labelers train`, the reward model's
         four, by default) ranks them by its noisy score (`Labeler.rank`: 0 best, equal scores tie); an item all of
         whose ranks tie teaches nothing and is dropped. K is fixed by --k (4..9); k=0 draws each prompt's K from
         4..9 uniformly, seeded by (seed, prompt index), as the paper's varying K.
The records are code_task's format, one JSON object per line:
  {"prompt": str, "completions": [str] * K, "ended": [bool] * K, "ranks": [int] * K, "labeler": str}

A completion (`sample_completions`) is what the compiled KV-cache sampler (generate.generate) writes after the prompt,
cut where it ends:
  - at end-of-text: the sampler stops there and drops the token; ended = True;
  - at the function's end: the first line with a character in column 0 (code_task.function_part) closes the function;
    the text is cut before that line (what follows belongs to the next definition, which no labeler scores and the
    reward model must not read) and ended = True. The sampler stops a row there (its stop strings: "\\n" and a
    printable ASCII character; checked between decode chunks), so a call ends when all its rows have.
  - otherwise (max_new_tokens reached inside the function) ended = False and the text is everything sampled.
So an ended completion is exactly the text the reward model reads before the end-of-text token it appends, and its
text never holds a line in column 0. The prompts end with a newline, so a completion starts at a line's start.

Determinism: prompt i's K rows are rows (i mod P) * Kmax + j of a generate call over prompts [c P, (c + 1) P)
(Kmax rows set aside a prompt: K, or 9 when K varies; P = batch_size // Kmax prompts a call, c = i // P), sampled
with a seed drawn from (seed, c). Rows that belong to no prompt (the unused rows of a prompt with K < Kmax, a skipped
prompt's rows, the last call's missing prompts) copy a real prompt of the call and are thrown away, so no row's place
depends on another prompt. Prompt i's completions are thus a pure function of (seed, i, its tokens, K, batch_size and
the sampling settings), up to float rounding in the call's padded shapes (the longest prompt of the call sets them).

Skipped prompts: one whose tokens and max_new_tokens do not fit the model's context (len + max_new_tokens >
block_size) would make the sampler drop its oldest tokens; it gets no completions (an empty list) and is counted.

The report (`make_rankings`) is the calibration check on real samples: the mean true score of the completions
(code_task.true_score, the noise-free mean of all six labelers) beside the demonstrations' own, the labelers'
mutual agreement (code_task.agreement: over the pairs of completions whose true scores differ, how often two
distinct labelers order them alike; the paper's 72.6% among training labelers, 77.3% held-out), among the labelers
given and among all six, with the training / held-out breakdown. The labelers' noise was calibrated on synthetic
completions; a rate far from 0.75 here says to recalibrate it (code_task.calibrate_noise) on these items.

Deviations from the paper, with reasons: the labelers are programs (no people here); K is one number for every
prompt unless k=0 (a fixed K keeps batches regular); a ranking comes from a noisy score, not a person's joint
judgement of all K; the prompts are code_task's, not user requests.
"""

from __future__ import annotations

import difflib
import json
import math
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.errors import ConfigError, GenerationError
from gptjax.rlhf import code_task
from gptjax.rlhf.code_task import Completion, Labeler

K_RANGE = (4, 9)  # the paper's K
LABELER_SETS = {"train": code_task.TRAIN_LABELERS, "heldout": code_task.HELDOUT_LABELERS, "all": code_task.LABELERS}
# A row's text contains one of these once a line starts in column 0 (the function has closed): the sampler stops.
# (A non-ASCII character in column 0 is not among them: function_part still cuts there, the row only runs on.)
STOP = tuple("\n" + c for c in string.printable if not c.isspace())
_K_DOMAIN, _SEED_DOMAIN = 0x4B, 0x53  # keep the K draws and the sampling seeds apart


# ----------------------------------------------------------------------------------------------
# settings


def labeler_set(spec: str | Sequence[Labeler]) -> tuple[Labeler, ...]:
    """"train" (code_task.TRAIN_LABELERS), "heldout", "all", or comma-separated labeler names; Labelers pass."""
    if not isinstance(spec, str):
        labs = tuple(spec)
        if not labs or not all(isinstance(lab, Labeler) for lab in labs):
            raise ConfigError("labelers must be a non-empty sequence of code_task.Labeler")
        return labs
    if spec in LABELER_SETS:
        return LABELER_SETS[spec]
    by_name = {lab.name: lab for lab in code_task.LABELERS}
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in by_name:
            near = difflib.get_close_matches(name, list(LABELER_SETS) + list(by_name), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}" if near else ""
            raise ConfigError(f"unknown labelers {name!r}{hint}; give {', '.join(LABELER_SETS)} or comma-separated "
                              f"names of {', '.join(by_name)}")
    if not names:
        raise ConfigError(f"no labelers given; give {', '.join(LABELER_SETS)} or names of {', '.join(by_name)}")
    return tuple(dict.fromkeys(by_name[n] for n in names))


def check_k(k: int) -> None:
    lo, hi = K_RANGE
    if not (k == 0 or lo <= k <= hi):
        raise ConfigError(f"k={k}: rank K = {lo}..{hi} completions a prompt (the paper's range), or k=0 to draw K "
                          f"from {lo}..{hi} for each prompt")


def prompt_ks(n: int, k: int, seed: int) -> list[int]:
    """K for each of n prompts: k itself, or (k=0) a uniform draw from 4..9 seeded by (seed, prompt index)."""
    check_k(k)
    if k:
        return [k] * n
    lo, hi = K_RANGE
    return [int(np.random.default_rng([seed, _K_DOMAIN, i]).integers(lo, hi + 1)) for i in range(n)]


def _call_seed(seed: int, call: int) -> int:
    return int(np.random.SeedSequence([seed, _SEED_DOMAIN, call]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------------------------
# sampling


def cut_completion(text: str, saw_eot: bool) -> Completion:
    """(text, ended) of a sampled continuation: cut before the first line in column 0 (the function closed, ended),
    else as it is, ended when the sampler emitted end-of-text."""
    body, closed = code_task.function_part(text)
    return (body, True) if closed else (text, bool(saw_eot))


def _prompt_text(p) -> str:
    return p.prompt if isinstance(p, code_task.Example) else str(p)


def _sample_ids(run, examples: Sequence, k: int | Sequence[int], *, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int, batch_size: int, slots: int | None = None,
                progress: bool = False, desc: str = "sampling") -> list[list[list[int]] | None]:
    """The new token ids of each prompt's K rows (None: skipped, too long for the context); see the module docstring
    for the layout that makes them a pure function of (seed, prompt index)."""
    import jax
    from tqdm.auto import tqdm

    from gptjax.generate import check_sampling, generate

    mcfg, tok = run.cfg.model, run.tokenizer
    T = mcfg.block_size
    ks = [int(k)] * len(examples) if isinstance(k, (int, np.integer)) else [int(x) for x in k]
    if len(ks) != len(examples):
        raise ValueError(f"{len(ks)} values of k for {len(examples)} prompts")
    if any(x < 1 for x in ks):
        raise ConfigError(f"every prompt needs at least one completion, got k={min(ks)}")
    if not 1 <= max_new_tokens < T:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: give 1..{T - 1} (the model's context is {T} tokens, "
                              f"and the prompt needs some of it)")
    if batch_size < 1:
        raise GenerationError(f"batch_size must be at least 1, got {batch_size}")
    check_sampling(temperature, top_k, top_p)
    ids = tok.encode_batch([_prompt_text(p) for p in examples]) if len(examples) else []
    ids = [list(x) or [tok.eot_id] for x in ids]
    fits = [len(x) + max_new_tokens <= T for x in ids]
    kmax = max(ks, default=1) if slots is None else int(slots)
    if kmax < max(ks, default=1):
        raise ValueError(f"slots={slots} is fewer than the largest k, {max(ks)}")
    per_call = max(1, batch_size // kmax)  # prompts a generate call
    rows_per_call = per_call * kmax
    out: list[list[list[int]] | None] = [None] * len(examples)
    bar = tqdm(total=len(examples), desc=desc, unit="prompt", leave=False,
               disable=not progress or jax.process_index() != 0)
    for c, p0 in enumerate(range(0, len(examples), per_call)):
        members = range(p0, min(p0 + per_call, len(examples)))
        kept = [i for i in members if fits[i]]
        if kept:
            filler = ids[kept[0]]  # rows of no prompt: a real prompt's copy, so they finish like real rows do
            rows = [filler] * rows_per_call
            for i in kept:
                base = (i - p0) * kmax
                rows[base:base + ks[i]] = [ids[i]] * ks[i]
            new = generate(mcfg, run.params, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=_call_seed(seed, c), eot_id=tok.eot_id, stop=STOP, decode=tok.decode,
                           batch_size=rows_per_call)
            for i in kept:
                base = (i - p0) * kmax
                out[i] = new[base:base + ks[i]]
        bar.update(len(members))
    bar.close()
    return out


def sample_completions(run, examples: Sequence, k: int | Sequence[int], *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 64, slots: int | None = None,
                       progress: bool = False) -> list[list[Completion]]:
    """K (text, ended) completions of each prompt from a run's policy, with the compiled KV-cache sampler.

    Args:
      run: a restored run (gptjax.eval.scoring.load_run).
      examples: code_task Examples (or prompt strings, each ending with a newline).
      k: completions a prompt, or one count per prompt.
      max_new_tokens: at most this many tokens a completion; a prompt whose tokens leave less room than this in the
        context is skipped: its entry is [] (count them with `sum(not c for c in out)`).
      temperature, top_k (0: off), top_p (1: off): the sampling settings.
      seed: with the prompt's index, batch_size and the settings, determines its completions.
      batch_size: rows a sampler call at most (whole prompts: batch_size // slots prompts, at least one).
      slots: rows set aside for each prompt (default: the largest k); make_rankings gives 9 when K varies, so that
        the layout, and with it each prompt's samples, does not depend on the other prompts' K.
    """
    tok = run.tokenizer
    rows = _sample_ids(run, examples, k, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, batch_size=batch_size, slots=slots, progress=progress)
    return [[] if r is None else [cut_completion(tok.decode(n), len(n) < max_new_tokens) for n in r] for r in rows]


# ----------------------------------------------------------------------------------------------
# rankings


def _nan_to_none(x: float):
    return None if x is None or not math.isfinite(x) else float(x)


def agreement_report(items: Sequence, labelers: Sequence[Labeler]) -> dict:
    """Agreement of distinct labelers on items' completion pairs with distinct true scores (code_task.agreement):
    among `labelers`, among all six, and the paper's training / held-out breakdown. None where undefined."""
    train, held, every = code_task.TRAIN_LABELERS, code_task.HELDOUT_LABELERS, code_task.LABELERS
    return {"labelers": _nan_to_none(code_task.agreement(labelers, labelers, items)),
            "all": _nan_to_none(code_task.agreement(every, every, items)),
            "train": _nan_to_none(code_task.agreement(train, train, items)),
            "heldout": _nan_to_none(code_task.agreement(held, held, items)),
            "train_vs_heldout": _nan_to_none(code_task.agreement(train, held, items))}


def _distinct_pairs(items: Sequence) -> int:
    n = 0
    for ex, comps in items:
        t = np.array([code_task.true_score(ex, c, e) for c, e in comps])
        i, j = np.triu_indices(len(comps), 1)
        n += int(np.sum(np.abs(t[i] - t[j]) > 1e-9))
    return n


def _load(run_or_dir):
    from gptjax.config import split_init_from
    from gptjax.eval.scoring import Run, load_run

    if isinstance(run_or_dir, Run):
        return run_or_dir
    path, step = split_init_from(str(run_or_dir))
    return load_run(path, step)


def make_rankings(run_dir, split: str, *, n_prompts: int, k: int, labelers: str | Sequence[Labeler] = "train",
                  seed: int = 0, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, batch_size: int = 64, progress: bool = True) -> tuple[list[dict], dict]:
    """Rankings of K completions of code_task prompts by a run's policy: (records, report).

    Args:
      run_dir: the policy, RUN_DIR or RUN_DIR@STEP (an SFT run), or a run already restored by load_run.
      split: "train" or "val": which side of the run's corpus split the prompts come from.
      n_prompts: prompts to sample (a seeded subset of the split's, in corpus order; all when fewer).
      k: completions a prompt, 4..9; 0 draws K from 4..9 for each prompt.
      labelers: "train", "heldout", "all", comma-separated names, or Labelers; item i (of those sampled) is ranked
        by labelers[i % len(labelers)]; items whose ranks all tie are dropped.
      seed: chooses the prompts, K (k=0) and the samples.
    """
    labs = labeler_set(labelers)
    check_k(k)
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', not {split!r}")
    if n_prompts < 1:
        raise ConfigError(f"n_prompts must be at least 1, got {n_prompts}")
    if temperature == 0:
        raise ConfigError("temperature=0 samples K identical completions, which rank as one tie; sample with "
                          "temperature > 0")
    from gptjax.generate import check_sampling

    check_sampling(temperature, top_k, top_p)
    t0 = time.time()
    run = _load(run_dir)
    examples = code_task.prompts(split, data_cfg=run.cfg.data, limit=n_prompts, seed=seed)
    if not examples:
        raise ConfigError(f"the {split} side of {run.run_dir}'s corpus holds no code_task prompts (functions with a "
                          f"docstring and 2..12 body lines); use the other split or a larger corpus")
    ks = prompt_ks(len(examples), k, seed)
    comps = sample_completions(run, examples, ks, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, batch_size=batch_size, slots=k or K_RANGE[1],
                               progress=progress)
    items = [(ex, c) for ex, c in zip(examples, comps) if c]
    records = code_task.ranking_records(items, labs)
    flat = [(ex, c, e) for ex, cs in items for c, e in cs]
    true = [code_task.true_score(ex, c, e) for ex, c, e in flat]
    feats = [code_task.features(ex, c, e) for ex, c, e in flat]
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir), "step": run.step, "split": split,
        "prompts": len(examples), "sampled": len(items), "skipped": len(examples) - len(items),
        "k": k if k else f"{K_RANGE[0]}..{K_RANGE[1]}", "completions": len(flat), "records": len(records),
        "dropped_ties": len(items) - len(records), "labelers": [lab.name for lab in labs],
        "ended": float(np.mean([e for _, _, e in flat])) if flat else None,
        "mean_true_score": float(np.mean(true)) if true else None,
        "demonstration_true_score": (float(np.mean([code_task.true_score(ex, ex.response, True) for ex, _ in items]))
                                     if items else None),
        "features": {f: float(np.mean([x[f] for x in feats])) for f in code_task.FEATURES} if feats else {},
        "pairs": _distinct_pairs(items),
        "agreement": agreement_report(items, labs),
        "settings": {"n_prompts": n_prompts, "seed": seed, "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "top_k": top_k, "top_p": top_p, "batch_size": batch_size},
        "seconds": time.time() - t0,
    }
    return records, report


def write_jsonl(records: Sequence[dict], path) -> Path:
    """One JSON object a line, written whole and renamed into place (gptjax.config.write_atomic)."""
    from gptjax.config import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def rank_command(run_dir, out, split: str = "train", n: int = 200, k: int = 4, labelers: str = "train",
                 seed: int = 0, max_new_tokens: int = 128, temperature: float = 1.0, *, top_k: int = 0,
                 top_p: float = 1.0, batch_size: int = 64, log=print) -> dict:
    """`rlhf.py rank SFT_RUN --out rankings.jsonl`: sample, rank, write the records (process 0), print one line;
    returns the report (with "out"). run_dir: RUN_DIR, RUN_DIR@STEP or a restored Run (make_rankings' arguments)."""
    from gptjax import distributed

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'rankings.jsonl'}")
    records, report = make_rankings(run_dir, split, n_prompts=n, k=k, labelers=labelers, seed=seed,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    batch_size=batch_size)
    if not report["sampled"]:
        raise GenerationError(f"all {report['prompts']} prompts are too long for the model's context less "
                              f"max_new_tokens={max_new_tokens}: nothing to sample; lower max_new_tokens")
    if not records:
        raise GenerationError(f"the rankings of all {report['sampled']} sampled prompts tie: nothing to write; sample "
                              f"more prompts or at a higher temperature")
    if distributed.is_main():
        write_jsonl(records, out)
    report["out"] = str(out)
    ag = report["agreement"]
    log(f"wrote {len(records)} rankings of K={report['k']} to {out} from {report['prompts']} {split} prompts of "
        f"{report['run_dir']} step {report['step']} ({report['skipped']} too long, {report['dropped_ties']} all "
        f"ties); mean true score {report['mean_true_score']:.3f} (demonstrations "
        f"{report['demonstration_true_score']:.3f}), {report['ended']:.0%} ended; labeler agreement "
        f"{_pct(ag['labelers'])} ({','.join(report['labelers'])}), all six {_pct(ag['all'])} (paper: 72.6% "
        f"training, 77.3% held-out) in {report['seconds']:.0f}s")
    return report
