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


def _finetune_analyses():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_analyses", REPO / "bench" / "finetune_analyses.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    return fa


def test_finetune_analyses_averages_seeds_with_the_larger_error_and_pairs_the_ablations():
    """Each cell is the mean over the seeds that ran it; its error is the larger of the spread over seeds and the
    items' own error; the pretraining and aux-LM effects are per-seed paired differences; a task run with one
    seed keeps that seed's numbers; Figure 2 averages each k (JSON's string keys too)."""
    import math

    import pytest

    from gptjax.errors import ConfigError

    fa = _finetune_analyses()
    (pre, lam0, rnd) = (r[0] for r in fa.ROWS)

    def row(p, l0, r, se=0.02, z=0.5):
        cell = lambda v: {"acc": v, "stderr": se, "steps": 10}  # noqa: E731
        return {"metric": "acc", "baseline": {"name": "majority", "acc": 0.3, "acc_stderr": 0.0},
                "zero-shot": {"acc": z, "acc_stderr": se, "how": "likelihood"}, "n_train": 100, "n_val": 50,
                "dropped": [0, 0], pre: cell(p), lam0: cell(l0), rnd: cell(r)}

    per_seed = {0: {"table5": {"a": row(0.80, 0.70, 0.60), "b": row(0.4, 0.5, 0.3)},
                    "figure2": {0: {"value": 0.3, "stderr": 0.01, "metric": "acc"},
                                1: {"value": 0.5, "stderr": 0.01, "metric": "acc"}}},
                1: {"table5": {"a": row(0.90, 0.92, 0.70)},
                    "figure2": {"0": {"value": 0.5, "stderr": 0.01, "metric": "acc"},
                                "1": {"value": 0.5, "stderr": 0.01, "metric": "acc"}}}}
    out = fa.aggregate(per_seed, [0, 1])
    a = out["table5"]["a"][pre]
    assert a["acc"] == pytest.approx(0.85) and a["seeds"] == [0.80, 0.90]
    assert a["stderr"] == pytest.approx(0.05)  # the spread over seeds (std 0.0707 / sqrt 2) beats the items' 0.0141
    b = out["table5"]["b"]
    assert b["seeds"] == [0] and b[pre]["acc"] == 0.4 and b[pre]["stderr"] == pytest.approx(0.02)  # one seed: items
    eff = out["effects"]["a"]
    assert eff["pretraining"]["seeds"] == pytest.approx([0.2, 0.2]) and eff["pretraining"]["positive"] == 2
    assert eff["pretraining"]["stderr"] == pytest.approx(math.hypot(0.02, 0.02) * math.sqrt(2) / 2)  # no spread
    assert eff["aux_lm"]["seeds"] == pytest.approx([0.1, -0.02]) and eff["aux_lm"]["positive"] == 1
    assert out["effects"]["b"]["aux_lm"]["positive"] == 0 and out["effects"]["b"]["aux_lm"]["of"] == 1
    f2 = out["figure2"]
    assert f2[0]["value"] == pytest.approx(0.4) and f2[0]["stderr"] == pytest.approx(0.1)
    assert f2[1]["value"] == pytest.approx(0.5) and f2[1]["stderr"] == pytest.approx(math.sqrt(2) * 0.01 / 2)

    class Args:
        seed, seeds = None, "0,1,2"
    assert fa._seed_list(Args) == [0, 1, 2]
    Args.seed = 5
    assert fa._seed_list(Args) == [5]
    Args.seed, Args.seeds = None, "1,1"
    with pytest.raises(ConfigError, match="distinct integers"):
        fa._seed_list(Args)


def test_overlap_reference_picks_the_choice_that_shares_the_signatures_names():
    """The model-free reference of a multiple-choice task: the choice sharing most identifiers with the context
    wins (keywords and self do not count)."""
    from gptjax.finetune.task import Example, FinetuneTask

    fa = _finetune_analyses()
    val = [Example(("def area(width, height):", ""), 2, ("return self.x", "pass", "return width * height",
                                                         "return None")),
           Example(("def push(self, item):", ""), 0, ("self.items.append(item)", "return self", "x = 1", "pass"))]
    ref = fa.overlap_reference(FinetuneTask("t", "multiple_choice", [], val))
    assert ref["acc"] == 1.0 and ref["name"].startswith("identifier overlap")
    swapped = [Example(e.segments, (e.label + 1) % 4, e.choices) for e in val]
    assert fa.overlap_reference(FinetuneTask("t", "multiple_choice", [], swapped))["acc"] == 0.0


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


