"""Rankings from a policy's samples: completions are a pure function of the seed, K per prompt, cut exactly where they
end; a prompt too long for the context is skipped and counted; records rank by the round-robin labeler's own scores
(ties exactly at equal scores) and round-trip through JSONL in code_task's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptjax.errors import ConfigError, GenerationError
from gptjax.rlhf import code_task
from gptjax.rlhf import rank as rank_lib

BLOCK = 128  # the parent's context: about half of the small corpus's prompts fit with MAX_NEW tokens to spare
MAX_NEW, K, N = 24, 4, 6
BATCH = 8  # rows a sampler call: two prompts of K = 4


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_overrides, prepared) -> Path:
    from gptjax import config
    from gptjax.train.pretrain import pretrain

    run = tmp_path_factory.mktemp("rank-parent") / "run"
    pretrain(config.resolve("tiny", tiny_overrides + [f"model.block_size={BLOCK}", "steps=20", "optim.lr=3e-3",
                                                      "eval_batches=1", f"run_dir={run}"]), log=lambda *_: None)
    return run


@pytest.fixture(scope="module")
def run(parent):
    import dataclasses

    import jax

    from gptjax.eval.scoring import load_run

    r = load_run(parent)
    # one device: decoding a tiny model over 8 simulated CPU devices only adds collectives (5x slower)
    return dataclasses.replace(r, params=jax.device_put(r.params, jax.devices()[0]))


@pytest.fixture(scope="module")
def fitting(run) -> list[code_task.Example]:
    """N training prompts that fit the context with MAX_NEW tokens to spare."""
    tok = run.tokenizer
    ex = [e for e in code_task.prompts("train", data_cfg=run.cfg.data)
          if len(tok.encode(e.prompt)) + MAX_NEW <= BLOCK]
    assert len(ex) >= N, "the small corpus holds unexpectedly few short prompts"
    return ex[:N]


def _sample(run, examples, seed, k=K, **kw):
    return rank_lib.sample_completions(run, examples, k, max_new_tokens=MAX_NEW, seed=seed, batch_size=BATCH, **kw)


@pytest.fixture(scope="module")
def samples(run, fitting):
    return _sample(run, fitting, 0)


@pytest.fixture(scope="module")
def ranked(run):
    return rank_lib.make_rankings(run, "train", n_prompts=3 * N, k=K, labelers="train", seed=0,
                                  max_new_tokens=MAX_NEW, batch_size=BATCH, progress=False)


def test_completions_are_a_pure_function_of_the_seed_with_k_per_prompt(run, fitting, samples):
    assert [len(c) for c in samples] == [K] * N
    assert _sample(run, fitting, 0) == samples
    other = _sample(run, fitting, 1)
    assert [len(c) for c in other] == [K] * N and other != samples
    # the K completions of a prompt are K draws, not one draw K times
    assert any(len(set(c)) > 1 for c in samples)
    # a prompt's completions depend on its index, not on the prompts of other sampler calls: the first call
    # (prompts 0 and 1) alone gives what it gave among all N
    assert _sample(run, fitting[:2], 0) == samples[:2]
    # K may differ per prompt; every prompt keeps its place (slots of max K), so prompt 0 is unchanged by the rest
    ks = [4, 9, 5, 6, 7, 8]
    varied = rank_lib.sample_completions(run, fitting, ks, max_new_tokens=MAX_NEW, seed=0, batch_size=18, slots=9)
    assert [len(c) for c in varied] == ks
    again = rank_lib.sample_completions(run, fitting[:2], [4, 5], max_new_tokens=MAX_NEW, seed=0, batch_size=18,
                                        slots=9)
    assert again[0] == varied[0] and again[1] == varied[1][:5]


def test_ended_agrees_with_the_text(run, fitting, samples):
    # by hand: cut before the first line in column 0; end-of-text ends a completion that never closed
    assert rank_lib.cut_completion("    x = 1\n    return x\ndef g():\n", False) == ("    x = 1\n    return x\n", True)
    assert rank_lib.cut_completion("def g():\n", False) == ("", True)
    assert rank_lib.cut_completion("    x = 1\n    y", False) == ("    x = 1\n    y", False)
    assert rank_lib.cut_completion("    x = 1\n    y", True) == ("    x = 1\n    y", True)
    # on the model's samples: the same rows' raw tokens, cut the same way
    raw = rank_lib._sample_ids(run, fitting, K, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                               batch_size=BATCH)
    tok = run.tokenizer
    kinds = {"closed": 0, "eot": 0, "open": 0}
    for rows, comps in zip(raw, samples):
        for ids, (text, ended) in zip(rows, comps):
            assert len(ids) <= MAX_NEW and tok.eot_id not in ids
            full = tok.decode(ids)
            body, closed = code_task.function_part(full)
            # the text never holds a line in column 0, so the labelers' function part is all of it
            assert code_task.function_part(text) == (text, False)
            assert full.startswith(text)
            if closed:  # cut just before the closing line: no text after the function part
                assert ended and text == body and full[len(text)] not in " \t\n"
                kinds["closed"] += 1
            elif len(ids) < MAX_NEW:  # the sampler stopped early without a closing line: end-of-text
                assert ended and text == full
                kinds["eot"] += 1
            else:
                assert not ended and text == full
                kinds["open"] += 1
    assert kinds["closed"] > 0 and kinds["open"] > 0, kinds


def test_a_prompt_too_long_for_the_context_is_skipped_and_counted(run, fitting, samples, ranked):
    long = code_task.Example(fitting[2].prompt + "    x = 1\n" * 60, "    return x\n", (), "long", 0)
    assert len(run.tokenizer.encode(long.prompt)) + MAX_NEW > BLOCK
    got = _sample(run, [fitting[0], fitting[1], long, fitting[3]], 0)
    assert got[2] == [] and len(got[3]) == K
    assert got[:2] == samples[:2]  # the other calls do not move
    # make_rankings counts what its prompts skip: every prompt whose tokens leave less than MAX_NEW of the context
    _, report = ranked
    examples = code_task.prompts("train", data_cfg=run.cfg.data, limit=3 * N, seed=0)
    too_long = sum(len(run.tokenizer.encode(e.prompt)) + MAX_NEW > BLOCK for e in examples)
    assert report["prompts"] == len(examples) == 3 * N
    assert report["skipped"] == too_long > 0 and report["sampled"] == 3 * N - too_long
    with pytest.raises(GenerationError, match="max_new_tokens=128: give 1..127"):
        rank_lib.sample_completions(run, fitting, K, max_new_tokens=BLOCK, seed=0)


def _items(run, n=3 * N, seed=0):
    examples = code_task.prompts("train", data_cfg=run.cfg.data, limit=n, seed=seed)
    comps = _sample(run, examples, seed)
    return [(ex, c) for ex, c in zip(examples, comps) if c]


def test_records_rank_by_the_round_robin_labeler_ties_exactly_at_equal_scores(run, ranked):
    records, report = ranked
    items = _items(run)
    labs = code_task.TRAIN_LABELERS
    want = []
    for i, (ex, comps) in enumerate(items):
        lab = labs[i % len(labs)]
        scores = [lab.score(ex, c, e, item_key=i) for c, e in comps]
        ranks = [sum(t > s for t in scores) for s in scores]
        if len(set(ranks)) > 1:
            want.append((ex, comps, lab, scores))
        # ties exactly where the labeler's scores are equal
        for a in range(len(comps)):
            for b in range(len(comps)):
                assert (ranks[a] == ranks[b]) == (scores[a] == scores[b])
    assert len(records) == len(want) == report["records"] and report["dropped_ties"] == len(items) - len(want)
    assert len(records) >= 3
    for rec, (ex, comps, lab, scores) in zip(records, want):
        assert rec["prompt"] == ex.prompt and rec["labeler"] == lab.name
        assert rec["completions"] == [c for c, _ in comps] and rec["ended"] == [e for _, e in comps]
        ranks = rec["ranks"]
        assert len(ranks) == K and min(ranks) == 0 and all(0 <= r < K for r in ranks)
        assert ranks == [sum(t > s for t in scores) for s in scores]
    assert {r["labeler"] for r in records} <= {lab.name for lab in labs}


def test_report_is_the_calibration_check_on_these_samples(run, ranked):
    _, report = ranked
    items = _items(run)
    flat = [(ex, c, e) for ex, cs in items for c, e in cs]
    assert report["completions"] == len(flat) == K * report["sampled"] and report["k"] == K
    assert report["mean_true_score"] == pytest.approx(np.mean([code_task.true_score(*x) for x in flat]))
    assert report["demonstration_true_score"] > report["mean_true_score"]  # a 20-step model writes worse code
    assert report["ended"] == pytest.approx(np.mean([e for _, _, e in flat]))
    ag = report["agreement"]
    assert ag["labelers"] == pytest.approx(code_task.agreement(code_task.TRAIN_LABELERS, code_task.TRAIN_LABELERS,
                                                               items))
    assert ag["all"] == pytest.approx(code_task.agreement(code_task.LABELERS, code_task.LABELERS, items))
    assert ag["train_vs_heldout"] == pytest.approx(code_task.agreement(code_task.TRAIN_LABELERS,
                                                                       code_task.HELDOUT_LABELERS, items))
    assert report["pairs"] > 0 and all(0 <= v <= 1 for v in ag.values())
    json.dumps(report, allow_nan=False)  # plain JSON
    print(f"\ntiny model: mean true score {report['mean_true_score']:.3f} (demonstrations "
          f"{report['demonstration_true_score']:.3f}), ended {report['ended']:.2f}, agreement {ag}, "
          f"{report['pairs']} pairs, {report['records']} records")


def test_k0_draws_k_per_prompt_from_4_to_9():
    ks = rank_lib.prompt_ks(200, 0, seed=3)
    assert set(ks) == set(range(4, 10)) and ks == rank_lib.prompt_ks(200, 0, seed=3)
    assert ks != rank_lib.prompt_ks(200, 0, seed=4)
    assert rank_lib.prompt_ks(200, 0, seed=3)[:50] == rank_lib.prompt_ks(50, 0, seed=3)  # by prompt index
    assert rank_lib.prompt_ks(5, 7, seed=3) == [7] * 5


def test_jsonl_round_trips_in_code_task_format(ranked, tmp_path):
    records, _ = ranked
    path = rank_lib.write_jsonl(records, tmp_path / "sub" / "rankings.jsonl")
    assert sorted(p.name for p in path.parent.iterdir()) == ["rankings.jsonl"]  # no temporary file left
    lines = path.read_text().splitlines()
    assert len(lines) == len(records)
    back = [json.loads(x) for x in lines]
    assert back == records == rank_lib.read_jsonl(path)
    for r in back:
        assert list(r) == ["prompt", "completions", "ended", "ranks", "labeler"]
        assert isinstance(r["prompt"], str) and all(isinstance(c, str) for c in r["completions"])
        assert all(isinstance(e, bool) for e in r["ended"]) and all(isinstance(x, int) for x in r["ranks"])
        assert len(r["completions"]) == len(r["ended"]) == len(r["ranks"]) and 4 <= len(r["ranks"]) <= 9


def test_rank_command_writes_the_rankings_and_prints_one_line(parent, run, tmp_path):
    assert rank_lib._load(f"{parent}@20").step == 20  # RUN_DIR@STEP, as init_from spells it
    lines = []
    out = tmp_path / "rankings.jsonl"
    # (the restored one-device run stands in for the directory: the same run, decoded 5x faster)
    report = rank_lib.rank_command(run, out, "train", N, 0, "all", 0, MAX_NEW, 1.0, batch_size=18, log=lines.append)
    (line,) = lines
    assert f"wrote {report['records']} rankings of K=4..9 to {out}" in line and "agreement" in line
    recs = rank_lib.read_jsonl(out)
    assert len(recs) == report["records"] > 0 and report["out"] == str(out)
    assert all(4 <= len(r["ranks"]) <= 9 for r in recs)
    assert {r["labeler"] for r in recs} <= {lab.name for lab in code_task.LABELERS}


@pytest.mark.parametrize("kw, fragment", [
    ({"k": 3}, "k=3: rank K = 4..9"),
    ({"k": 10}, "k=10: rank K = 4..9"),
    ({"labelers": "trian"}, "unknown labelers 'trian'; did you mean 'train'"),
    ({"labelers": "syntax,semantix"}, "unknown labelers 'semantix'; did you mean 'semantics'"),
    ({"temperature": 0.0}, "temperature=0 samples K identical completions"),
    ({"split": "test"}, "split must be 'train' or 'val'"),
])
def test_bad_settings_are_one_clear_error_before_the_run_loads(kw, fragment, tmp_path):
    args = {"n_prompts": N, "k": K, "labelers": "train", "seed": 0} | kw
    split = args.pop("split", "train")
    with pytest.raises(ConfigError, match=fragment):
        rank_lib.make_rankings(tmp_path / "no-such-run", split, **args)


def test_labeler_sets():
    assert rank_lib.labeler_set("train") == code_task.TRAIN_LABELERS
    assert rank_lib.labeler_set("heldout") == code_task.HELDOUT_LABELERS
    assert rank_lib.labeler_set("all") == code_task.LABELERS
    assert [lab.name for lab in rank_lib.labeler_set("style, syntax,style")] == ["style", "syntax"]
