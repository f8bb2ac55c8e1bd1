"""Convert between Hugging Face GPT-2 checkpoints and gptjax run directories.

  python convert.py from-hf HF_DIR RUN_DIR [--tokenizer DIR]    # config.json + model.safetensors -> a run eval.py reads
  python convert.py to-hf RUN_DIR OUT_DIR [--step N]            # a gptjax GPT-2-architecture run -> transformers

Weights are read and written as safetensors only; pickled checkpoints (pytorch_model.bin) are refused.
A target directory that is not empty is refused unless --force, which replaces only the model and
tokenizer files in it. Details: docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-hf", help="import a Hugging Face GPT-2 directory into a gptjax run directory")
    f.add_argument("hf_dir", help="directory with config.json and model.safetensors (and tokenizer files)")
    f.add_argument("run_dir", help="the gptjax run directory to create")
    f.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="take tokenizer.json (or vocab.json + merges.txt, or a .tiktoken file) from DIR")
    f.add_argument("--force", action="store_true", help="replace the model and tokenizer files of a non-empty RUN_DIR")
    t = sub.add_parser("to-hf", help="export a gptjax run (GPT-2 architecture) as a Hugging Face GPT-2 directory")
    t.add_argument("run_dir", help="a run directory written by train.py or convert.py from-hf")
    t.add_argument("out_dir", help="the Hugging Face directory to create")
    t.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    t.add_argument("--force", action="store_true", help="replace the model and tokenizer files of a non-empty OUT_DIR")
    args = p.parse_args(argv)

    from gptjax import hf
    from gptjax.errors import run_command

    if args.command == "from-hf":
        return run_command(hf.convert_from_hf, args.hf_dir, args.run_dir, tokenizer_dir=args.tokenizer,
                           force=args.force)
    return run_command(hf.convert_to_hf, args.run_dir, args.out_dir, step=args.step, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
