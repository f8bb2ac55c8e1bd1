"""Train a GPT. With no arguments: the tiny preset on the Python standard library, on this machine.

  python train.py                                   # the main job (about 10 minutes on 2 CPU cores)
  python train.py --config gpt2-small batch_size=8 steps=100 run_dir=runs/g2
  python train.py --list-presets | --list-keys
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
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. model.n_layer=6 optim.lr=3e-4")
    args = p.parse_args(argv)

    from gptjax import config as config_lib
    from gptjax import trainer
    from gptjax.checkpoint import CheckpointError
    from gptjax.data import DataError

    if args.list_presets:
        print("\n".join(config_lib.list_presets()))
        return 0
    try:
        overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
        cfg = config_lib.resolve(args.config, overrides)
        if args.list_keys:
            flat = config_lib.flatten(config_lib.to_dict(cfg))
            print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
            return 0
        trainer.run(cfg)
    except (config_lib.ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except trainer.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except trainer.Preempted as e:
        print(str(e), file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
