"""InstructGPT's PPO stage (gptjax/rlhf/ppo_stage.py) end to end on a tiny pretrain -> SFT -> reward chain: a run
records its lineage, evaluates the SFT policy against itself at step 0 (KL exactly 0, win rate exactly 1/2),
trains with PPO-ptx, writes its final policy as a language-model run, a killed run resumes to exactly the
uninterrupted one, and bad settings are one line. DPO (gptjax/rlhf/dpo.py) on the same chain's rankings: it starts
at log 2, is evaluated on PPO's axes, resumes exactly, and refuses bad input in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import finished_steps, run_script

from gptjax.rlhf.config import resolve_ppo

BLOCK = 256  # a prompt of the code task and a short completion
ITERS, EVERY = 3, 2


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_overrides, prepared) -> dict:
    """pretrain (a held-out fifth of the corpus's files: the code task's evaluation prompts) -> 1-step SFT ->
    a 3-step reward model on synthetic rankings."""
    from gptjax import config
    from gptjax.data import load_tokenizer
    from gptjax.rlhf import code_task
    from gptjax.rlhf.config import resolve_reward, resolve_sft
    from gptjax.rlhf.reward import train_reward
    from gptjax.rlhf.sft import sft
    from gptjax.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("ppo-chain")
    pre = root / "pretrain"
    pretrain(config.resolve("tiny", tiny_overrides + [f"model.block_size={BLOCK}", "data.val_fraction=0.2", "steps=4",
                                                      f"run_dir={pre}"]), log=_quiet)
    tok = load_tokenizer(pre)
    data_cfg = config.load_json(pre / "config.json").data
    found = [e for s in ("train", "val") for e in code_task.prompts(s, data_cfg=data_cfg, body_lines=(1, 12))]
    short = [e for e in found if len(tok.encode(e.prompt + e.response)) <= 200]
    items = [it for e in short for it in code_task.synthetic_items([e], k=4)]
    assert len(items) >= 8, "the corpus fixture holds unexpectedly few short functions"

    def write(name, records):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return root / name

    demos = write("demos.jsonl", [{"prompt": e.prompt, "response": e.response} for e, _ in items])
    train = write("rankings.jsonl", code_task.ranking_records(items[:-4]))
    val = write("val.jsonl", code_task.ranking_records(items[-4:], code_task.HELDOUT_LABELERS))
    one = jax.devices()[:1]
    sft(resolve_sft([f"init_from={pre}", f"data={demos}", f"run_dir={root / 'sft'}", "steps=1", "batch_size=2",
                     "eval_batch_size=2"]), devices=one, log=_quiet)
    train_reward(resolve_reward([f"init_from={root / 'sft'}", f"data={train}", f"val={val}",
                                 f"run_dir={root / 'reward'}", "steps=3", "batch_size=4", "eval_batch_size=8"]),
                 devices=one, log=_quiet)
    return {"pretrain": pre, "sft": root / "sft", "reward": root / "reward", "rankings": train, "val_rankings": val}


def _cfg(chain, run_dir, *extra):
    return resolve_ppo([f"init_from={chain['sft']}", f"reward={chain['reward']}", f"run_dir={run_dir}",
                        f"iterations={ITERS}", "prompts=8", "minibatch=4", "ppo_epochs=2", "max_new_tokens=16",
                        "eval_samples=2", f"eval_every={EVERY}", f"checkpoint.every={EVERY}", "checkpoint.keep=10",
                        "sample_batch=16", "lr=3e-4", "ptx_coef=0.5", "ptx_batch=2", *extra])


def _copy_as_killed(src: Path, dst: Path, step: int) -> Path:
    """`src` as a SIGKILL just after iteration `step + 1` leaves it: checkpoints through `step`, metrics through
    `step + 1`, no final policy, no summary."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step + 1))
    shutil.rmtree(dst / "policy")
    (dst / "summary.json").unlink()
    return dst


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chain):
    from gptjax.rlhf.ppo_stage import train_ppo

    root = tmp_path_factory.mktemp("ppo-runs")
    a = root / "a"
    out_a: list[str] = []
    summary_a = train_ppo(_cfg(chain, a), devices=jax.devices()[:1], log=out_a.append)
    b = _copy_as_killed(a, root / "b", EVERY)
    assert finished_steps(b) == [EVERY]
    out_b: list[str] = []
    summary_b = train_ppo(_cfg(chain, b), devices=jax.devices()[:1], log=out_b.append)
    return {"a": a, "b": b, "out_a": out_a, "out_b": out_b, "summary_a": summary_a, "summary_b": summary_b}


