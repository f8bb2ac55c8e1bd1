"""lm-evaluation-harness driving a trained tiny checkpoint, offline, on task files written here.

Every number the adapter returns is checked against the model computed by hand: a direct forward pass
and log-softmax on the host for log-likelihoods, a recompute-everything greedy loop for generation.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_script
from lm_eval.api.instance import Instance

from gptjax.eval import harness
from gptjax.model import forward, vocab_mask

CONTEXTS = [
    ("import os\n\ndef main(", "):\n    pass"),
    ("for i in range(", "10):"),
    ("x = ", "1"),                              # trailing space: moves to the continuation
    ("class Foo:\n    ", "def __init__(self):"),  # trailing newline and indentation
    ("", "import sys"),                          # empty context: end-of-text
    ("def f(x):\n    return x" * 6, " + 1"),     # longer than the 32-token context: truncated on the left
    ("if x", ""),                                # empty continuation
]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """conftest sets HF_*_OFFLINE, which `datasets` reads when first imported; make sure it took."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_overrides, prepared):
    """A tiny model trained for 4 steps (in this process, on the 8 simulated devices)."""
    from gptjax import config
    from gptjax.train.pretrain import pretrain

    d = tmp_path_factory.mktemp("harness") / "run"
    cfg = config.resolve("tiny", tiny_overrides + [f"run_dir={d}", "steps=4", "checkpoint.every=4",
                                                   "eval_batches=1"])
    pretrain(cfg, log=lambda *_, **__: None)
    return d


@pytest.fixture(scope="module")
def lm(run_dir):
    return harness.GptjaxLM(run_dir=str(run_dir), batch_size=4, max_gen_toks=8, progress=False)


class Reference:
    """The model by hand: host copies of the parameters, one jitted [1, T] forward, log-softmax."""

    def __init__(self, lm):
        self.cfg = lm.run.cfg.model
        self.T = self.cfg.block_size
        self.eot = lm.eot_token_id
        self.encode = lm.run.tokenizer.encode
        self.decode = lm.run.tokenizer.decode
        params = jax.device_get(lm.run.params)
        self._logp = jax.jit(lambda t: jax.nn.log_softmax(
            forward(self.cfg, params, t)[0] + vocab_mask(self.cfg), axis=-1))

    def logp(self, inputs: list[int]) -> np.ndarray:
        """[len(inputs), V] log-probabilities of the token after each input position."""
        assert 0 < len(inputs) <= self.T
        buf = np.zeros((1, self.T), np.int32)
        buf[0, :len(inputs)] = inputs
        return np.asarray(self._logp(jnp.asarray(buf)))[:len(inputs)]

    def loglikelihood(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        if not cont:
            return 0.0, True
        ids = (ctx + cont)[-(self.T + 1):]
        lp = self.logp(ids[:-1])[-len(cont):]
        return float(sum(lp[i, t] for i, t in enumerate(cont))), all(lp[i].argmax() == t for i, t in enumerate(cont))

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention, written out: see test_encode_pair_is_lm_evals for the check against lm-eval."""
        if not context:
            return [self.eot], self.encode(continuation)
        stripped = context.rstrip()
        ctx = self.encode(stripped)
        return ctx, self.encode(stripped + context[len(stripped):] + continuation)[len(ctx):]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        ids, new = list(prompt), []
        for _ in range(n):
            t = int(self.logp(ids[-self.T:])[-1].argmax())
            if t == self.eot:
                break
            ids.append(t)
            new.append(t)
        return new

    def generate_until(self, context: str, until: list[str], n: int) -> str:
        prompt = (self.encode(context) or [self.eot])[-max(self.T - n, self.T // 2):]
        text = self.decode(self.greedy(prompt, n))
        for s in until:
            text = text.split(s)[0]
        return text


@pytest.fixture(scope="module")
def ref(lm):
    return Reference(lm)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_encode_pair_is_lm_evals(lm):
    """The context/continuation split equals lm-eval's own (TemplateLM, which its HF model uses)."""
    from lm_eval.api.model import TemplateLM

    class Template(TemplateLM):
        eot_token_id = lm.eot_token_id
        tok_encode = staticmethod(lambda s, **_: lm.tok_encode(s))
        _loglikelihood_tokens = staticmethod(lambda reqs, **_: [(ctx, cont) for _, ctx, cont in reqs])
        loglikelihood_rolling = generate_until = None

    pairs = [p for p in CONTEXTS if p[1]]
    assert [lm.encode_pair(*p) for p in pairs] == Template().loglikelihood(requests("loglikelihood", pairs),
                                                                           disable_tqdm=True)


def test_loglikelihood_matches_forward(lm, ref):
    truncated = lm.scorer.truncated
    got = lm.loglikelihood(requests("loglikelihood", CONTEXTS))
    want = [ref.loglikelihood(*ref.split(c, x)) for c, x in CONTEXTS]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(isinstance(ll, float) and isinstance(g, bool) for ll, g in got)
    assert got[-1] == (0.0, True) and all(ll < 0 for ll, _ in got[:-1])
    # the long context lost its oldest tokens to fit the 32-token window
    assert len(sum(ref.split(*CONTEXTS[5]), [])) > ref.T + 1 and lm.scorer.truncated == truncated + 1

    # a continuation that is the model's own greedy choice is reported greedy
    ctx = ref.encode("import os\n")
    greedy = ref.greedy(ctx, 3)
    assert len(greedy) == 3
    assert lm._score([(ctx, greedy)], "greedy")[0][1] is True
    assert lm._score([(ctx, greedy[:-1] + [greedy[-1] ^ 1])], "not greedy")[0][1] is False


def test_loglikelihood_rolling_is_the_sum_over_tokens(lm, ref):
    short = "import os\n"
    long = "def add(a, b):\n    return a + b\n\n" * 8 + "print(add(1, 2))\n"  # several 32-token windows
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,), ("",)]))
    # short: one window, every token predicted from end-of-text and its prefix
    ids = ref.encode(short)
    lp = ref.logp([ref.eot] + ids[:-1])
    np.testing.assert_allclose(got[0], sum(lp[i, t] for i, t in enumerate(ids)), rtol=1e-5)
    # long: each token predicted once, from as much context as fits in the window (up to 31 tokens)
    ids = ref.encode(long)
    assert len(ids) > 3 * ref.T and len(ids) % ref.T  # the last window is partial: it gets a full context
    np.testing.assert_allclose(got[1], _rolling_by_hand(ref, ids), rtol=1e-5)
    assert got[2] == 0.0


