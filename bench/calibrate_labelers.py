"""The labelers' noise calibrated on what they rank: a ranking file of a policy's samples (rlhf.py rank).

    python bench/calibrate_labelers.py runs/igpt/rankings.jsonl --run runs/igpt/pretrain [--target 0.75]

Prints the labelers' agreement on those completions with no noise and with code_task.NOISE, and the noise
(one for all six, code_task.calibrate_noise) at which they agree `target` of the time, with the agreement of the
training labelers, the held-out ones and the two groups at that noise. --run names a run whose corpus the prompts
came from (the rank stage's prompts are code_task.prompts of its data config); --split is the split they came from.
"""

from __future__ import annotations

import argparse
import json

from gptjax import config
from gptjax.rlhf import code_task as ct


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rankings")
    ap.add_argument("--run", required=True, help="the run whose corpus the prompts came from (its config.json)")
    ap.add_argument("--split", default="train", choices=("train", "val"))
    ap.add_argument("--target", type=float, default=0.75)
    args = ap.parse_args(argv)
    data_cfg = config.load_json(f"{args.run}/config.json").data
    by_prompt = {e.prompt: e for e in ct.prompts(args.split, data_cfg=data_cfg)}
    recs = [json.loads(line) for line in open(args.rankings) if line.strip()]
    items = [(by_prompt[r["prompt"]], list(zip(r["completions"], r["ended"]))) for r in recs
             if r["prompt"] in by_prompt]
    if not items:
        raise SystemExit(f"error: none of the {len(recs)} prompts of {args.rankings} is a {args.split} prompt of "
                         f"{args.run}'s corpus; give the run the rankings were sampled from and its --split")
    quiet = ct.with_noise(ct.LABELERS, 0.0)
    print(f"{len(items)} of {len(recs)} records; agreement with no noise {ct.agreement(quiet, quiet, items):.3f}, "
          f"with NOISE={ct.NOISE} {ct.agreement(ct.LABELERS, ct.LABELERS, items):.3f}")
    s = ct.calibrate_noise(items, args.target)
    labs = ct.with_noise(ct.LABELERS, s)
    train = [x for x in labs if x.name in {t.name for t in ct.TRAIN_LABELERS}]
    held = [x for x in labs if x.name in {t.name for t in ct.HELDOUT_LABELERS}]
    print(f"noise {s:.4f} for agreement {args.target}: all {ct.agreement(labs, labs, items):.3f}, training "
          f"{ct.agreement(train, train, items):.3f}, held-out {ct.agreement(held, held, items):.3f}, training vs "
          f"held-out {ct.agreement(train, held, items):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