def test_icl_score_reads_every_checkpoint_and_its_mean_is_the_heldout_loss(tmp_path, tiny_overrides, prepared):
    """bench/icl_score.py: per-position held-out losses whose token-weighted mean is eval's held-out loss, the
    ICL score from its bands, one record per kept checkpoint."""
    from conftest import run_script

    run_dir = tmp_path / "run"
    proc = run_script("train.py", "--config", "tiny", *tiny_overrides, f"run_dir={run_dir}", "steps=12",
                      "checkpoint.every=6", "checkpoint.keep=5", "optim.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "icl.json"
    proc = run_script(str(REPO / "bench" / "icl_score.py"), run_dir, "--all-steps", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert [r["step"] for r in recs] == [6, 12]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = recs[-1]
    assert abs(last["mean"] - summary["val_loss"]) < 1e-4
    T = len(last["per_position"])
    assert sum(last["counts"]) == last["tokens"] and T == len(last["counts"])
    late = sum(x * c for x, c in zip(last["per_position"][-T // 8:], last["counts"][-T // 8:])) / sum(last["counts"][-T // 8:])
    assert abs(last["late"] - late) < 1e-9 and abs(last["icl_score"] - (last["late"] - last["early"])) < 1e-12
    assert recs[0]["mean"] > recs[1]["mean"]  # 6 more steps of training lower the held-out loss
    proc = run_script(str(REPO / "bench" / "icl_score.py"), tmp_path / "no-such-run")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    # bench/heldout_overlap.py on the same run: the tagged and untagged tokens make up the held-out mean
    out = tmp_path / "overlap.json"
    proc = run_script(str(REPO / "bench" / "heldout_overlap.py"), run_dir, "--min-chars", "10", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["runs"][0]
    assert 0 < r["seen_fraction"] < 1 and r["tokens"] > 1000
    f = r["seen_fraction"]
    assert abs(f * r["seen"] + (1 - f) * r["unseen"] - r["mean"]) < 1e-6
    assert abs(r["mean"] - summary["val_loss"]) < 0.1  # files tokenised one by one: close to eval's, not equal


def test_heldout_overlap_tags_the_tokens_of_lines_seen_in_training(tmp_path, prepared):
    import importlib.util

    import sentencepiece as spm

    spec = importlib.util.spec_from_file_location("heldout_overlap", REPO / "bench" / "heldout_overlap.py")
    ho = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ho)
    sp = spm.SentencePieceProcessor(model_file=str(next(prepared.glob("**/tokenizer.model"))))
    seen = ho.seen_lines(["def f():\n    return some_long_name_here\n", "x = 1\n"], 10)
    assert seen == {"return some_long_name_here"}  # "x = 1" and "def f():" are shorter than 10 characters
    doc = "é = 2\n  return some_long_name_here\nprint(é)\n"
    ids, tags = ho.tagged_tokens(sp, doc, seen, 10)
    assert ids == sp.encode(doc)
    pieces = [sp.id_to_piece(i) for i in ids]
    tagged = "".join(p for p, t in zip(pieces, tags) if t).replace("\u2581", " ")
    assert tagged.strip() == "return some_long_name_here"
    assert "print" not in tagged and "2" not in tagged


def test_extrapolate_bands_recovers_an_exact_power_law_and_names_a_missing_run(tmp_path, capsys):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("extrapolate_bands", REPO / "bench" / "extrapolate_bands.py")
    eb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eb)
    law = lambda c, a: 20.0 * c ** -a  # noqa: E731
    flops = {"a": 1e11, "b": 4e11, "c": 1.6e12, "big": 1.6e13}
    recs = []
    for n, c in flops.items():
        bands = {k: law(c, 0.05 + 0.01 * i) for i, k in enumerate(["mean", "0", "1-7", "early", "mid", "late"])}
        bands["late"] = bands["late"] * (0.9 if n == "big" else 1.0)  # the big run beats the law late in the context
        recs.append({"run": f"runs/x/{n}", "step": 1, **bands, "icl_score": bands["late"] - bands["early"]})
    (tmp_path / "icl.json").write_text(json.dumps(recs))
    args = ["--icl", str(tmp_path / "icl.json"), "--fit", "a=1e11", "b=4e11", "c=1.6e12", "--predict", "big=1.6e13"]
    assert eb.main(args) == 0
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in capsys.readouterr().out.splitlines()}
    assert rows["held-out loss, all tokens"].endswith(("(+0.0%) |", "(-0.0%) |")) and "| -0.0500 |" in rows["held-out loss, all tokens"]
    assert rows['last T/8 positions ("late")'].endswith("(+11.1%) |")  # 1 / 0.9 - 1
    with pytest.raises(SystemExit, match="nope not in"):
        eb.main(args[:-1] + ["nope=1e13"])


def test_step_profile_attributes_the_step_to_its_matmuls(tmp_path):
    """bench/step_profile.py on a toy shape: the trace's ops are matched to the compiled HLO, the output layer's
    [B*T, V] logits matmul is among them, and the ops' times are positive and below the traced step's (at this
    size host dispatch and the profiler take most of the step)."""
    out = tmp_path / "prof.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step_profile.py"), "--config", "tiny",
                           "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
                           "model.vocab_size=256", "batch_size=4", "--steps", "2", "--json", str(out)],
                          env=subprocess_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    whats = [r["what"] for r in res["ops"]]
    assert any(w.startswith("dot f32[128,256]") for w in whats), whats  # logits: 4 x 32 tokens, vocab 256
    assert all(r["ms"] >= 0 for r in res["ops"]) and len(res["ops"]) > 10
    assert 0 < res["ops_ms_sum"] < 2 * res["step_ms_traced"], res
    assert "traced step" in proc.stdout


def test_cpu_pieces_step_ab_compiles_every_variant_and_restores_the_pieces(tmp_path):
    """bench/cpu_pieces.py --step at a toy size: the step as now, with the reference attention, with the
    autodiff output layer and with the one-hot output gradient each compiles and times, and the patched pieces
    are put back afterwards."""
    import contextlib
    import importlib.util
    import io

    from gptjax import attention as att
    from gptjax.train import steps

    spec = importlib.util.spec_from_file_location("cpu_pieces", REPO / "bench" / "cpu_pieces.py")
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    before = (att.dense_attention, steps.tied_output_nats, steps._minus_at_targets)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cp.step_ab(["tiny", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
                    "model.vocab_size=256", "batch_size=4"], rounds=1)
    lines = out.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["now", "reference", "autodiff", "one-hot"], lines
    assert all(float(ln.split("ms")[0].split()[-1]) > 0 for ln in lines[1:])
    assert (att.dense_attention, steps.tied_output_nats, steps._minus_at_targets) == before
