"""Evaluating a fine-tuned run (what `python eval.py FT_RUN` calls): its best (or a given) checkpoint on its own
validation split, or on other validation files of the same task, scored with the label vocabulary saved with it.
Everything comes from the run directory itself (config.json, finetune.json, its copy of the tokenizer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from gptjax import config as config_lib
from gptjax.checkpoint import open_step
from gptjax.data import load_tokenizer
from gptjax.finetune import stage as ft
from gptjax.finetune.config import FinetuneConfig


def is_finetuned(run_dir) -> bool:
    return (Path(run_dir) / "finetune.json").is_file()


def evaluate_run(run_dir, *, step: int | None = None, val_files=(), devices=None, log=print) -> dict:
    run_dir = Path(run_dir)
    info = config_lib.read_json(run_dir / "finetune.json", f"{run_dir}")
    stored = config_lib.read_config(run_dir / "config.json", f"{run_dir}")
    cfg = config_lib.from_dict(FinetuneConfig, {k: v for k, v in stored.items() if k not in config_lib.RECORD_KEYS})
    # this machine's devices, whatever the run trained on; batches rounded to a multiple of them
    n = len(devices or jax.devices())
    bs = -(-cfg.eval_batch_size // n) * n
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(), batch_size=bs, eval_batch_size=bs)
    parent_model = config_lib.from_dict(config_lib.ModelConfig, info["parent_model"])
    data_cfg = config_lib.from_dict(config_lib.DataConfig, info["data"])
    tok = load_tokenizer(run_dir)
    best = run_dir / "best" / "checkpoints"
    has_best = best.is_dir() and any(p.name.isdigit() for p in best.iterdir())
    sub = "best" if step is None and has_best else "."
    asked = step
    ckpts, step, _ = open_step(run_dir / sub, step, log=log)
    results, params = {}, None
    for val in list(val_files) or [None]:
        c = dataclasses.replace(cfg, val=str(val)) if val else cfg
        p = ft.prepare_with(c, None, tok, parent_model, data_cfg, devices=devices,
                            labels=() if info["regression"] else (tuple(info["labels"]) or None))
        compiled = ft.compile_stage(p, 1)
        if params is None:
            shapes, shardings = ft.param_shardings(p.mcfg, p.task.num_outputs, p.mesh, c.mesh.rules)
            target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
            # asked=None: the latest readable checkpoint (an unreadable latest one is reported and passed over)
            step, state = ckpts.restore({"params": target}, asked, params_only=True)
            params = state["params"]
        name = str(val) if val else f"{p.task.name} (validation split)"
        results[name] = ft.evaluate(p, compiled, params)
    ckpts.close()
    return {"run_dir": str(run_dir), "step": step, "checkpoint": "best" if sub == "best" else "checkpoints",
            "task": info["task"], "metrics_by_split": results, "metrics": next(iter(results.values()))}
