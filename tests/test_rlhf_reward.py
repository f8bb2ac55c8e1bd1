"""InstructGPT reward model: the stage's loss is the ranking loss of rewards each completion gets from one pass of
the model, it does not depend on the order of a prompt's completions, a run from a tiny SFT parent records its
lineage, the held-out pairwise accuracy at step 0 and at the end and a bias that makes the demonstrations average
0, load_reward_model scores as the stage does, a killed run resumes exactly, and bad rankings are one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import finished_steps, read_losses

from gptjax.rlhf import reward as rm
from gptjax.rlhf.config import resolve_reward

BLOCK = 160  # the parent's context: a short function's prompt and a completion or two of it
STEPS, EVERY = 8, 3


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_overrides, prepared) -> Path:
    from gptjax import config
    from gptjax.train.pretrain import pretrain

    run = tmp_path_factory.mktemp("rm-pretrain") / "run"
    pretrain(config.resolve("tiny", tiny_overrides + [f"model.block_size={BLOCK}", "steps=4", f"run_dir={run}"]),
             log=_quiet)
    return run


@pytest.fixture(scope="module")
def items(pretrained):
    """code_task's synthetic completions (the real body, and mutations of it) of the corpus's short functions, K
    between 4 and 9."""
    from gptjax import config
    from gptjax.data import load_tokenizer
    from gptjax.rlhf import code_task

    tok = load_tokenizer(pretrained)
    data_cfg = config.load_json(pretrained / "config.json").data
    short = [e for e in code_task.prompts("train", data_cfg=data_cfg, body_lines=(1, 12))
             if len(tok.encode(e.prompt)) <= 100 and len(tok.encode(e.prompt + e.response)) <= 150]
    out = []
    for i, e in enumerate(short):
        for k in range(4 + i % 6, 3, -1):  # as many completions as the mutations give, up to 4 + i % 6
            got = code_task.synthetic_items([e], k=k)
            if got:
                out += got
                break
    assert len(out) >= 10, "the corpus fixture holds unexpectedly few short functions"
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, items) -> dict:
    from gptjax.rlhf import code_task

    d = tmp_path_factory.mktemp("rm-data")
    train, val = items[:8], items[8:12]
    held = [it for it in val for _ in range(2)]  # every held-out prompt ranked by both held-out labelers
    return {"train": _write(d / "rankings.jsonl", code_task.ranking_records(train)),
            "val": _write(d / "val.jsonl", code_task.ranking_records(held, code_task.HELDOUT_LABELERS)),
            "demos": _write(d / "demos.jsonl", [{"prompt": e.prompt, "response": e.response} for e, _ in items])}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, pretrained, files) -> Path:
    """A one-step SFT run on the functions' real bodies: its demonstrations set the reward model's bias."""
    from gptjax.rlhf.config import resolve_sft
    from gptjax.rlhf.sft import sft

    run = tmp_path_factory.mktemp("rm-sft") / "run"
    sft(resolve_sft([f"init_from={pretrained}", f"data={files['demos']}", f"run_dir={run}", "steps=1",
                     "batch_size=2", "eval_batch_size=2", "optim.lr=1e-3"]), devices=jax.devices()[:1], log=_quiet)
    return run


# ----------------------------------------------------------------------------------------------
# (1), (2) the loss


def _encoded(tok, records):
    return rm.encode_rankings(tok, [rm._check_record(r, f"record {i}") for i, r in enumerate(records)], BLOCK, BLOCK)


def _hand_loss(r_PK, ranks_PK, valid_PK) -> float:
    per_prompt = []
    for r, rk, v in zip(r_PK, ranks_PK, valid_PK):
        k = int(v.sum())
        terms = [np.logaddexp(0.0, -(r[i] - r[j])) for i in range(k) for j in range(k) if rk[i] < rk[j]]
        if terms:
            per_prompt.append(np.mean(terms))
    return float(np.mean(per_prompt))


@pytest.fixture(scope="module")
def model(pretrained):
    from gptjax import config
    from gptjax.data import load_tokenizer
    from gptjax.model import init_params

    mcfg = config.load_json(pretrained / "config.json").model
    params = {**init_params(mcfg, jax.random.key(3)), "head": rm.init_head(mcfg, jax.random.key(4))}
    params["head"]["w"] = params["head"]["w"] * 50  # rewards of order 1: the pairs' losses differ visibly
    return mcfg, params, load_tokenizer(pretrained)


RECORDS = [  # K = 2, 3 (one tie), 4 (a completion that did not end); padded to K = 4
    {"prompt": "def add(a, b):\n", "completions": ["    return a + b\n", "    return a - b\n"], "ranks": [0, 1],
     "ended": [True, True]},
    {"prompt": "def neg(x):\n", "completions": ["    return -x\n", "    return x\n", "    pass\n"], "ranks": [0, 1, 1],
     "ended": [True, True, True]},
    {"prompt": "class Point:\n", "completions": ["    x = 0\n    y = 0\n", "    x = 0\n", "    pass\n", "    zork"],
     "ranks": [0, 1, 2, 3], "ended": [True, True, True, False]},
]


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, custom_vjp, ...) included; not inside a scan."""
    for e in jaxpr.eqns:
        yield e
        if e.primitive.name != "scan":
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from _eqns(inner)


