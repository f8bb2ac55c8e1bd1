"""A plain (non-editable) install carries its presets and commands; libtpu stays quiet where there is no TPU."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL

COMMANDS = ("train", "finetune", "rlhf", "eval", "sample", "convert", "scaling", "plot")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip would install, built offline from a copy of the source tree (not the working tree itself,
    so no build/ folder lands in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "docs", "bench", "tests"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("gptjax-*.whl")
    return whl


def test_wheel_ships_every_preset_and_sweep(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.relative_to(REPO / "gptjax").as_posix() for p in (REPO / "gptjax" / "configs").rglob("*.json"))
    assert "configs/tiny.json" in [p.removeprefix("configs/") and p for p in presets]
    missing = [p for p in presets if f"gptjax/{p}" not in names]
    assert not missing, missing
    assert "gptjax/configs/sweeps/cpu-ladder.json" in names


def test_installed_wheel_finds_its_presets_outside_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("GPTJAX_CONFIGS", None)
    code = ("import gptjax.config as c, gptjax.scaling as s; assert c.__file__.startswith(%r), c.__file__; "
            "print(','.join(c.list_presets())); print(c.load_preset('gpt2-small').model.n_layer); "
            "print(','.join(s.list_sweeps()))" % str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    presets, n_layer, sweeps = out.stdout.split()
    assert {"tiny", "gpt1", "gpt2-small", "gpt3-175b"} <= set(presets.split(","))
    assert n_layer == "12" and "cpu-ladder" in sweeps.split(",")
    assert sorted(p.stem for p in (REPO / "configs").glob("*.json")) == sorted(presets.split(","))


def test_console_scripts_point_at_the_commands(monkeypatch):
    """Each console script runs its command's main() (through gptjax/cli/entry.py, which first restarts the
    process with huge pages where that helps: stubbed out here, so pytest itself is not restarted)."""
    from gptjax.cli import entry

    monkeypatch.setattr(entry, "reexec_with_huge_pages", lambda: None)
    eps = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("gptjax-")}
    for name in COMMANDS:
        ep = eps[f"gptjax-{name}"]
        module = importlib.import_module(f"gptjax.cli.{name}")
        if name == "plot":  # no jax, nothing to gain from huge pages
            assert ep.value == "gptjax.cli.plot:main" and ep.load() is module.main
            continue
        assert ep.value.startswith("gptjax.cli.entry:")
        monkeypatch.setattr(module, "main", lambda name=name: f"ran {name}")
        assert ep.load()() == f"ran {name}"
    # the root script and the console script are one command
    root = (REPO / "train.py").read_text()
    assert "from gptjax.cli.train import main as command" in root and "reexec_with_huge_pages()" in root


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("gptjax-train")
    assert exe.exists(), "reinstall the package (pip install -e .) to get the console scripts"
    out = subprocess.run([str(exe), "--list-presets"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "gpt2-small" in out.stdout.split()


def test_libtpu_prints_nothing_on_a_machine_without_a_tpu(tmp_path):
    pytest.importorskip("libtpu", reason="the tpu extra is part of the test install")  # noqa: the README installs it
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import gptjax, jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["cpu"]
    assert "TPU" not in out.stderr and "E0000" not in out.stderr, out.stderr[-2000:]
    # and compiling for a TPU topology from here still works
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY_MODEL, "model.vocab_size=512",
                           "batch_size=8", "--compile-only", "--topology", "v5e:2x2"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "E0000" not in proc.stderr and "TPU worker hostnames" not in proc.stderr