def test_ppo_run_records_its_lineage_and_evaluates_sft_against_itself_at_step_0(runs, chain):
    a, summary = runs["a"], runs["summary_a"]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["stage"] == "ppo" and cfg["init_from"] == str(chain["sft"]) and cfg["reward"] == str(chain["reward"])
    assert [x["run_dir"] for x in cfg["lineage"][:2]] == [str(chain["sft"].absolute()),
                                                         str(chain["pretrain"].absolute())]
    recs = _records(a)
    train = {r["step"]: r for r in recs if "loss" in r}
    evals = {r["step"]: r for r in recs if "win_rate" in r and "loss" not in r}
    assert sorted(train) == list(range(1, ITERS + 1))
    for r in train.values():  # the rollouts' reward-model and labeler scores, KL, PPO's losses and PPO-ptx's term
        assert all(np.isfinite(r[k]) for k in ("loss", "pg_loss", "vf_loss", "kl", "score", "true_score",
                                                "clipfrac", "grad_norm", "ptx_loglik"))
        assert r["ptx_loglik"] < 0 and 0 <= r["clipfrac"] <= 1 and 0 <= r["ended"] <= 1
        assert min(r["time/generate"], r["time/score"], r["time/update"], r["rollout_tokens_per_s"]) > 0
    assert sorted(evals) == [0, EVERY, ITERS]
    first = evals[0]  # the policy is the SFT model: its completions are SFT's, so every comparison ties
    assert first["kl"] == 0.0 and first["win_rate"] == 0.5 and first["win_rate_se"] == 0.0
    assert 0 <= first["true_score"] <= 1 and set(first) >= {f"feat/{f}" for f in ("parses", "defined", "ends")}
    assert evals[ITERS]["kl"] != 0.0  # the policy moved
    assert summary == json.loads((a / "summary.json").read_text())
    assert summary["at_step_0"]["win_rate"] == 0.5 and [h["step"] for h in summary["history"]] == [0, EVERY, ITERS]
    assert summary["n_val_prompts"] >= 1 and summary["eval_samples"] == 2
    assert any("win rate vs SFT 0.500" in line and "at step 0" in line for line in runs["out_a"])


def test_the_final_policy_is_a_language_model_run(runs, chain):
    from gptjax.errors import CheckpointError
    from gptjax.eval.scoring import load_run
    from gptjax.train.lineage import open_parent

    a = runs["a"]
    run, sft_run = load_run(a / "policy"), load_run(chain["sft"])
    assert run.step == ITERS and run.cfg.model.resid_pdrop == 0.0 and run.cfg.model.block_size == BLOCK
    moved = [not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(run.params), jax.tree.leaves(sft_run.params))]
    assert len(moved) == len(jax.tree.leaves(sft_run.params)) and any(moved)
    assert open_parent(str(a / "policy"), log=_quiet).step == ITERS  # a later stage can start from it
    with pytest.raises(CheckpointError, match="policy"):  # the run directory itself is not a language model
        open_parent(str(a), log=_quiet)


def test_killed_ppo_run_resumes_to_exactly_the_uninterrupted_run(runs):
    from gptjax.eval.scoring import load_run

    a, b = runs["a"], runs["b"]
    assert any(f"resuming from checkpoint at step {EVERY}" in line for line in runs["out_b"])
    drop = ("time", "tokens_per_s", "mfu", "rollout_tokens_per_s", "time/generate", "time/score", "time/update")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in drop} for r in recs]  # noqa: E731
    by_step = lambda recs: {(r["step"], "loss" in r): r for r in strip(recs)}  # noqa: E731 (the last per step)
    assert by_step(_records(a)) == by_step(_records(b))
    pa, pb = load_run(a / "policy").params, load_run(b / "policy").params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sa, sb = runs["summary_a"], runs["summary_b"]
    assert {k: sa[k] for k in ("true_score", "rm_score", "kl", "win_rate")} == \
        {k: sb[k] for k in ("true_score", "rm_score", "kl", "win_rate")}