def _rolling_by_hand(ref, ids: list[int]) -> float:
    """lm-eval's disjoint windows, written out: the first window predicts ids[:T] from [eot] + ids[:T-1];
    each later one predicts the next up-to-T tokens, fed the T tokens before each prediction's end."""
    T, total = ref.T, 0.0
    lp = ref.logp([ref.eot] + ids[:T - 1])
    total += sum(lp[i, t] for i, t in enumerate(ids[:T]))
    done = T
    while done < len(ids):
        end = min(done + T, len(ids))
        inputs = ids[end - T - 1:end - 1]
        lp = ref.logp(inputs)[-(end - done):]
        total += sum(lp[i, t] for i, t in enumerate(ids[done:end]))
        done = end
    return total


def test_generate_until_is_greedy_cut_at_the_stop_string(lm, ref):
    args = [("def main(", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
            ("import ", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
            ("", {"until": [")", "\n"], "max_gen_toks": 8}),
            ("x = 1\n" * 20, {"until": "\n\n", "max_new_tokens": 6}),  # a long prompt, left-truncated
            ("class ", {"until": [], "temperature": 0.0})]                # the adapter's max_gen_toks (8)
    got = lm.generate_until(requests("generate_until", args))
    want = [ref.generate_until(ctx, [kw["until"]] if isinstance(kw["until"], str) else kw["until"],
                               kw.get("max_gen_toks", kw.get("max_new_tokens", 8))) for ctx, kw in args]
    assert got == want
    assert got[-1] and all("\n" not in g for g in got[:2])

    # sampling is seeded: the same request in two calls gives the same text
    sample = requests("generate_until", [("def ", {"do_sample": True, "temperature": 1.0, "top_k": 20,
                                                   "max_gen_toks": 8})])
    assert lm.generate_until(sample) == lm.generate_until(sample)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, ref):
    d = tmp_path_factory.mktemp("tasks")
    cache = d / "hf_cache"

    def write(name: str, rows: list[dict], yaml: str, splits=("test",)):
        for split in splits:
            (d / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files = "".join(f"      {s}: {d / f'{name}_{s}.jsonl'}\n" for s in splits)
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n{files}"
            f"test_split: test\n" + yaml)

    mc = [{"question": "import os\nimport", "choices": [" sys", " 12345", " ((((", " os"], "label": 0},
          {"question": "def main():\n   ", "choices": [" return 0", " ]]]", " )", " pass"], "label": 3},
          {"question": "for i in range(10):\n   ", "choices": [" print(i)", " }}", " 0 0 0", "!"], "label": 0},
          {"question": "x = [1, 2,", "choices": [" 3]", " def", " import", " class"], "label": 0},
          {"question": "class A:\n    def __init__(self", "choices": ["):", " 1 1", " for", " ]"], "label": 0}]
    write("gptjax_mc", mc, "fewshot_split: train\nnum_fewshot: 1\noutput_type: multiple_choice\n"
          "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
          "target_delimiter: \"\"\n"
          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", splits=("test", "train"))

    ppl = [{"text": "import os\nimport sys\n"}, {"text": "def add(a, b):\n    return a + b\n\n" * 6 + "add(1, 2)\n"},
           {"text": "x = 1"}]
    write("gptjax_ppl", ppl, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
          "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
          "  - metric: bits_per_byte\n")

    # the first answer is the model's own greedy completion, the second is not: exact_match is 1/2
    prompts = ["def main(", "import "]
    answers = [ref.generate_until(prompts[0], ["\n"], 6), "no such answer"]
    # a task whose data lives on the Hub: offline, it must fail with one line naming the fix
    (d / "gptjax_hub.yaml").write_text("task: gptjax_hub\ndataset_path: gptjax-tests/no-such-dataset\n"
                                       "test_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{a}}\"\n"
                                       "doc_to_target: \"{{b}}\"\n")
    write("gptjax_gen", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)],
          "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
          "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return d


def _args(sample: dict) -> list[tuple]:
    """A logged sample's request arguments, in either of lm-eval's layouts."""
    a = sample["arguments"]
    if isinstance(a, dict):  # {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}
        return [tuple(v[f"arg_{j}"] for j in range(len(v))) for v in a.values()]
    return [tuple(x) for x in a]


def test_simple_evaluate_on_local_tasks(lm, ref, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["gptjax_mc", "gptjax_ppl", "gptjax_gen"], task_manager=tm,
                                  log_samples=True, bootstrap_iters=0)
    res, samples = out["results"], out["samples"]

    # multiple choice: accuracy by hand from the very requests lm-eval made (with its one-shot prompts)
    hits, hits_norm = [], []
    for s in samples["gptjax_mc"]:
        args = _args(s)
        assert len(args) == 4 and args[0][0].count("\n") > s["doc"]["question"].count("\n")  # one shot
        lls = [ref.loglikelihood(*ref.split(*a))[0] for a in args]
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], lls, rtol=1e-5)
        lens = [len(c) for c in s["doc"]["choices"]]
        hits.append(int(np.argmax(lls)) == s["doc"]["label"])
        hits_norm.append(int(np.argmax(np.array(lls) / lens)) == s["doc"]["label"])
    assert len(hits) == 5
    assert 0 <= res["gptjax_mc"]["acc,none"] <= 1
    assert res["gptjax_mc"]["acc,none"] == pytest.approx(np.mean(hits))
    assert res["gptjax_mc"]["acc_norm,none"] == pytest.approx(np.mean(hits_norm))

    # rolling: bits per byte over all documents from the per-document sums by hand
    texts = [s["doc"]["text"] for s in samples["gptjax_ppl"]]
    lls = [_rolling_by_hand(ref, ref.encode(t)) for t in texts]
    n_bytes = sum(len(t.encode()) for t in texts)
    assert res["gptjax_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-5)
    assert res["gptjax_ppl"]["byte_perplexity,none"] == pytest.approx(2 ** (-sum(lls) / n_bytes / math.log(2)),
                                                                      rel=1e-5)

    # generation: greedy, stopped at the newline; one of the two answers matches
    for s in samples["gptjax_gen"]:
        assert s["filtered_resps"][0] == ref.generate_until(s["doc"]["prompt"], ["\n"], 6)
    assert res["gptjax_gen"]["exact_match,none"] == 0.5


def test_create_from_arg_string(run_dir):
    from lm_eval.api.registry import get_model

    cls = get_model("gptjax")
    assert cls is harness.GptjaxLM
    lm = cls.create_from_arg_string(f"run_dir={run_dir},step=4,max_gen_toks=5", {"batch_size": 2, "device": None})
    assert lm.run.step == 4 and lm.batch_size == 2 and lm.max_gen_toks == 5 and lm.max_length == 32
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models still resolve


def test_command_line(run_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert harness.main(["--run", str(run_dir), "--tasks", "gptjax_mc", "--include-path", str(task_dir),
                         "--only-include-path", "--batch-size", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"gptjax ({run_dir} @ step 4)" in printed
    assert "|gptjax_mc|" in printed.replace(" ", "") and "acc_norm" in printed  # lm-eval's table
    res = json.loads(out.read_text())
    assert 0 <= res["results"]["gptjax_mc"]["acc,none"] <= 1
    assert res["config"]["model_args"] == {"run_dir": str(run_dir), "step": 4}

    # data that would have to come from the Hub: one line that says how to run offline
    assert harness.main(["--run", str(run_dir), "--tasks", "gptjax_hub", "--include-path", str(task_dir),
                         "--only-include-path"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "gptjax-tests/no-such-dataset" in line and "docs/harness.md" in line

    # as a module, mistakes are one line and exit code 2
    proc = run_script("-m", "gptjax.eval.harness", "--run", run_dir, "--tasks", "no_such_task", "--include-path",
                      task_dir, "--only-include-path")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: unknown task(s) no_such_task" in proc.stderr
