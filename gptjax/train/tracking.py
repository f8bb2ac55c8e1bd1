"""Experiment trackers beside RUN_DIR/metrics.jsonl (which is always written): TensorBoard event files in
RUN_DIR/tensorboard (tensorboardX) and Weights & Biases in RUN_DIR/wandb, each turned on by `log.*` and each an
optional package (pip install -e '.[track]'). loop.MetricsLog hands them every record it writes; process 0
alone creates them.

Every numeric field of a record becomes a scalar GROUP/NAME at the record's step: the loop's step records are
`train/` (train/loss, train/lr, train/tokens_per_s, ...), everything else a stage writes, its evaluations, is
`eval/` (eval/val_loss, eval/val_acc, ...). None and non-numeric values are left out.

A resumed run replays the steps after its checkpoint. TensorBoard is told to drop what an earlier attempt
logged from the first replayed step on (purge_step), so it shows the replay, as metrics.jsonl's last record
per step does. W&B continues the run whose id RUN_DIR/wandb.json holds; its history only grows, so the x axis
is our `step` (define_metric) rather than W&B's own counter, and a replayed step appears twice.
"""

from __future__ import annotations

import atexit
import importlib
import json
import numbers
from pathlib import Path

from gptjax.config import LogConfig
from gptjax.errors import ConfigError

INSTALL = "pip install -e '.[track]'"
_PACKAGES = (("tensorboard", "tensorboardX"), ("wandb", "wandb"))  # (log.FIELD, the module it needs)


def require(cfg: LogConfig) -> None:
    """Refuse a tracker whose package is missing, before anything is prepared or trained (on every process, so
    that all stop alike although process 0 alone will write)."""
    for field, module in _PACKAGES:
        if getattr(cfg, field):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"log.{field}=true needs the {module} package, which cannot be imported ({e}); "
                                  f"install it with {INSTALL}, or drop log.{field}=true") from None


def scalars(rec: dict) -> dict[str, float]:
    """The record's numeric fields but its step; bools (flags, not measurements) and None are left out."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run_dir: Path, start: int):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard forgets an earlier attempt's events from the first step this one rewrites
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)

    def write(self, group: str, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{group}/{k}", v, step)
        self.writer.flush()  # records come every log_every steps: cheap, and nothing is lost to a kill

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict):
        import wandb

        id_path = run_dir / "wandb.json"
        run_id = json.loads(id_path.read_text()).get("id") if id_path.exists() else None
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, mode=cfg.wandb_mode,
                                  dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name, config=config)
        except wandb.errors.Error as e:  # e.g. online without `wandb login`
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"W&B could not start a run ({first}); run `wandb login`, or train with log.wandb_mode="
                              f"offline (and `wandb sync {run_dir}/wandb/offline-run-*` later)") from None
        if cfg.wandb_mode != "disabled" and run_id is None:
            id_path.write_text(json.dumps({"id": self.run.id, "project": cfg.wandb_project}) + "\n")
        self.run.define_metric("step")
        for group in ("train", "eval"):
            self.run.define_metric(f"{group}/*", step_metric="step")

    def write(self, group: str, step: int, values: dict[str, float]) -> None:
        self.run.log({**{f"{group}/{k}": v for k, v in values.items()}, "step": step})

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers `cfg` turns on, opened by `open(start)` once the loop knows the step it starts from."""

    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict):
        require(cfg)
        self.cfg, self.run_dir, self.config = cfg, Path(run_dir), config
        self.writers: list | None = None  # None: not opened yet
        self.closed = False

    def open(self, start: int) -> None:
        if self.writers is not None or self.closed:
            return
        self.writers = []
        atexit.register(self.close)  # a stage that dies after the loop still flushes and finishes its runs
        if self.cfg.tensorboard:
            self.writers.append(TensorBoard(self.run_dir, start))
        if self.cfg.wandb:
            self.writers.append(WandB(self.cfg, self.run_dir, self.config))

    def write(self, group: str, rec: dict) -> None:
        if self.writers is None:
            self.open(0)
        values = scalars(rec)
        if values and "step" in rec and not self.closed:
            for w in self.writers:
                w.write(group, int(rec["step"]), values)

    def close(self) -> None:
        atexit.unregister(self.close)
        self.closed = True
        writers, self.writers = self.writers or [], []
        for w in writers:
            w.close()
