"""The GPU benchmark script must run on the first try on a fresh GPU machine, so its whole path runs here on
the CPU at toy sizes: every section produces numbers and the one JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_gpu_benchmark_runs_every_section_at_toy_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out", str(out)],
                          env=subprocess_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["backend"] == "cpu"
    s = res["sections"]
    for preset in ("gpt2-small", "gpt2-medium"):
        r = s["train"][preset]
        assert r["tokens_per_s"] > 0 and r["batch_size"] == 4, r
    att = s["attention"]
    assert att["ok"], att
    rows = att["result"]
    # cuDNN is not on a CPU: those rows run attention.py's fallback (blockwise), but every row is there
    assert {(r["impl"], r["layer"]) for r in rows} == {(i, k) for i in ("cudnn", "blockwise") for k in ("dense", "banded")}
    assert all(r["fwd_bwd_s"] > 0 for r in rows)
    smp = s["sample"]
    assert smp["ok"] and all(r["tokens_per_s"] > 0 for r in smp["result"]["rows"]), smp
    vt = s["vs_torch"]
    assert vt["ok"], vt
    tps = vt["result"]["tokens_per_s"]
    assert set(tps) == {"torch_eager", "gptjax"} and min(tps.values()) > 0
    assert vt["result"]["ratio_gptjax_over_torch_eager"] > 0


def test_data_benchmark_runs_at_a_toy_size(tmp_path):
    """bench/data_prep.py end to end on a few MB: corpus, preparation, second start, raw tokenizer speed."""
    out = tmp_path / "data_prep.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "data_prep.py"), "--tiny", "--vocab", "1024",
                           "--out", str(out)], env=subprocess_env(1), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["text_bytes"] >= 4e6 and run["tokens"] > 1e6 and run["peak_rss_gb"] > 0
    assert 0 < run["second_start_s"] < run["prepare_s"] and 0 < run["pipeline_vs_raw"] < 5


def test_finetune_analyses_pool_names_a_failed_runs_log_and_sizes_are_checked(tmp_path, monkeypatch):
    """bench/finetune_analyses.py runs its fine-tuning runs as pinned child processes: a run that fails stops the
    pool with one line naming its log, and that log holds the child's own error."""
    import importlib.util

    import pytest

    from gptjax.errors import ConfigError, DataError

    spec = importlib.util.spec_from_file_location("finetune_analyses", REPO / "bench" / "finetune_analyses.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    assert fa._sizes(["code-body=300:128"])["code-body"] == (300, 128)
    assert fa._sizes([])["code-follows"] == fa.SIZES["code-follows"]
    with pytest.raises(ConfigError, match="TASK=N_TRAIN:MAX_LEN"):
        fa._sizes(["code-bogus=3:4"])
    for key, value in subprocess_env(1).items():
        monkeypatch.setenv(key, value)
    missing = tmp_path / "no-such-run"
    jobs = [(tmp_path / "runs" / "a", [str(missing), "task=code-follows"])]
    with pytest.raises(DataError, match=r"runs/a failed \(exit 2\); its log: .*runs/a\.log"):
        fa._run_pool(jobs, 2, print)
    assert "is not a directory" in (tmp_path / "runs" / "a.log").read_text()
    done = tmp_path / "runs" / "b"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    fa._run_pool([(done, ["unused"])], 2, print)  # a finished run is skipped, not started again
    assert not (tmp_path / "runs" / "b.log").exists()


def test_finetune_analyses_pool_stops_the_other_runs_when_one_fails(tmp_path, monkeypatch):
    """A failed run stops the runs still going: no child is left running after the pool raises."""
    import importlib.util
    import os

    import pytest

    from gptjax.errors import DataError

    spec = importlib.util.spec_from_file_location("finetune_analyses", REPO / "bench" / "finetune_analyses.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    # a stand-in interpreter: the "slow" run records its pid and sleeps, the other fails a moment later
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in\n  *task=slow*) echo $$ > {tmp_path}/slow.pid; exec sleep 60;;\n"
                    "  *) sleep 1; echo 'error: bad run'; exit 2;;\nesac\n")
    fake.chmod(0o755)
    monkeypatch.setattr(fa.sys, "executable", str(fake))
    jobs = [(tmp_path / "runs" / "slow", ["task=slow"]), (tmp_path / "runs" / "bad", ["task=bad"])]
    with pytest.raises(DataError, match="runs/bad failed"):
        fa._run_pool(jobs, 2, print)
    pid = int((tmp_path / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
