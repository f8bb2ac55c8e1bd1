"""Held-out loss split by whether a token's line also occurs, verbatim, in the training split.

    python bench/heldout_overlap.py RUN [RUN ...] [--min-chars 20] [--json out.json]

The built-in corpus is split by source file, but files share lines: license headers, imports, idioms, tables.
A model that has read the training split several times can recall those lines on the held-out files, a gain
that is memorisation rather than what a scaling law fitted on shorter runs measures. This script tags every
held-out token whose line (stripped, at least --min-chars characters) appears in some training file, and reports
the held-out loss on the tagged ("seen") tokens and on the rest ("unseen") for each run.

Each held-out file is tokenised alone with the run's tokenizer and read in windows of T + 1 tokens with stride
T, so the overall mean differs slightly from eval.py's (whose windows run across file boundaries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def seen_lines(train_docs, min_chars: int) -> set[str]:
    return {s for d in train_docs for ln in d.split("\n") if len(s := ln.strip()) >= min_chars}


def tagged_tokens(sp, doc: str, seen: set[str], min_chars: int):
    """(ids, tags) of one document: tag 1 where the token starts in a line that is in `seen`."""
    import bisect

    starts, flags, pos = [], [], 0
    for ln in doc.split("\n"):
        s = ln.strip()
        starts.append(pos)
        flags.append(len(s) >= min_chars and s in seen)
        pos += len(ln.encode("utf-8")) + 1  # the pieces' offsets count UTF-8 bytes
    proto = sp.encode(doc, return_type="proto")
    ids = [p.id for p in proto.pieces]
    tags = [int(flags[max(bisect.bisect_right(starts, p.begin) - 1, 0)]) for p in proto.pieces]
    return ids, tags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (train.py runs on the built-in corpus or text files)")
    ap.add_argument("--min-chars", type=int, default=20, help="shorter lines never count as seen (default 20)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np

    from gptjax.data import split_documents
    from gptjax.data.cache import windows
    from gptjax.errors import GptjaxError
    from gptjax.eval.scoring import eval_batch_size, load_run
    from icl_score import token_nll  # bench/icl_score.py: the same per-token loss

    out = []
    try:
        cache: dict = {}
        for rd in args.runs:
            run = load_run(rd)
            sp = getattr(run.tokenizer, "sp", None)
            if sp is None:
                raise GptjaxError(f"{rd}: this needs a run with its own SentencePiece tokenizer (a train.py run)")
            key = (repr(run.cfg.data), str(run.tokenizer.path))
            if key not in cache:
                train_docs, val_docs = split_documents(run.cfg.data)[:2]
                seen = seen_lines(train_docs, args.min_chars)
                cache[key] = [tagged_tokens(sp, d, seen, args.min_chars) for d in val_docs]
            docs = cache[key]
            T = run.cfg.model.block_size
            nll = token_nll(run.cfg.model)

            bs = eval_batch_size(run.cfg, run.mesh)
            ids = [np.asarray(i, np.int32) for i, _ in docs]
            tags = [np.asarray(t, np.float32) for _, t in docs]
            sums = {"seen": 0.0, "unseen": 0.0}
            counts = {"seen": 0.0, "unseen": 0.0}
            for (tok, w), (tg, _) in zip(windows(ids, T, bs), windows([t.astype(np.int32) for t in tags], T, bs)):
                x = np.asarray(nll(run.params, jnp.asarray(tok)))
                seen_w = tg[:, 1:] * w  # the tag of the predicted token
                for name, m in (("seen", seen_w), ("unseen", w - seen_w)):
                    sums[name] += float((x * m).sum())
                    counts[name] += float(m.sum())
            r = {"run": str(rd), "step": run.step, **{k: sums[k] / counts[k] for k in sums},
                 "mean": (sums["seen"] + sums["unseen"]) / (counts["seen"] + counts["unseen"]),
                 "seen_fraction": counts["seen"] / (counts["seen"] + counts["unseen"]), "tokens": int(sum(counts.values()))}
            out.append(r)
    except GptjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'run':<40} {'step':>6} {'mean':>7} {'seen':>7} {'unseen':>7} {'seen share':>10}")
    for r in out:
        print(f"{r['run'][-40:]:<40} {r['step']:>6} {r['mean']:>7.4f} {r['seen']:>7.4f} {r['unseen']:>7.4f} "
              f"{r['seen_fraction']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"min_chars": args.min_chars, "runs": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
