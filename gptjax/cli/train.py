"""Train a GPT. With no arguments: the tiny preset on the Python standard library, on this machine.

  python train.py                                   # the main job (about 10 minutes on 2 CPU cores)
  python train.py --config gpt2-small batch_size=8 steps=100 run_dir=runs/g2
  python train.py init_from=runs/tiny run_dir=runs/tiny-more steps=200 optim.lr=3e-4   # start from trained weights
  python train.py --list-presets | --list-keys
  python train.py --config gpt3-175b --compile-only --topology v5p:8x8x16 mesh.fsdp=256 mesh.tensor=4 ...
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name (configs/NAME.json) or a JSON file path")
    p.add_argument("--run-dir", default=None, help="where checkpoints, metrics and the config go (run_dir=...)")
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the training step ahead of time and report memory and FLOPs; train nothing")
    p.add_argument("--topology", default=None,
                   help="with --compile-only: a TPU topology to compile for from this machine, e.g. v5p:8x8x8 "
                        "(needs the libtpu extra: pip install -e '.[tpu]')")
    p.add_argument("--json", default=None, help="with --compile-only: also write the report to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. model.n_layer=6 optim.lr=3e-4")
    from gptjax import distributed

    distributed.add_cli_flags(p)
    args = p.parse_args(argv)

    from gptjax import config as config_lib
    from gptjax.errors import run_command

    if args.list_presets:
        print("\n".join(config_lib.list_presets()))
        return 0
    return run_command(_main, args)


def _main(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.train.pretrain import pretrain

    if args.topology and not args.compile_only:
        raise config_lib.ConfigError("--topology only applies to --compile-only (there is no such chip here to "
                                     "train on); add --compile-only")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = config_lib.resolve(args.config, overrides)
    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(cfg))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    if args.compile_only:
        if cfg.data.tokenizer:  # the model's vocabulary follows a supplied tokenizer, as in training
            import dataclasses

            from gptjax.data.tokenizers import open_tokenizer

            vocab = open_tokenizer(cfg.data.tokenizer).vocab_size
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
        return compile_only(cfg, args.topology, args.json)
    distributed.initialize(args)
    pretrain(cfg)
    return 0


def compile_only(cfg, topology, json_path) -> int:
    import json

    from gptjax import aot

    devices = aot.topology_devices(topology) if topology else None
    report = aot.compile_step(cfg, devices, topology=topology)
    print(aot.describe(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] is not False else 3


if __name__ == "__main__":
    sys.exit(main())
