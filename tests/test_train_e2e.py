"""train.py and eval.py as a user runs them: a short run writes everything it promises, eval.py reads it
back, and mistakes end with exit code 2 and one 'error:' line instead of a traceback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import finished_steps, read_losses, run_script

from gptjax import config


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_overrides, prepared):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_script("train.py", "--config", "tiny", *tiny_overrides, f"run_dir={run_dir}", "steps=6",
                      "checkpoint.every=3", "checkpoint.keep=2", "sample_tokens=5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc


def test_train_writes_config_metrics_tokenizer_and_checkpoints(run, tiny_overrides, prepared):
    run_dir, proc = run
    # the resolved config, loadable and equal to what the command line asked for
    cfg = config.load_json(run_dir / "config.json")
    assert cfg == config.resolve("tiny", tiny_overrides + [f"run_dir={run_dir}", "steps=6", "checkpoint.every=3",
                                                           "checkpoint.keep=2", "sample_tokens=5"])
    assert (run_dir / "tokenizer.model").read_bytes() == (prepared / "tokenizer.model").read_bytes()
    losses = read_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses[1] - math.log(512)) < 0.3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["step"] == 6 and math.isfinite(final["val_loss"]) and final["gzip_bits_per_byte"] > 0
    assert all(math.isfinite(r["lr"]) and r["grad_norm"] > 0 for r in records if "loss" in r)
    # checkpoints every 3 steps and at the end, each complete with its config
    assert finished_steps(run_dir) == [3, 6]
    for step in (3, 6):
        names = {p.name for p in (run_dir / "checkpoints" / str(step)).iterdir()}
        assert {"params", "opt", "config"} <= names
    assert not list((run_dir / "checkpoints").glob("*tmp*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["val_loss"] == final["val_loss"]
    assert summary["sample"].startswith(cfg.sample_prompt) and len(summary["sample"]) > len(cfg.sample_prompt)
    assert "sample:" in proc.stdout and "held-out (step 6)" in proc.stdout


def test_eval_reports_the_same_held_out_loss(run, tmp_path, token_data):
    run_dir, _ = run
    out = tmp_path / "out.json"
    proc = run_script("eval.py", run_dir, "--json", out, "--prompt", "def ", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert res["step"] == 6 and res["split"] == "val"
    assert math.isfinite(res["loss"]) and 0 < res["bits_per_byte"] < 20
    assert res["tokens"] == token_data.tokens("val") - len(token_data.shards["val"])
    # the same parameters on the same windows: the number train.py reported at the end
    summary = json.loads((run_dir / "summary.json").read_text())
    np.testing.assert_allclose(res["loss"], summary["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(res["bits_per_byte"], summary["val_bits_per_byte"], rtol=1e-5)
    assert res["sample"].startswith("def ") and len(res["sample"]) > 4
    assert "val @ step 6" in proc.stdout


def test_eval_restores_onto_eight_devices(run, tmp_path):
    """Trained on one device, evaluated on an 8-device fsdp mesh: the same loss."""
    run_dir, _ = run
    out = tmp_path / "out8.json"
    proc = run_script("eval.py", run_dir, "--json", out, devices=8)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    np.testing.assert_allclose(json.loads(out.read_text())["loss"], summary["val_loss"], rtol=1e-5)


def test_eval_any_text_file(run, tmp_path, corpus_dir):
    run_dir, _ = run
    out = tmp_path / "text.json"
    text_file = sorted(corpus_dir.glob("*.py"))[0]
    proc = run_script("eval.py", run_dir, "--text", text_file, "--json", out, "--step", "3")
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert res["split"] == f"text:{text_file}" and res["step"] == 3
    assert math.isfinite(res["loss"]) and res["tokens"] > 100
    assert math.isfinite(res["bits_per_byte"]) and res["bits_per_byte"] > 0
    assert "sample" not in res


def test_eval_errors_are_one_line(run, tmp_path):
    run_dir, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("eval.py", empty)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "no checkpoints" in line and "run_dir" in line

    proc = run_script("eval.py", run_dir, "model.n_layer=3")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "different model" in line and "(2, 64, 3, 2, 32) vs model (3, 64, 3, 2, 32)" in line

    proc = run_script("eval.py", run_dir, "--step", "4")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "no checkpoint for step 4" in line and "[3, 6]" in line

    blank = tmp_path / "blank.txt"
    blank.write_text("")
    proc = run_script("eval.py", run_dir, "--text", blank)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "too short to evaluate" in line


def test_train_errors_are_one_line(run, tiny_overrides):
    run_dir, _ = run
    proc = run_script("train.py", "--config", "tiny", "model.n_layers=2")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "did you mean 'model.n_layer'" in line

    # resuming a run directory with another model is refused before anything is touched
    before = (run_dir / "metrics.jsonl").read_bytes()
    proc = run_script("train.py", *tiny_overrides, f"run_dir={run_dir}", "steps=6", "model.d_model=32")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "different model" in line and "model.d_model: 64 -> 32" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert finished_steps(run_dir) == [3, 6]


def test_eval_scores_tasks_zero_and_few_shot_and_samples_with_the_cache(run, tmp_path):
    run_dir, _ = run
    mc = tmp_path / "mine.jsonl"
    mc.write_text("".join(json.dumps({"context": f"x{i} =", "choices": [" 1", " 2", " 3"], "gold": i % 3}) + "\n"
                          for i in range(6)))
    out = tmp_path / "tasks.json"
    proc = run_script("eval.py", run_dir, "--skip-heldout", "--tasks", f"code-nextline,code-cloze,{mc}",
                      "--shots", "0,2", "--limit", "12", "--num-items", "30", "--json", out,
                      "--prompt", "def ", "--prompt", "import", "--max-tokens", "12", "--stop", "\\n\\n",
                      "--temperature", "0.9", "--top-p", "0.9", timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert "loss" not in res  # --skip-heldout
    scores = res["tasks"]
    assert set(scores) == {"code-nextline", "code-cloze", "mine"}
    for name, by_shots in scores.items():
        assert set(by_shots) == {"0", "2"}
        for m in by_shots.values():
            assert m["n"] == (6 if name == "mine" else 12) and 0 <= m["acc"] <= 1
    assert scores["code-nextline"]["0"]["chance"] == 0.25 and 0 <= scores["code-nextline"]["2"]["acc_norm"] <= 1
    assert scores["code-cloze"]["0"]["ppl"] > 1
    # the table on stdout, and two samples, each its prompt plus at most one stop-free continuation
    assert "code-nextline  0" in proc.stdout and "acc_norm" in proc.stdout
    assert [s[:4] for s in res["samples"]] == ["def ", "impo"]
    assert all("\n\n" not in s for s in res["samples"])

    proc = run_script("eval.py", run_dir, "--skip-heldout", "--tasks", "code-nextlin")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "not a built-in" in line and "code-nextline" in line
    proc = run_script("eval.py", run_dir, "--skip-heldout", "--tasks", "code-cloze", "--shots", "1,x")
    assert proc.returncode == 2 and "--shots takes" in error_lines(proc)[0]


def test_sample_command_cache_and_no_cache_agree(run, tmp_path):
    run_dir, _ = run
    outs = []
    for extra in ([], ["--no-cache"]):
        out = tmp_path / f"s{len(extra)}.json"
        proc = run_script("sample.py", run_dir, "--prompt", "def ", "--prompt", "import", "--num-samples", "2",
                          "--temperature", "0", "--max-tokens", "10", "--json", out, *extra)
        assert proc.returncode == 0, proc.stderr[-5000:]
        outs.append(json.loads(out.read_text()))
        assert "tokens/s" in proc.stdout
    cached, full = outs
    assert cached["samples"] == full["samples"] and len(cached["samples"]) == 4
    assert cached["samples"][0] == cached["samples"][1] and cached["samples"][0].startswith("def ")
    # seeded sampling: the same seed twice gives the same samples
    a, b = (run_script("sample.py", run_dir, "--prompt", "x", "--num-samples", "3", "--seed", "5", "--max-tokens", "8")
            for _ in range(2))
    assert a.returncode == 0 and a.stdout.split("tokens in")[0] == b.stdout.split("tokens in")[0]
    proc = run_script("sample.py", run_dir, "--num-samples", "0")
    assert proc.returncode == 2 and error_lines(proc)
