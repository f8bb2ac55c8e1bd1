"""Orbax checkpoints: periodic asynchronous saves, keep the last N, restore onto any mesh.

Layout: RUN_DIR/checkpoints/<step>/{params, opt, config}. `params` alone is enough to evaluate, so
eval.py never reads optimizer state (imported weights, written by `save_params`, have none); `config` is
the resolved run config as JSON. Orbax writes each save into `<step>.orbax-checkpoint-tmp` and renames it
when complete, so a save cut short by a kill leaves a directory we recognise, report and skip in favour of
the last complete step.

A complete step whose files cannot be read (a disk fault, a truncated copy) is reported in one line and the
step before it is used instead (`Checkpoints.restore` with no step: training's resume and eval.py alike).
Training then moves the unreadable step to RUN_DIR/checkpoints/corrupt/<step>-<time>/, outside what Orbax
and `complete_steps` list, so the step can be saved again and nothing saved is deleted. A save that fails
for lack of space (or permission) stops the run with one line naming the last complete step; the half-
written save is Orbax's tmp directory, swept on the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from gptjax.distributed import barrier
from gptjax.errors import CheckpointError

TMP_PATTERN = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/<step>-<time>: unreadable steps, set aside rather than deleted


# -- what went wrong, in a few words -------------------------------------------------------------

def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _reason(e: BaseException) -> str:
    """The innermost error's first line, without the TensorStore spec dumps Orbax appends (kilobytes)."""
    root = _chain(e)[-1]
    text = (str(root).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = text or type(root).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# (errno, or how TensorStore words it) -> (what happened, what to do). TensorStore reports a full disk as
# RESOURCE_EXHAUSTED on a write; the same status on anything else (host memory) is not a disk matter.
_STORAGE = [((errno.ENOSPC,), r"No space left on device|RESOURCE_EXHAUSTED: (Error|Failed) writing",
             "no space left on device", "free space there"),
            ((errno.EDQUOT,), r"Disk quota exceeded", "disk quota exceeded", "free space there (or raise the quota)"),
            ((errno.EACCES, errno.EPERM), r"PERMISSION_DENIED: (Error|Failed) writing|Permission denied",
             "permission denied", "make it writable"),
            ((errno.EROFS,), r"Read-only file system", "read-only file system", "make it writable")]


def _storage_failure(e: BaseException | None) -> tuple[str, str] | None:
    """(what happened, the fix) if `e` is a write that the storage refused (full, quota, permissions), else None."""
    for x in _chain(e):
        for codes, words, what, fix in _STORAGE:
            if (isinstance(x, OSError) and x.errno in codes) or re.search(words, str(x)):
                return what, fix
    return None


_ORBAX = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep  # .../site-packages/orbax/


def _raised_in_orbax(e: BaseException | None) -> bool:
    return any(f.filename.startswith(_ORBAX) for x in _chain(e) for f in traceback.extract_tb(x.__traceback__))


class _ReportedElsewhere(logging.Filter):
    """Log records about a failure the user already gets as one line: Orbax's tracebacks of a save the disk
    refused (one per thread), asyncio's "exception was never retrieved" for the sibling reads and writes Orbax
    abandoned when one failed, and a read-only manager's notes on the settings it overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.levelno == logging.WARNING:
            return "read_only=True, setting" not in msg and "Given directory is read only" not in msg
        if record.levelno >= logging.ERROR:
            exc = record.exc_info[1] if record.exc_info else None
            if _storage_failure(exc) or _storage_failure(Exception(record.getMessage())):
                return False
            if "exception was never retrieved" in msg and _raised_in_orbax(exc):
                return False
        return True


def _abandoned_orbax_work(exc_type, exc, tb, obj=None) -> bool:
    """What the interpreter reports about work Orbax abandoned after one of its reads or writes failed (that
    failure reaches the user as one line), possibly long after, on TensorStore's threads: the callback of an
    abandoned read into the event loop Orbax has since closed, and the abandoned coroutine when it is collected."""
    if (exc_type is RuntimeError and str(exc) == "Event loop is closed"
            and threading.current_thread() is not threading.main_thread()
            and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(tb))):
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and code.co_filename.startswith(_ORBAX)


_FILTER = _ReportedElsewhere()
_HOOKED = False


def _quiet_orbax() -> None:
    """Installs (once) the filters above on the loggers and the interpreter's hooks they would reach."""
    global _HOOKED
    for name in ("absl", "asyncio"):
        if _FILTER not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_FILTER)
    if _HOOKED:
        return
    _HOOKED = True
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def on_unraisable(u):
        if not _abandoned_orbax_work(u.exc_type, u.exc_value, u.exc_traceback, u.object):
            unraisable(u)

    def on_exception(t, v, tb):
        if not _abandoned_orbax_work(t, v, tb):
            excepthook(t, v, tb)

    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


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
        self._in_flight: int | None = None  # the step of an asynchronous save not yet known to be complete
        _quiet_orbax()
        if read_only and not self.dir.exists():
            raise CheckpointError(f"{Path(run_dir)} holds no checkpoints (no {self.dir.name}/ directory); "
                                  f"pass the run directory that train.py wrote (run_dir=...)")
        if not read_only:  # one process deletes, the others wait so that none lists a half-deleted step
            if jax.process_index() == 0:
                self._sweep_incomplete()
            barrier("incomplete checkpoints swept")
        # read-only: the settings Orbax would otherwise override with a warning each
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=async_save, create=not read_only,
                                               read_only=read_only)
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
        return self._save(step, args, force)

    def save_params(self, step: int, params: Any, config: dict) -> bool:
        """Parameters and config without optimizer state (imported weights): enough for eval.py, which restores
        with params_only=True; resuming training from such a step is refused with a clear message."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config))
        return self._save(step, args, True)

    def _save(self, step: int, args, force: bool) -> bool:
        self.wait()  # Orbax waits for the previous save anyway; here its failure is named by its own step
        try:
            saved = self.mgr.save(step, args=args, force=force)
        except Exception as e:
            self._raise_if_storage_failure(e, step)
            raise
        if saved:
            self._in_flight = step
        return saved

    def _raise_if_storage_failure(self, e: BaseException, step: int | None) -> None:
        """A save the storage refused (full disk, quota, permissions) -> one CheckpointError line naming the
        fix and the step a rerun resumes from; the earlier checkpoints are untouched (Orbax deletes old steps
        only after a save commits) and the half-written one is swept when the run restarts."""
        failure = _storage_failure(e)
        if failure is None:
            return
        what, fix = failure
        done = [s for s in self.steps_on_disk() if s != step]
        then = (f"rerun the same command to resume from step {done[-1]}, the last complete checkpoint" if done
                else "rerun the same command (no checkpoint had been completed yet)")
        name = f"checkpoint step {step}" if step is not None else "a checkpoint"
        raise CheckpointError(f"saving {name} in {self.dir} failed: {what}; {fix} and {then}") from None

    def has_optimizer_state(self, step: int) -> bool:
        return (self.dir / str(step) / "opt").is_dir()

    def config(self, step: int) -> dict:
        try:
            return self.mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:
            raise CheckpointError(f"the config stored with checkpoint step {step} in {self.dir} cannot be read "
                                  f"({_reason(e)}); restore it from a copy, or ask for another step") from None

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
        """Restore onto the shardings in `abstract_state` (any mesh): `step`, or with step=None the latest
        complete checkpoint that can be read. An unreadable one is reported in one line and the one before it is
        tried; a writable Checkpoints (training) also moves it to checkpoints/corrupt/ so that its step can be
        saved again. An unreadable `step` asked for by number is a CheckpointError, never another step."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.dir}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.dir}; available: {steps}")
        candidates = [step] if step is not None else steps[::-1]
        failed: list[tuple[int, str]] = []
        for s in candidates:
            try:
                state = self._restore_one(s, abstract_state, params_only)
            except CheckpointError:
                raise
            except Exception as e:  # unreadable files
                failed.append((s, _reason(e)))
                continue
            if failed:
                self._report_unreadable(failed, s)
            return s, state
        if step is not None:
            others = [x for x in steps if x != step]
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir} cannot be read ({failed[0][1]}); "
                + (f"choose another of its steps ({others}), or restore its files from a copy" if others
                   else "it is the only one: restore its files from a copy, or train again"))
        raise CheckpointError(
            f"no checkpoint in {self.dir} can be read (" + "; ".join(f"step {s}: {why}" for s, why in failed[:3])
            + f"{'; ...' if len(failed) > 3 else ''}); restore the files from a copy, or train into a new run_dir=...")

    def _restore_one(self, s: int, abstract_state: dict, params_only: bool) -> dict:
        self.check_compatible(s, abstract_state["params"])
        if not params_only and not self.has_optimizer_state(s):
            raise CheckpointError(weights_only_message(self.dir.parent, s))
        items = {"params": ocp.args.StandardRestore(abstract_state["params"])}
        if not params_only:
            items["opt"] = ocp.args.StandardRestore(
                {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]})
        r = self.mgr.restore(s, args=ocp.args.Composite(**items))
        state = {"params": r.params}
        if not params_only:
            state.update(step=r.opt["step"], opt_state=r.opt["opt_state"])
        return state

    def _report_unreadable(self, failed: list[tuple[int, str]], used: int) -> None:
        """One line per unreadable step; training moves each aside (never deletes it) and tells Orbax."""
        moved = {}
        if not self.read_only:
            if jax.process_index() == 0:
                for s, _ in failed:
                    moved[s] = self._set_aside(s)
            barrier("unreadable checkpoints set aside")
            self.mgr.reload()
        for s, why in failed:
            aside = f"; moved it to {moved[s]}" if s in moved else ""
            self.log(f"checkpoint step {s} in {self.dir} cannot be read ({why}){aside}; using step {used}")

    def _set_aside(self, step: int) -> Path:
        dest_dir = self.dir / CORRUPT_DIR
        dest_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = dest_dir / f"{step}-{stamp}", 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{step}-{stamp}-{n}"
        (self.dir / str(step)).rename(dest)
        return dest

    def wait(self) -> None:
        """Until the asynchronous save in flight is complete; its failure for lack of space is one line."""
        step, self._in_flight = self._in_flight, None
        try:
            self.mgr.wait_until_finished()
        except Exception as e:
            self._raise_if_storage_failure(e, step)
            raise

    def close(self) -> None:
        self.wait()  # a failed save surfaces here as its one line, not from inside Orbax's close
        self.mgr.close()


def open_step(run_dir: str | Path, step: int | None = None, *, log: Callable[[str], None] = print
              ) -> tuple[Checkpoints, int, dict]:
    """A run directory's checkpoints for reading, the step to read (`step`, or the latest complete one) and
    the config stored with it; one clear error when the directory, its checkpoints or the step are missing.
    To fall back past an unreadable latest step, restore with step=None (as load_run does) rather than with
    the step returned here."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; pass a run directory written by train.py "
                              f"(or by convert.py from-hf)")
    ckpts = Checkpoints(run_dir, read_only=True, log=log)
    steps = ckpts.all_steps()
    if not steps:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint; train first (python train.py run_dir={run_dir})")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {ckpts.dir}; available steps: {steps}")
        return ckpts, step, ckpts.config(step)
    # Every step of a run stores the same model; an unreadable config is passed over like unreadable weights
    # (restore(step=None) then picks the weights).
    for i, s in enumerate(steps[::-1]):
        try:
            return ckpts, steps[-1], ckpts.config(s)
        except CheckpointError:
            if i + 1 == len(steps):
                raise
    raise AssertionError("unreachable")
