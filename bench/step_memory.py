"""Peak memory of the compiled training step, from XLA's own analysis (compiled.memory_analysis()): compiles,
runs nothing, so it answers for models too slow to train here.

  python bench/step_memory.py --config gpt2-small batch_size=8 --vary model.loss_chunk=0,256,128
  python bench/step_memory.py --config tiny --vary model.remat=none,full

One line per value of --vary: arguments, outputs, temporaries and the peak (arguments + outputs + temporaries -
donated), per device. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from gptjax import config as config_lib
from gptjax.sharding import make_mesh
from gptjax.train.steps import make_train_steps


def step_memory(cfg) -> dict:
    trainer = make_train_steps(cfg, make_mesh(cfg.mesh))
    state = trainer.abstract_state()
    M, B, T = cfg.micro_batches, cfg.batch_size, cfg.model.block_size
    batch = jax.ShapeDtypeStruct((M, B // M, T + 1), jax.numpy.int32, sharding=trainer.batch_sharding)
    t0 = time.perf_counter()
    mem = trainer.step.lower(state, batch).compile().memory_analysis()
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {"arguments_gib": gib(mem.argument_size_in_bytes), "outputs_gib": gib(mem.output_size_in_bytes),
            "temporaries_gib": gib(mem.temp_size_in_bytes), "donated_gib": gib(mem.alias_size_in_bytes),
            "peak_gib": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                            - mem.alias_size_in_bytes), "compile_s": round(time.perf_counter() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--vary", default="model.loss_chunk=0", help="KEY=V1,V2,...: one compile per value")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args()
    key, values = args.vary.split("=", 1)
    rows = []
    print(f"{args.config} {' '.join(args.overrides)} on {jax.devices()[0].device_kind} x {len(jax.devices())}")
    for v in values.split(","):
        cfg = config_lib.resolve(args.config, list(args.overrides) + [f"{key}={v}"])
        r = {key: v, **step_memory(cfg)}
        rows.append(r)
        print("  " + ", ".join(f"{k} {x}" for k, x in r.items()), flush=True)
    base = rows[0]["peak_gib"]
    for r in rows[1:]:
        print(f"{key}={r[key]}: peak {r['peak_gib']} GiB vs {base} GiB ({r['peak_gib'] / base - 1:+.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