def test_the_loss_is_the_ranking_loss_of_one_reward_per_completion_read_at_its_end(model):
    mcfg, params, tok = model
    enc = _encoded(tok, RECORDS)
    tokens, read, ranks, valid = rm.fill(enc, 4, BLOCK, pad_id=0)
    assert tokens.shape == (3, 4, BLOCK) and valid.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # read at the EOT of a completion that ended, at its last token otherwise
    for p, rec in enumerate(RECORDS):
        for k, (c, ended) in enumerate(zip(rec["completions"], rec["ended"])):
            want = tok.encode(rec["prompt"]) + tok.encode(c) + ([tok.eot_id] if ended else [])
            assert read[p, k] == len(want) - 1 and tokens[p, k, :len(want)].tolist() == want
    assert tokens[2, 3, read[2, 3]] != tok.eot_id and tokens[2, 2, read[2, 2]] == tok.eot_id
    loss, r_PK = jax.jit(lambda prm, *b: rm.reward_loss(mcfg, prm, *b))(params, *map(jnp.asarray, (tokens, read,
                                                                                                   ranks, valid)))
    r_PK = np.asarray(r_PK)
    # each completion on its own: the same reward (the batch ran every completion through the model once)
    one = jax.jit(lambda prm, t, i: rm.rewards(mcfg, prm, t, i))
    for p, rec in enumerate(enc):
        for k, s in enumerate(rec.seqs):
            t, i = rm.fill_rows([s], 1, BLOCK, pad_id=7)  # other padding after it: causal attention never sees it
            assert r_PK[p, k] == pytest.approx(float(one(params, jnp.asarray(t), jnp.asarray(i))[0]), abs=1e-5)
    assert np.ptp(r_PK[valid > 0]) > 0.1
    assert float(loss) == pytest.approx(_hand_loss(r_PK, ranks, valid), rel=1e-5)
    # the one forward pass is of the P*K sequences together: the scan over layers runs once, on [12, T, D]
    scanned = dataclasses.replace(mcfg, scan_layers=True)
    jaxpr = jax.make_jaxpr(lambda prm: rm.reward_loss(scanned, prm, *map(jnp.asarray, (tokens, read, ranks,
                                                                                       valid))))(params)
    scans = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "scan"]
    assert len(scans) == 1 and any(v.aval.shape[:2] == (12, BLOCK) for v in scans[0].invars)