def test_resuming_with_another_identity_setting_is_refused(runs, chain):
    from gptjax.errors import CheckpointError
    from gptjax.rlhf.ppo_stage import train_ppo

    before = sorted(p.name for p in (runs["a"] / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="beta=0.02, not 0.1"):
        train_ppo(_cfg(chain, runs["a"], "beta=0.1"), devices=jax.devices()[:1], log=_quiet)
    assert sorted(p.name for p in (runs["a"] / "checkpoints").iterdir()) == before


def test_bad_settings_are_one_line(chain, tmp_path):
    proc = run_script("rlhf.py", "ppo", chain["sft"], "--reward", chain["sft"], "--run-dir", tmp_path / "r")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "is not a reward-model run" in line and "rlhf.py reward" in line
    assert not (tmp_path / "r" / "checkpoints").exists()
    proc = run_script("rlhf.py", "ppo", chain["sft"], "--reward", chain["reward"], "--run-dir", tmp_path / "r",
                      "betta=0.1")
    assert proc.returncode == 2 and "unknown key 'betta'; did you mean 'beta'" in proc.stderr
    proc = run_script("rlhf.py", "ppo", "--list-keys")
    assert proc.returncode == 0 and "ptx_coef = 0.0" in proc.stdout and "beta = 0.02" in proc.stdout


def test_a_reward_model_of_another_tokenizer_is_refused_before_anything_is_written(chain, prepared, tmp_path):
    from gptjax.errors import DataError
    from gptjax.rlhf.ppo_stage import train_ppo

    other = tmp_path / "sft-other-tokenizer"
    shutil.copytree(chain["sft"], other)
    theirs = Path(prepared) / "tokenizer.model"  # the small corpus's tokenizer at the default split: another one
    assert theirs.read_bytes() != (other / "tokenizer.model").read_bytes()
    shutil.copy(theirs, other / "tokenizer.model")
    with pytest.raises(DataError, match="reads another tokenizer than the policy"):
        train_ppo(dataclasses.replace(_cfg(chain, tmp_path / "r"), init_from=str(other)), devices=jax.devices()[:1],
                  log=_quiet)
    assert not (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_best_of_n_weights_equal_enumerating_every_subset():
    import itertools

    from gptjax.rlhf import bon

    rng = np.random.default_rng(0)
    proxy, true = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    proxy[0, 1] = proxy[0, 4]  # a tie in the proxy: the later sample counts as the larger (a stable sort)
    for n in range(1, 7):
        got_p, got_t = bon.best_of_n_scores(proxy, true, n)
        for p in range(3):
            best = [max(s, key=lambda i: (proxy[p, i], i)) for s in itertools.combinations(range(6), n)]
            assert got_p[p] == pytest.approx(np.mean(proxy[p, best]), abs=1e-12)
            assert got_t[p] == pytest.approx(np.mean(true[p, best]), abs=1e-12)
    assert bon.kl_bon(1) == 0.0 and bon.kl_bon(64) == pytest.approx(np.log(64) - 63 / 64)


@pytest.fixture(scope="module")
def bon_file(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bon") / "bon.json"
    proc = run_script("rlhf.py", "bon", chain["sft"], "--reward", chain["reward"], "--n", "4", "--prompts", "3",
                      "--max-new-tokens", "16", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_best_of_n_command_writes_the_curve(chain, bon_file, tmp_path):
    got = json.loads(bon_file.read_text())
    assert [c["n"] for c in got["curve"]] == [1, 2, 4] and got["n_prompts"] == 3
    rm = [c["rm_score"] for c in got["curve"]]
    assert rm[0] <= rm[1] + 1e-9 and rm[1] <= rm[2] + 1e-9  # the reward model's best of more samples scores higher
    assert got["curve"][0]["kl"] == 0.0 and all(0 <= c["true_score"] <= 1 for c in got["curve"])
    proc = run_script("rlhf.py", "bon", chain["sft"], "--reward", chain["reward"], "--n", "6", "--out",
                      tmp_path / "x.json")
    assert proc.returncode != 0 and "give a power of two" in proc.stderr and "Traceback" not in proc.stderr


def test_report_writes_the_tables_and_plots_from_the_runs(runs, chain, bon_file, tmp_path):
    from gptjax.rlhf import code_task
    from gptjax.rlhf.report import make_report

    rep = make_report(tmp_path / "rep", reward=chain["reward"], ppo=[f"PPO-ptx={runs['a']}"], bon=bon_file,
                      log=_quiet)
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "tables.md", "overoptimisation.png",
                                                               "ppo.png"}
    summary = json.loads((chain["reward"] / "summary.json").read_text())
    held = [lab.name for lab in code_task.HELDOUT_LABELERS]  # the chain's held-out rankings are theirs alone
    n = [summary[f"val_prompts/{x}"] for x in held]
    want = sum(summary[f"val_acc/{x}"] * k for x, k in zip(held, n) if k) / sum(n)
    assert rep["reward"]["heldout"]["acc"] == pytest.approx(want) and rep["reward"]["heldout"]["prompts"] == sum(n)
    assert rep["reward"]["train"]["prompts"] == 0 and rep["reward"]["train"]["acc"] is None
    md = (tmp_path / "rep" / "tables.md").read_text()
    last = runs["summary_a"]
    assert f"| PPO-ptx | {last['true_score']:.3f}" in md and "| SFT | " in md and "| 4 | " in md


def test_ppo_timing_benchmark_splits_an_iteration_into_its_parts(runs, tmp_path):
    out = tmp_path / "timing.json"
    proc = run_script("bench/ppo_iteration.py", "--from-run", runs["a"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    parts = [got[f"{k}_seconds"] for k in ("generate", "score", "update")]
    assert all(x > 0 for x in parts) and got["seconds_per_iteration"] == pytest.approx(sum(parts))
    assert sum(got[f"{k}_share"] for k in ("generate", "score", "update")) == pytest.approx(1.0)
    assert got["iterations_measured"] == ITERS - 1 and got["rollout_tokens_per_s"] > 0


# ----------------------------------------------------------------------------------------------
# DPO on the chain's rankings

DPO_STEPS, DPO_EVERY = 4, 2


def _dpo_cfg(chain, run_dir, *extra):
    from gptjax.rlhf.config import resolve_dpo

    return resolve_dpo([f"init_from={chain['sft']}", f"data={chain['rankings']}", f"val={chain['val_rankings']}",
                        f"run_dir={run_dir}", f"steps={DPO_STEPS}", "batch_size=2", "eval_batch_size=8",
                        f"eval_every={DPO_EVERY}", f"checkpoint.every={DPO_EVERY}", "checkpoint.keep=10",
                        "optim.lr=1e-3", *extra])


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, chain):
    """A DPO run evaluated against the chain's reward model, and a copy of it killed after step DPO_EVERY and
    resumed (its evaluations sample the held-out prompts again: exactness covers them too)."""
    from gptjax.rlhf.dpo import train_dpo

    root = tmp_path_factory.mktemp("dpo")
    one = jax.devices()[:1]
    extra = (f"reward={chain['reward']}", "max_new_tokens=16", "sample_batch=16")
    a = root / "rm"
    summary_a = train_dpo(_dpo_cfg(chain, a, *extra), devices=one, log=_quiet)
    b = _copy_as_killed(a, root / "b", DPO_EVERY)
    out_b: list[str] = []
    summary_b = train_dpo(_dpo_cfg(chain, b, *extra), devices=one, log=out_b.append)
    return {"rm": a, "a": a, "b": b, "summary_a": summary_a, "summary_b": summary_b, "out_b": out_b}


def test_dpo_starts_at_log_2_and_is_evaluated_on_ppos_axes(dpo_runs, chain):
    import math

    from gptjax.eval.scoring import load_run

    rm = dpo_runs["rm"]
    cfg = json.loads((rm / "config.json").read_text())
    assert cfg["stage"] == "dpo" and cfg["lineage"][0]["run_dir"] == str(chain["sft"].absolute())
    recs = _records(rm)
    train = {r["step"]: r for r in recs if "loss" in r}
    evals = {r["step"]: r for r in recs if "val_acc" in r and "loss" not in r}
    assert sorted(train) == list(range(1, DPO_STEPS + 1)) and sorted(evals) == [0, DPO_EVERY, DPO_STEPS]
    # the first update starts from the reference itself: every implicit reward is 0, the loss exactly log 2
    assert train[1]["loss"] == pytest.approx(math.log(2), rel=1e-5) and abs(train[1]["implicit_reward_mean"]) < 1e-4
    first = evals[0]
    assert first["val_loss"] == pytest.approx(math.log(2), rel=1e-5) and first["val_acc"] == 0.0
    assert first["kl"] == 0.0 and first["win_rate"] == 0.5 and 0 <= first["true_score"] <= 1
    last = evals[DPO_STEPS]
    assert last["kl"] != 0.0 and last["val_loss"] != first["val_loss"]  # the policy moved off the reference
    summary = json.loads((rm / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [0, DPO_EVERY, DPO_STEPS]
    assert all("sqrt_kl" in h and "true_score" in h for h in summary["history"])
    policy = load_run(rm / "policy")
    assert policy.step == DPO_STEPS and policy.cfg.model.resid_pdrop == 0.0
    from gptjax.train.lineage import open_parent

    assert open_parent(str(rm / "policy"), log=_quiet).step == DPO_STEPS  # a later stage can start from it


def test_a_dpo_run_goes_into_the_report_beside_ppo(dpo_runs, runs, tmp_path):
    from gptjax.rlhf.report import make_report

    make_report(tmp_path / "rep", ppo=[f"PPO={runs['a']}", f"DPO={dpo_runs['rm']}"], log=_quiet)
    md = (tmp_path / "rep" / "tables.md").read_text()
    last = json.loads((dpo_runs["rm"] / "summary.json").read_text())
    assert f"| DPO | {last['true_score']:.3f}" in md and (tmp_path / "rep" / "overoptimisation.png").exists()


def test_killed_dpo_run_resumes_to_exactly_the_uninterrupted_run(dpo_runs):
    from gptjax.eval.scoring import load_run

    a, b = dpo_runs["a"], dpo_runs["b"]
    assert any(f"resuming from checkpoint at step {DPO_EVERY}" in line for line in dpo_runs["out_b"])
    drop = ("time", "tokens_per_s", "mfu", "rollout_tokens_per_s")
    strip = lambda recs: {(r["step"], "loss" in r): {k: v for k, v in r.items() if k not in drop}  # noqa: E731
                          for r in recs}
    assert strip(_records(a)) == strip(_records(b))
    for x, y in zip(jax.tree.leaves(load_run(a / "policy").params), jax.tree.leaves(load_run(b / "policy").params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert dpo_runs["summary_a"]["val_loss"] == dpo_runs["summary_b"]["val_loss"]


def test_dpo_response_masks_cover_the_completion_and_its_end_only(chain):
    from gptjax.data import load_tokenizer
    from gptjax.rlhf import dpo, reward

    tok = load_tokenizer(chain["sft"])
    recs = reward.encode_rankings(tok, [reward._check_record(
        {"prompt": "def f(x):\n", "completions": ["    return x\n", "    pass\n"], "ended": [True, False],
         "ranks": [0, 1]}, "record 0")], 64, 64)
    (rec,) = recs
    n_prompt = len(tok.encode("def f(x):\n"))
    m = dpo.response_masks([rec, None], 3, 64)
    assert rec.n_prompt == n_prompt and m.shape == (2, 3, 64) and not m[1].any() and not m[0, 2].any()
    for k, comp in enumerate(["    return x\n", "    pass\n"]):
        n = len(tok.encode(comp)) + (1 if k == 0 else 0)  # the one that ended keeps its end-of-text token
        assert m[0, k].sum() == n and m[0, k, n_prompt:n_prompt + n].all() and not m[0, k, :n_prompt].any()


def test_dpo_bad_input_is_one_line(chain, tmp_path):
    from conftest import run_main

    from gptjax.cli.rlhf import main

    proc = run_main(main, "dpo", chain["sft"], "--data", chain["rankings"], "--run-dir", tmp_path / "d", "beta=0")
    assert proc.returncode == 2 and "beta must be positive" in proc.stderr and "Traceback" not in proc.stderr
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "def f():\n", "completions": ["    pass\n"], "ranks": [0]}) + "\n")
    proc = run_main(main, "dpo", chain["sft"], "--data", one, "--run-dir", tmp_path / "d")
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode != 0 and "ranks 1 completion(s); a ranking needs at least 2" in line
    assert not (tmp_path / "d" / "checkpoints").exists()
