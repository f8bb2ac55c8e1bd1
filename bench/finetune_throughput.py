"""Fine-tuning tokens/s beside pretraining tokens/s at the same model shape, batch and sequence length, in one
process (alternating timed rounds, so a noisy machine affects both alike). The fine-tuning step adds the task
head, the extract-token gather and the auxiliary LM loss over the same tokens.

  python bench/finetune_throughput.py                          # the tiny preset, batch 32 x 256 tokens
  python bench/finetune_throughput.py --config gpt2-small batch_size=8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

if __name__ == "__main__":  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()

import jax
import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from gptjax import config as config_lib
    from gptjax.finetune import stage as ft
    from gptjax.finetune import transform
    from gptjax.finetune.config import FinetuneConfig
    from gptjax.finetune.task import Example, FinetuneTask
    from gptjax.sharding import make_mesh
    from gptjax.train.steps import make_train_steps

    cfg = config_lib.resolve(args.config, list(args.overrides))
    m, B, T = cfg.model, cfg.batch_size, cfg.model.block_size
    mesh = make_mesh(cfg.mesh)
    lm = make_train_steps(cfg, mesh)
    rng = np.random.default_rng(0)
    lm_state = lm.init(jax.random.key(0))
    lm_batch = jax.device_put(rng.integers(0, m.vocab_size, (1, B, T + 1)).astype(np.int32), lm.batch_sharding)

    # the same B x T tokens as a classification batch: [start; text; extract], every row full
    task = FinetuneTask("bench", "classification", [Example(("x",), 0)], [Example(("x",), 0)], labels=("a", "b"))
    ids = transform.SpecialIds(1, 2, 3, pad=0, added=0)
    fcfg = FinetuneConfig(task="bench", init_from="-", batch_size=B, mesh=cfg.mesh, clf_pdrop=m.resid_pdrop)
    mcfg = ft.child_model(m, ids, m.resid_pdrop)  # the same dropout as the pretraining step, to compare like for like
    enc = transform.Encoded(rng.integers(5, m.vocab_size, (B, 1, T)).astype(np.int32),
                            np.full((B, 1), T - 1, np.int32), np.ones((B, 1), np.float32),
                            rng.integers(0, 2, B).astype(np.int32))
    prep = ft.Prepared(fcfg, None, task, mcfg, ids, enc, enc, mesh, T)
    c = ft.compile_stage(prep, 1000)
    shapes, shardings = ft.param_shardings(mcfg, 2, mesh, cfg.mesh.rules)
    params = jax.jit(lambda: {**ft.init_params(mcfg, jax.random.key(0)),
                              "head": ft.init_task_head(mcfg, 2, jax.random.key(1))}, out_shardings=shardings)()
    ft_state = c.init_state(params)
    ft_batch = tuple(jax.device_put(a, sh) for a, sh in zip((enc.tokens, enc.extract, enc.rows, enc.labels),
                                                            c.batch_sharding))

    def timed(step, state, batch):
        state, metrics = step(state, batch)  # compiled already; one untimed step per round
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        return state, B * T * args.steps / (time.perf_counter() - t0)

    lm_state, _ = timed(lm.step, lm_state, lm_batch)  # compile both
    ft_state, _ = timed(c.step, ft_state, ft_batch)
    rates = {"pretraining": [], "fine-tuning": []}
    for _ in range(args.rounds):
        lm_state, r = timed(lm.step, lm_state, lm_batch)
        rates["pretraining"].append(r)
        ft_state, r = timed(c.step, ft_state, ft_batch)
        rates["fine-tuning"].append(r)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.config}: batch {B} x {T} tokens, {jax.devices()[0].platform} x {mesh.devices.size}, "
          f"median of {args.rounds} rounds of {args.steps} steps")
    for k, v in med.items():
        print(f"  {k:12s} {v:10,.0f} tokens/s   (rounds: {', '.join(f'{x:,.0f}' for x in rates[k])})")
    print(f"  fine-tuning / pretraining: {med['fine-tuning'] / med['pretraining']:.3f}")


if __name__ == "__main__":
    main()