def test_permuting_a_prompts_completions_with_their_ranks_leaves_the_loss_unchanged(model):
    mcfg, params, tok = model
    batch = rm.fill(_encoded(tok, RECORDS), 4, BLOCK, pad_id=0)
    f = jax.jit(lambda prm, *b: rm.reward_loss(mcfg, prm, *b))
    loss, r_PK = f(params, *map(jnp.asarray, batch))
    rng = np.random.default_rng(0)
    for _ in range(2):
        perm = np.stack([rng.permutation(4) for _ in range(3)])  # padding slots move too
        shuffled = [np.take_along_axis(a, perm[:, :, None] if a.ndim == 3 else perm, axis=1) for a in batch]
        loss2, r2 = f(params, *map(jnp.asarray, shuffled))
        assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
        np.testing.assert_allclose(np.asarray(r2), np.take_along_axis(np.asarray(r_PK), perm, 1), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (3), (4), (5), (7) a run end to end, its bias, its loading and its exact resume


def _cfg(parent, files, run_dir, *extra):
    return resolve_reward([f"init_from={parent}", f"data={files['train']}", f"val={files['val']}",
                           f"run_dir={run_dir}", f"steps={STEPS}", "batch_size=8", "eval_batch_size=16",
                           "eval_every=4", f"checkpoint.every={EVERY}", "checkpoint.keep=10", "optim.lr=1e-3",
                           "log_every=1", *extra])


def _copy_as_killed(src: Path, dst: Path, step: int) -> Path:
    """`src` as a SIGKILL just after step `step + 1` leaves it: checkpoints through `step`, metrics through
    `step + 1`, no final parameters, no summary."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step + 1))
    shutil.rmtree(dst / "final")
    (dst / "summary.json").unlink()
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, parent, files):
    root = tmp_path_factory.mktemp("rm-runs")
    a = root / "a"
    out_a: list[str] = []
    summary_a = rm.train_reward(_cfg(parent, files, a), devices=jax.devices()[:1], log=out_a.append)
    b = _copy_as_killed(a, root / "b", EVERY)
    assert finished_steps(b) == [EVERY]
    out_b: list[str] = []
    summary_b = rm.train_reward(_cfg(parent, files, b), devices=jax.devices()[:1], log=out_b.append)
    return {"a": a, "b": b, "out_a": out_a, "out_b": out_b, "summary_a": summary_a, "summary_b": summary_b}


def test_reward_run_records_its_parent_held_out_accuracy_and_its_bias(runs, parent, files):
    from gptjax.data import fingerprint, load_tokenizer

    a, summary = runs["a"], runs["summary_a"]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["stage"] == "reward" and cfg["init_from"] == str(parent)
    first, grand = cfg["lineage"][:2]  # reward <- sft <- pretrain
    assert first["run_dir"] == str(parent.absolute()) and first["step"] == 1 and first["params_fingerprint"]
    assert grand["step"] == 4
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in recs if "val_acc" in r}
    assert sorted(evals) == [0, 4, STEPS]  # the parent and a fresh head, every eval_every, the end
    for ev in evals.values():
        assert 0 <= ev["val_acc"] <= 1 and ev["val_acc_se"] > 0 and np.isfinite(ev["val_loss"])
        assert ev["val_prompts"] == 8 and {"val_acc/balanced", "val_acc/reviewer"} <= set(ev)
    assert summary == json.loads((a / "summary.json").read_text())
    assert summary["val_acc_at_step_0"] == evals[0]["val_acc"] and summary["val_acc"] == evals[STEPS]["val_acc"]
    # every step's batch is the whole training set (8 prompts): its loss went down at this learning rate
    losses = read_losses(a)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(v) for v in losses.values())
    assert np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)]) < 0.7 * losses[1]
    train_recs = {r["step"]: r for r in recs if "acc" in r}
    assert train_recs[STEPS]["acc"] > train_recs[1]["acc"]
    info = json.loads((a / "reward.json").read_text())
    tok = load_tokenizer(a)
    assert info["tokenizer"] == fingerprint(load_tokenizer(parent).files) == fingerprint(tok.files)
    ks = [len(json.loads(x)["completions"]) for x in files["train"].read_text().splitlines()]
    assert info["k_distribution"]["train"] == {str(k): ks.count(k) for k in sorted(set(ks))}
    assert info["K"] == max(ks + [len(json.loads(x)["completions"]) for x in files["val"].read_text().splitlines()])
    bias = info["bias"]
    assert bias == summary["bias"] and bias["shift"] == pytest.approx(-bias["demos_mean_before"])
    assert bias["demos"]["data"] == str(files["demos"]) and bias["n_demos"] >= 10  # the parent SFT run's own
    assert any("pairwise accuracy" in line and "at step 0" in line for line in runs["out_a"])
    assert any(line.startswith("bias: ") for line in runs["out_a"])


def test_the_bias_makes_the_demonstrations_average_zero(runs, files):
    _, params, _, score = rm.load_reward_model(runs["a"], devices=jax.devices()[:1], log=_quiet)
    demos = [json.loads(x) for x in files["demos"].read_text().splitlines()]
    r = score([d["prompt"] for d in demos], [d["response"] for d in demos], [True] * len(demos))
    assert r.shape == (len(demos),) and np.std(r) > 1e-3
    assert abs(float(np.mean(r, dtype=np.float64))) < 1e-5
    assert float(params["head"]["b"]) == pytest.approx(score.bias["b"], abs=1e-7)  # the bias saved is the one recorded


def test_load_reward_model_scores_as_the_stage_does(runs, files):
    from gptjax.data import fingerprint

    cfg, params, tok, score = rm.load_reward_model(runs["a"], devices=jax.devices()[:1], log=_quiet)
    assert score.tokenizer_fingerprint == fingerprint(tok.files) == runs["summary_a"]["tokenizer"]
    assert set(params) >= {"wte", "h", "head"} and cfg.model.block_size == BLOCK
    val = rm.read_rankings(files["val"])
    flat = [(r.prompt, c, e) for r in val for c, e in zip(r.completions, r.ended)]
    got = score(*map(list, zip(*flat)))
    # the training loss's rewards of the same completions, with the loaded parameters
    enc = rm.encode_rankings(tok, val, BLOCK, BLOCK)
    K = max(e.k for e in enc)
    batch = rm.fill(enc, K, BLOCK, score.pad_id)
    _, r_PK = jax.jit(lambda prm, *b: rm.reward_loss(cfg.model, prm, *b))(params, *map(jnp.asarray, batch))
    want = np.asarray(r_PK)[batch[3] > 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the held-out accuracy the stage reported at the end (the bias shifts every reward alike: the same accuracy)
    bounds = np.cumsum([0] + [e.k for e in enc])
    m = rm.ranking_metrics([got[i:j] for i, j in zip(bounds, bounds[1:])], enc, ("balanced", "reviewer"))
    assert m["val_acc"] == pytest.approx(runs["summary_a"]["val_acc"])
    assert m["val_loss"] == pytest.approx(runs["summary_a"]["val_loss"], rel=1e-5)
    # on 8 devices (the head's w split over fsdp like the model's embed axis): the same rewards
    from gptjax.config import MeshConfig

    _, params8, _, score8 = rm.load_reward_model(runs["a"], devices=jax.devices()[:8], mesh_cfg=MeshConfig(fsdp=-1),
                                                 batch_size=16, log=_quiet)
    assert len(params8["head"]["w"].sharding.device_set) == 8
    np.testing.assert_allclose(score8(*map(list, zip(*flat))), got, atol=1e-5)


def test_killed_reward_run_resumes_to_exactly_the_uninterrupted_run(runs):
    a, b = runs["a"], runs["b"]
    assert any(f"resuming from checkpoint at step {EVERY}" in line for line in runs["out_b"])
    assert read_losses(a) == read_losses(b)
    for key in ("val_acc", "val_loss", "val_acc_at_step_0", "bias"):
        assert runs["summary_a"][key] == runs["summary_b"][key], key
    assert finished_steps(a) == finished_steps(b)
    pa = rm.load_reward_model(a, devices=jax.devices()[:1], log=_quiet)[1]
    pb = rm.load_reward_model(b, devices=jax.devices()[:1], log=_quiet)[1]
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resuming_with_another_identity_setting_is_refused(runs, parent, files):
    from gptjax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="with seed=0, not 1"):
        rm.train_reward(_cfg(parent, files, runs["a"], "seed=1"), devices=jax.devices()[:1], log=_quiet)


# ----------------------------------------------------------------------------------------------
# (6) bad input: one line each


GOOD = {"prompt": "def f():\n", "completions": ["    return 1\n", "    pass\n"], "ranks": [0, 1], "ended": [True, True]}


@pytest.mark.parametrize("bad, fragment", [
    ({**GOOD, "completions": ["    return 1\n"], "ranks": [0], "ended": [True]},
     "line 2: the record ranks 1 completion(s); a ranking needs at least 2"),
    ({**GOOD, "ranks": [1, 1]}, "line 2: all 2 completions have rank 1: every pair is a tie"),
    ({**GOOD, "prompt": "x = 1\n" * 200}, "line 2: the prompt is"),
    ({k: v for k, v in GOOD.items() if k != "ranks"},
     'line 2: the record needs "ranks", a list of integers >= 0 (0 the best) (missing'),
    ({**GOOD, "ended": [True]}, "line 2: 2 completions but 2 ranks and 1 ended flags"),
])
def test_bad_rankings_are_one_line(parent, tmp_path, capsys, bad, fragment):
    from gptjax.cli.rlhf import main

    data = _write(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    rc = main(["reward", str(parent), "--data", str(data), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert fragment in line and str(data) in line, line
    if "prompt is" in line:
        assert f"max_len={BLOCK}" in line and "shorten the prompt" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_pretrained_parent_needs_demonstrations_for_the_bias(pretrained, files, tmp_path, capsys):
    from gptjax.cli.rlhf import main

    rc = main(["reward", str(pretrained), "--data", str(files["train"]), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and "is a pretrain run, with no demonstrations" in line and "--demos FILE" in line


def test_reward_list_keys_prints_the_defaults(capsys):
    from gptjax.cli.rlhf import main

    assert main(["reward", "--list-keys"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "epochs = 1.0" in out and "batch_size = 64" in out and "optim.lr = 5e-05" in out
