"""Experiment tracking, profiling and plots. A short run with log.tensorboard and log.wandb logs exactly the
numbers metrics.jsonl holds (read back from the event files and from W&B's offline run file), and its resumption
continues the same W&B run while TensorBoard shows each replayed step once; profile.steps writes a jax.profiler
trace (and a resumed run past the window none); plot.py draws several runs into one PNG; a missing tracker
package and a directory without metrics are one line each."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from conftest import read_losses, run_script

# evaluations at step 4 (the loop's) and 6 (the stage's final one); the trace covers the two steps that update
# state steps 1 and 2, after the first step's compilation and away from evaluations and saves
RUN = ["steps=6", "log_every=1", "checkpoint.every=4", "eval_every=4", "eval_batches=2", "log.tensorboard=true",
       "log.wandb=true", "profile.start_step=1", "profile.steps=2"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir: Path, key: str) -> dict[int, float]:
    """step -> `key` of the evaluation records, the last per step winning (as read_losses does for the loss)."""
    return {r["step"]: r[key] for r in records(run_dir) if "loss" not in r and key in r}


# ----------------------------------------------------------------------------------------------
# Reading back what the trackers wrote


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as TensorBoard shows them: the event files in order, each TFRecord checked (length,
    its crc, payload, its crc), and a SessionLog START at step s (a resumed run's purge_step) dropping what
    earlier files logged from step s on. A step shown twice (a replay that was not purged) fails."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    for f in files:
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc(header)
            payload = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == _masked_crc(payload)
            pos += 16 + n
            e = Event()
            e.ParseFromString(payload)
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in pts if s < e.step] for tag, pts in out.items()}
            for v in e.summary.value:
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    for tag, pts in out.items():
        steps = [s for s, _ in pts]
        assert len(set(steps)) == len(steps), f"{tag}: steps {steps} shown more than once"
    return {tag: dict(pts) for tag, pts in out.items()}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B run file (run-ID.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB,
    each record chunk [crc32 (4), length (2), type (1: whole, 2/3/4: first/middle/last)]."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += 32768 - pos % 32768
            continue
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def wandb_history(recs) -> list[dict]:
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]


def wandb_run_file(run_dir: Path, run_id: str) -> list[Path]:
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


# ----------------------------------------------------------------------------------------------
# One short tracked run, and its resumption from an earlier checkpoint


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_overrides, prepared) -> Path:
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    proc = run_script("train.py", *tiny_overrides, f"run_dir={run_dir}", *RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "profile: traced steps 1..2" in proc.stdout
    return run_dir


@pytest.fixture(scope="module")
def resumed(tracked, tmp_path_factory, tiny_overrides) -> tuple[Path, list[Path]]:
    """A copy of the tracked run rewound to its step-4 checkpoint and trained on to step 7: it replays steps 5-6,
    past the profile window."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(tracked, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    traces_before = sorted((run_dir / "profile").rglob("*.xplane.pb"))
    proc = run_script("train.py", *tiny_overrides, f"run_dir={run_dir}", *RUN[1:], "steps=7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resuming from checkpoint at step 4" in proc.stdout and "profile:" not in proc.stdout
    return run_dir, traces_before


def test_tensorboard_scalars_equal_metrics_jsonl(tracked):
    tb = tensorboard_scalars(tracked / "tensorboard")
    losses = read_losses(tracked)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert tb["train/loss"] == losses  # float32 on the device, so exact in the event file's float32 too
    lrs = {r["step"]: r["lr"] for r in records(tracked) if "loss" in r}
    assert tb["train/lr"] == lrs
    tps = {r["step"]: r["tokens_per_s"] for r in records(tracked) if "loss" in r}
    assert tb["train/tokens_per_s"] == pytest.approx(tps, rel=1e-6)
    # the loop's evaluation at step 4 and the stage's final one at step 6, under eval/
    assert tb["eval/val_loss"] == pytest.approx(evals(tracked, "val_loss"), rel=1e-6)
    assert sorted(tb["eval/val_loss"]) == [4, 6] and list(tb["eval/gzip_bits_per_byte"]) == [6]
    # None (mfu on a CPU) is left out, not logged as 0; the step is the axis, not a scalar
    assert all(r["mfu"] is None for r in records(tracked) if "loss" in r)
    assert "train/mfu" not in tb and "train/step" not in tb and "eval/step" not in tb


def test_wandb_offline_run_holds_the_config_and_the_losses(tracked):
    run_id = json.loads((tracked / "wandb.json").read_text())["id"]
    (run_file,) = wandb_run_file(tracked, run_id)
    recs = wandb_records(run_file)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.project == "gptjax"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["run_dir"] == str(tracked) and config["steps"] == 6 and config["log"]["wandb"] is True
    rows = wandb_history(recs)
    assert {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} == read_losses(tracked)
    assert {r["step"]: r["eval/val_loss"] for r in rows if "eval/val_loss" in r} == evals(tracked, "val_loss")


def test_profile_steps_write_a_trace(tracked):
    (trace,) = (tracked / "profile").rglob("*.xplane.pb")  # TensorBoard's Profile tab
    assert trace.stat().st_size > 0
    (perfetto,) = (tracked / "profile").rglob("perfetto_trace.json.gz")  # ui.perfetto.dev
    assert perfetto.read_bytes()[:2] == b"\x1f\x8b" and perfetto.parent == trace.parent


def test_resumed_run_continues_the_wandb_run_and_tensorboard_shows_the_replay(resumed):
    run_dir, traces_before = resumed
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, 8))
    # each step once (the first attempt's 5-6 purged), with metrics.jsonl's last value
    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert tb["train/loss"] == losses
    # the first attempt's final evaluation at step 6 is gone with the steps it belonged to; step 4's stays
    assert sorted(tb["eval/val_loss"]) == [4, 7] and list(tb["eval/gzip_bits_per_byte"]) == [7]
    # one W&B run id for both attempts: the second attempt logged the replayed steps and the new ones
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    attempts = wandb_run_file(run_dir, run_id)
    assert len(attempts) == 2
    second = wandb_history(wandb_records(attempts[1]))
    assert {r["step"]: r["train/loss"] for r in second if "train/loss" in r} == {s: losses[s] for s in (5, 6, 7)}
    # the profile window (state steps 1-2) lies before the resume point: no second trace
    assert sorted((run_dir / "profile").rglob("*.xplane.pb")) == traces_before and len(traces_before) == 1


