"""Starting a run from another run's weights (`init_from=RUN_DIR[@STEP]`), and the lineage it records.

The parent is any run directory with a checkpoint: one train.py wrote, or one `convert.py from-hf` made. The
child takes the parent's model config (config.adopt_parent_model refuses overrides that would change its
parameters) and its tokenizer (the child's corpus is tokenized with it), and starts at step 0 with a fresh
optimizer and learning-rate schedule. Its config.json records the lineage, nearest ancestor first:
{"run_dir", "step", "params_fingerprint", "preset"} per ancestor, so pretrain -> sft -> reward -> ppo stays
traceable. The fingerprint is computed on the devices (no parameter is gathered to one host): per leaf a
wrapping sum of its bits weighted by position, which does not depend on how the leaf is sharded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import config as config_lib
from gptjax.checkpoint import open_step
from gptjax.data import Tokenizer, load_tokenizer
from gptjax.errors import CheckpointError


LM_STAGES = ("pretrain", "sft", "ppo", "dpo")  # runs whose weights are a plain language model (a PPO run's policy/)


@dataclass
class Parent:
    run_dir: Path
    step: int
    cfg: config_lib.TrainConfig
    lineage: list[dict]  # the parent's own ancestors
    tokenizer: Tokenizer


def open_parent(spec: str, log=print) -> Parent:
    """The run `spec` (RUN_DIR or RUN_DIR@STEP) names, its checkpoint step, config, lineage and tokenizer."""
    run, step = config_lib.split_init_from(spec)
    try:
        ckpts, step, stored = open_step(run, step, log=log)
    except CheckpointError as e:
        raise CheckpointError(f"init_from={spec}: {e}") from None
    ckpts.close()
    if stored.get("stage") == "ppo" and "model" not in stored:
        raise CheckpointError(f"init_from={spec} is a PPO run directory (policy, value model and optimizer state); "
                              f"its final policy is the language-model run {Path(run) / 'policy'}: start from that")
    if stored.get("stage", "pretrain") not in LM_STAGES:
        raise CheckpointError(f"init_from={spec} is a {stored['stage']} run (it has a task head); start from a "
                              f"pretraining or SFT run (or one made by convert.py from-hf)")
    return Parent(Path(run), step, config_lib.stored_train_config(stored), list(stored.get("lineage", [])),
                  load_tokenizer(run))


def restore_params(parent: Parent, abstract_params: Any, log=print) -> Any:
    """The parent's parameters, restored straight into the child's shardings (any mesh)."""
    from gptjax.checkpoint import Checkpoints

    ckpts = Checkpoints(parent.run_dir, read_only=True, log=log)
    try:
        _, state = ckpts.restore({"params": abstract_params}, parent.step, params_only=True)
    finally:
        ckpts.close()
    return state["params"]


@jax.jit
def _leaf_sums(params):
    def one(x):
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).ravel()
        pos = jnp.arange(bits.size, dtype=jnp.uint32)
        # uint32 arithmetic wraps, and a wrapping sum is the same in any order: shard-independent
        return jnp.stack([jnp.sum(bits * (pos * jnp.uint32(2654435761) + jnp.uint32(1))),
                          jnp.sum(bits ^ (pos * jnp.uint32(40503)))])
    return jax.tree.map(one, params)


def params_fingerprint(params: Any) -> str:
    """A content hash of a parameter tree: equal trees give equal fingerprints on any mesh."""
    sums = jax.device_get(_leaf_sums(params))
    h = hashlib.sha256()
    for path, s in jax.tree_util.tree_flatten_with_path(sums)[0]:
        leaf = jax.tree_util.keystr(path)
        h.update(leaf.encode() + b"\0" + s.tobytes())
    return h.hexdigest()[:16]


def lineage(parent: Parent, fingerprint: str) -> list[dict]:
    return [{"run_dir": str(parent.run_dir.absolute()), "step": parent.step, "params_fingerprint": fingerprint,
             "preset": parent.cfg.preset}] + parent.lineage


def read_lineage(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "config.json"
    return list(json.loads(path.read_text()).get("lineage", [])) if path.exists() else []
