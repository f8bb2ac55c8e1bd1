"""Orbax checkpoints: periodic asynchronous saves, keep the last N, restore onto any mesh.

Layout: RUN_DIR/checkpoints/<step>/{params, opt, config}. `params` alone is enough to evaluate, so
eval.py never reads optimizer state (imported weights, written by `save_params`, have none); `config` is
the resolved run config as JSON. Orbax writes each save into `<step>.orbax-checkpoint-tmp` and renames it
when complete, so a save cut short by a kill leaves a directory we recognise, report and skip in favour of
the last complete step.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from gptjax.distributed import barrier
from gptjax.errors import CheckpointError

TMP_PATTERN = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")




def complete_steps(ckpt_dir: Path) -> list[int]:
    """The steps under a checkpoints/ directory whose saves completed (Orbax wrote their metadata)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def weights_only_message(run_dir: Path, step: int) -> str:
    return (f"{run_dir} holds imported weights without optimizer state (checkpoint step {step}), so training cannot "
            f"resume from it; start from them in a new run_dir: init_from={run_dir} run_dir=NEW_DIR, or evaluate "
            f"it with python eval.py {run_dir}")


def weights_only_step(run_dir: str | Path) -> int | None:
    """The latest complete checkpoint step of `run_dir` if it holds parameters but no optimizer state (what
    convert.py writes), else None. Reads only the directory listing, so any process may ask."""
    d = Path(run_dir) / "checkpoints"
    steps = complete_steps(d)
    if steps and (d / str(steps[-1]) / "params").is_dir() and not (d / str(steps[-1]) / "opt").is_dir():
        return steps[-1]
    return None


class Checkpoints:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False,
                 log: Callable[[str], None] = print):
        self.dir = Path(run_dir).absolute() / "checkpoints"
        self.log = log
        self.read_only = read_only
        if read_only and not self.dir.exists():
            raise CheckpointError(f"{Path(run_dir)} holds no checkpoints (no {self.dir.name}/ directory); "
                                  f"pass the run directory that train.py wrote (run_dir=...)")
        if not read_only:  # one process deletes, the others wait so that none lists a half-deleted step
            if jax.process_index() == 0:
                self._sweep_incomplete()
            barrier("incomplete checkpoints swept")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only)
        # Handlers named up front: a fresh process (resume, eval.py) can then read item metadata.
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self.mgr = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)

    # -- discovery ---------------------------------------------------------------------------

    def incomplete(self) -> list[Path]:
        if not self.dir.exists():
            return []
        out = []
        for p in self.dir.iterdir():
            if TMP_PATTERN.match(p.name) or (p.is_dir() and p.name.isdigit() and not (p / "_CHECKPOINT_METADATA").exists()):
                out.append(p)
        return sorted(out)

    def _sweep_incomplete(self) -> None:
        complete = self.steps_on_disk()
        for p in self.incomplete():
            step = int(re.match(r"^(\d+)", p.name).group(1))
            fallback = max((s for s in complete if s < step), default=None)
            then = f"resuming from step {fallback}" if fallback is not None else "no complete checkpoint precedes it"
            self.log(f"checkpoint: step {step} was left half-written by an interrupted save ({p.name}); "
                     f"skipping it, {then}")
            shutil.rmtree(p, ignore_errors=True)

    def steps_on_disk(self) -> list[int]:
        return complete_steps(self.dir)

    def all_steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save / restore ----------------------------------------------------------------------

    def save(self, step: int, state: dict, config: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            config=ocp.args.JsonSave(config))
        return self.mgr.save(step, args=args, force=force)

    def save_params(self, step: int, params: Any, config: dict) -> bool:
        """Parameters and config without optimizer state (imported weights): enough for eval.py, which restores
        with params_only=True; resuming training from such a step is refused with a clear message."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config))
        return self.mgr.save(step, args=args, force=True)

    def has_optimizer_state(self, step: int) -> bool:
        return (self.dir / str(step) / "opt").is_dir()

    def config(self, step: int) -> dict:
        return self.mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def check_compatible(self, step: int, abstract_params: Any) -> None:
        """Raise CheckpointError naming the differing parameters if `step` holds another model's shapes."""
        stored = self.mgr.item_metadata(step)["params"]
        stored = getattr(stored, "tree", stored)
        flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            stored, is_leaf=lambda x: hasattr(x, "shape"))[0]}
        flat_want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
        diffs = []
        for k in sorted(set(flat_stored) | set(flat_want)):
            a, b = flat_stored.get(k), flat_want.get(k)
            if a is None or b is None:
                diffs.append(f"{k}: {'missing in checkpoint' if a is None else 'not in this model'}")
            elif tuple(a.shape) != tuple(b.shape):
                diffs.append(f"{k}: checkpoint {tuple(a.shape)} vs model {tuple(b.shape)}")
        if diffs:
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise CheckpointError(
                f"checkpoint {self.dir}/{step} holds a different model: " + "; ".join(diffs[:4]) + more +
                ". Evaluate it with the config it was trained with (drop the model overrides), or point at the right run")

    def restore(self, abstract_state: dict, step: int | None = None, *, params_only: bool = False) -> tuple[int, dict]:
        """Restore onto the shardings in `abstract_state` (any mesh). With step=None, the latest complete
        checkpoint; if that one turns out unreadable, the one before it, with a message."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.dir}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.dir}; available: {steps}")
        candidates = [step] if step is not None else steps[::-1]
        for i, s in enumerate(candidates):
            self.check_compatible(s, abstract_state["params"])
            if not params_only and not self.has_optimizer_state(s):
                raise CheckpointError(weights_only_message(self.dir.parent, s))
            try:
                items = {"params": ocp.args.StandardRestore(abstract_state["params"])}
                if not params_only:
                    items["opt"] = ocp.args.StandardRestore(
                        {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]})
                r = self.mgr.restore(s, args=ocp.args.Composite(**items))
            except CheckpointError:
                raise
            except Exception as e:  # unreadable files: fall back to the previous complete step
                if i + 1 < len(candidates):
                    self.log(f"checkpoint: step {s} could not be read ({type(e).__name__}: {str(e)[:200]}); "
                             f"falling back to step {candidates[i + 1]}")
                    continue
                raise CheckpointError(f"checkpoint {self.dir}/{s} could not be read: {e}") from e
            state = {"params": r.params}
            if not params_only:
                state.update(step=r.opt["step"], opt_state=r.opt["opt_state"])
            return s, state
        raise AssertionError("unreachable")

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.close()


def open_step(run_dir: str | Path, step: int | None = None, *, log: Callable[[str], None] = print
              ) -> tuple[Checkpoints, int, dict]:
    """A run directory's checkpoints for reading, the step to read (`step`, or the latest complete one) and
    the config stored with it; one clear error when the directory, its checkpoints or the step are missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; pass a run directory written by train.py "
                              f"(or by convert.py from-hf)")
    ckpts = Checkpoints(run_dir, read_only=True, log=log)
    steps = ckpts.all_steps()
    if not steps:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint; train first (python train.py run_dir={run_dir})")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {ckpts.dir}; available steps: {steps}")
    return ckpts, step, ckpts.config(step)