@pytest.mark.parametrize("field, module", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_anything_runs(field, module, tiny_overrides, tmp_path,
                                                                     monkeypatch):
    from gptjax import config
    from gptjax.errors import ConfigError
    from gptjax.train.pretrain import pretrain

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    cfg = config.resolve("tiny", tiny_overrides + [f"run_dir={tmp_path / 'run'}", f"log.{field}=true"])
    with pytest.raises(ConfigError) as e:
        pretrain(cfg, log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and f"log.{field}=true" in msg and "pip install -e '.[track]'" in msg
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


# ----------------------------------------------------------------------------------------------
# plot.py


def plot_command(*args) -> int:
    """plot.py's main(argv) (gptjax/cli/plot.py), run in this process: argparse and one call, not worth an interpreter."""
    from gptjax.cli.plot import main

    return main([str(a) for a in args])


def test_plot_draws_several_runs_into_one_png(tracked, tmp_path):
    # a fine-tuning-shaped run beside the pretraining one, its metrics.jsonl ending in a line torn by a kill
    ft = tmp_path / "ft"
    ft.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 900.0, "mfu": None}
            for s in (1, 2, 3, 4)]
    rows += [{"step": 2, "val_acc": 0.6, "val_acc_stderr": 0.05, "val_n": 40},
             {"step": 4, "val_acc": 0.7, "val_acc_stderr": 0.05, "val_n": 40}]
    (ft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    out = tmp_path / "both.png"
    assert plot_command(tracked, ft, "--out", out) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # one panel per held-out metric of either run (accuracy, bits/byte), stderr drawn as error bars
    from gptjax.train import plot

    runs = [plot.read_metrics(d) for d in (tracked, ft)]
    assert plot.eval_keys(runs) == ["val_acc", "val_bits_per_byte"]
    assert sorted(runs[1][0]) == [1, 2, 3, 4]  # the torn line skipped
    # one run: RUN_DIR/plot.png by default
    assert plot.plot_runs([ft]) == ft / "plot.png" and (ft / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_directory_without_metrics_is_one_line(tracked, tmp_path, capsys):
    from gptjax.errors import DataError
    from gptjax.train import plot

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert plot_command(tracked, empty, "--out", tmp_path / "never.png") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and str(empty) in line and "metrics.jsonl" in line
    assert not (tmp_path / "never.png").exists()  # every directory is checked before anything is drawn
    for text in ("", '{"step": 3, "loss": 4.'):  # empty, and nothing but a torn line
        (empty / "metrics.jsonl").write_text(text)
        with pytest.raises(DataError, match="holds no metrics records"):
            plot.read_metrics(empty)
