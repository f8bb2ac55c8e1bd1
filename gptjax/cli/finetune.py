"""Fine-tune a pretrained run on a labelled task, GPT-1 style: a linear head on the extract token, L2 + λ·L1.

  python finetune.py runs/tiny --task code-follows                        # a built-in task (runs/ft-code-follows)
  python finetune.py runs/tiny --task sst2_train.jsonl --val sst2_dev.jsonl --run-dir runs/ft-sst2
  python finetune.py runs/tiny --task reviews.jsonl --fields text=review,label=stars lm_coef=0 epochs=5
  python finetune.py runs/gpt2 --task mnli_train.jsonl --val mnli_dev.jsonl batch_size=16 mesh.fsdp=-1
  python finetune.py runs/tiny --task code-body init=random               # the same architecture, no pretraining
  python finetune.py runs/tiny --task code-package transfer_layers=2      # embeddings + the first 2 layers only
  python finetune.py --list-keys

Built-in tasks (generated from the built-in corpus, split as pretraining split it): code-package,
code-follows, code-renamed, code-body. Files: JSONL in the shapes GLUE / RACE / Story Cloze ship in
(docs/finetune.md), or any shape with --fields. Rerunning the same command resumes. Evaluate the result with
python eval.py RUN_DIR (its own validation split) or --tasks FILE.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("init_from", nargs="?", default=None, help="the pretrained run directory (RUN_DIR or RUN_DIR@STEP)")
    p.add_argument("--task", default=None, help="a built-in task name or a JSONL file of labelled examples")
    p.add_argument("--val", default=None, help="a validation JSONL file (default: held out from --task)")
    p.add_argument("--fields", default=None, help="field mapping for other shapes, e.g. text=review,label=stars")
    p.add_argument("--kind", default=None, help="override the detected kind (e.g. similarity for MRPC-like pairs)")
    p.add_argument("--run-dir", default=None, help="where the fine-tuned run goes (default runs/ft-TASK)")
    p.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. lm_coef=0 epochs=5 optim.lr=1e-4")
    from gptjax import distributed

    distributed.add_cli_flags(p)
    args = p.parse_intermixed_args(argv)
    from gptjax.errors import run_command

    return run_command(_main, args)


def _main(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.finetune.config import FinetuneConfig, resolve

    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(FinetuneConfig()))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    named = {"init_from": args.init_from, "task": args.task, "val": args.val, "fields": args.fields,
             "kind": args.kind, "run_dir": args.run_dir}
    cfg = resolve([f"{k}={v}" for k, v in named.items() if v] + list(args.overrides))
    distributed.initialize(args)
    from gptjax.finetune.stage import finetune

    finetune(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
