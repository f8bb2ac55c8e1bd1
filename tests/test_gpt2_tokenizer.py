"""Pretraining with a tokenizer the user supplies (data.tokenizer): a GPT-2-style byte-level BPE built here
(no network) as a tokenizer.json and as a .tiktoken rank file. The model's vocabulary follows the tokenizer,
the run directory keeps a copy of it, a resumed run must find the same one, and `convert.py to-hf` exports a
model that transformers loads with that same tokenizer and the same logits."""

from __future__ import annotations

import base64
import json
import shutil
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from gptjax import config as config_lib
from gptjax import hf, model
from gptjax.data import EOT, BPETokenizer, DataError, TiktokenTokenizer, TokenData
from gptjax.data.tokenizers import load_tokenizer, open_tokenizer
from gptjax.errors import ConfigError
from gptjax.train.pretrain import pretrain

transformers.logging.set_verbosity_error()
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE = "def f(x):\n    return {'héllo': x ** 2}  # wörld 😀\n\n\n" + EOT + "class A:\n\tpass\n"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in bs}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory) -> dict[str, Path]:
    """A GPT-2-style BPE trained here on a little Python: ByteLevel pre-tokenizer and decoder, ~600 tokens,
    <|endoftext|> last (as GPT-2's 50256); the same ranks as a .tiktoken file; and a second, different BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")

    def build(names, vocab, out: Path) -> Path:
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.train([str(STDLIB / n) for n in names], trainers.BpeTrainer(
            vocab_size=vocab, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        t.add_special_tokens([EOT])
        out.mkdir()
        t.save(str(out / "tokenizer.json"))
        return out / "tokenizer.json"

    main = build(("textwrap.py", "shlex.py", "fnmatch.py"), 600, d / "bpe")
    other = build(("textwrap.py",), 500, d / "other")
    vocab = json.loads(main.read_text())["model"]["vocab"]
    char_byte = {c: b for b, c in _bytes_to_unicode().items()}
    (d / "tt").mkdir()
    (d / "tt" / "mini.tiktoken").write_text("".join(
        f"{base64.b64encode(bytes(char_byte[c] for c in s)).decode()} {i}\n" for s, i in vocab.items()))
    return {"json": main, "other": other, "tiktoken": d / "tt" / "mini.tiktoken"}


def overrides(corpus_dir: Path, cache: Path, run: Path, tokenizer: Path, steps: int = 3) -> list[str]:
    return ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32", "batch_size=8",
            f"steps={steps}", "eval_batches=2", "sample_tokens=0", "optim.warmup_steps=1", "checkpoint.every=3",
            "data.source=text", f"data.paths={corpus_dir}/*.py", f"data.cache_dir={cache}",
            f"data.tokenizer={tokenizer}", f"run_dir={run}"]


@pytest.fixture(scope="module")
def trained(tok_files, corpus_dir, tmp_path_factory):
    """A tiny model pretrained 3 steps in the supplied tokenizer.json; (run dir, log lines, overrides)."""
    root = tmp_path_factory.mktemp("gpt2run")
    args = overrides(corpus_dir, root / "cache", root / "run", tok_files["json"])
    lines: list[str] = []
    pretrain(config_lib.resolve("tiny", args), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return root / "run", lines, args


def test_open_tokenizer_takes_each_kind_and_names_the_kinds_otherwise(tok_files, tmp_path):
    bpe, tt = open_tokenizer(tok_files["json"]), open_tokenizer(tok_files["tiktoken"])
    assert isinstance(bpe, BPETokenizer) and isinstance(tt, TiktokenTokenizer)
    assert isinstance(open_tokenizer(tok_files["json"].parent), BPETokenizer)  # a directory: load_tokenizer
    assert bpe.vocab_size == tt.vocab_size == bpe.eot_id + 1 == tt.eot_id + 1
    assert bpe.encode(SAMPLE) == tt.encode(SAMPLE) and bpe.encode(SAMPLE).count(bpe.eot_id) == 1
    assert tt.decode(tt.encode(SAMPLE)) == SAMPLE.replace(EOT, "")
    for bad in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(DataError) as e:
            open_tokenizer(bad)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"data.tokenizer={bad}") and "tokenizer.json" in msg
        assert ".tiktoken" in msg and "tokenizer.model" in msg
    shutil.copyfile(tok_files["json"], tmp_path / "gpt2.json")
    with pytest.raises(DataError, match="rename it to tokenizer.json"):
        open_tokenizer(tmp_path / "gpt2.json")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="data.tokenizer=.*cannot read"):
        open_tokenizer(tmp_path / "tokenizer.model")


def test_pretraining_in_a_supplied_tokenizer_json(trained, tok_files, corpus_dir):
    run, lines, _ = trained
    tok = BPETokenizer(tok_files["json"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == tok.vocab_size and cfg["data"]["tokenizer"] == str(tok_files["json"])
    padded = config_lib.ModelConfig(vocab_size=tok.vocab_size).padded_vocab
    assert padded % 128 == 0 and padded > tok.vocab_size  # 601 -> 640: padding rows exist
    assert (f"data: model.vocab_size 4096 -> {tok.vocab_size} (the tokenizer's; embedding rows padded to "
            f"{padded})") in lines
    assert (run / "tokenizer.json").read_bytes() == tok_files["json"].read_bytes()
    assert not (run / "tokenizer.model").exists()
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    # the token cache holds the corpus in this tokenizer: every document decodes back to its file, exactly
    td = TokenData(json.loads((run / "data.json").read_text())["data_dir"])
    assert td.manifest["tokenizer"]["trained_here"] is False
    assert td.manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    ids = np.concatenate([np.asarray(s) for sp in ("train", "val") for s in td.shards[sp]])
    assert ids.max() < tok.vocab_size
    ends = np.flatnonzero(ids == tok.eot_id)
    docs = [tok.decode(d) for d in np.split(ids, ends + 1)[:-1]]
    texts = sorted(p.read_text() for p in corpus_dir.glob("*.py"))
    assert sorted(docs) == texts


def test_a_resumed_run_needs_the_same_tokenizer(trained, tok_files, tmp_path):
    run, _, args = trained
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    changed = [a for a in args if not a.startswith("data.tokenizer=")]
    with pytest.raises(DataError) as e:
        pretrain(config_lib.resolve("tiny", changed + [f"data.tokenizer={tok_files['other']}", "steps=6"]),
                 log=lambda *a, **k: None)
    assert "\n" not in str(e.value) and "another tokenizer" in str(e.value) and "untouched" in str(e.value)
    with pytest.raises(DataError) as e:  # nor may it switch to a tokenizer trained on the corpus
        pretrain(config_lib.resolve("tiny", changed + ["steps=6"]), log=lambda *a, **k: None)
    assert f"data.tokenizer={tok_files['json']}" in str(e.value) and "untouched" in str(e.value)
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()} == before
    # the same tokenizer again (a copy elsewhere: the same bytes): the run resumes, its resolved vocabulary
    # matching the one config.json records although the preset says 4096
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copyfile(tok_files["json"], copy)
    lines: list[str] = []
    summary = pretrain(config_lib.resolve("tiny", changed + [f"data.tokenizer={copy}", "steps=4"]),
                       log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert summary["step"] == 4 and any("resuming from checkpoint at step 3" in ln for ln in lines)
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == BPETokenizer(copy).vocab_size


def test_init_from_with_data_tokenizer_is_refused(trained, tok_files, tmp_path):
    run, _, args = trained
    child = [a for a in args if not a.startswith(("run_dir=", "model."))] + [f"init_from={run}",
                                                                             f"run_dir={tmp_path / 'child'}"]
    with pytest.raises(ConfigError, match="data.tokenizer=.*init_from=.*drop data.tokenizer"):
        pretrain(config_lib.resolve("tiny", child), log=lambda *a, **k: None)
    assert not (tmp_path / "child" / "config.json").exists()  # refused before anything was written
    # without it, the child takes its parent's tokenizer (and vocabulary), as any init_from run does
    child = [a for a in child if not a.startswith(("data.tokenizer=", "steps="))] + ["steps=1"]
    cfg = config_lib.resolve("tiny", child)
    assert cfg.model.vocab_size == json.loads((run / "config.json").read_text())["model"]["vocab_size"]
    assert pretrain(cfg, log=lambda *a, **k: None)["step"] == 1
    assert (tmp_path / "child" / "tokenizer.json").read_bytes() == tok_files["json"].read_bytes()


def test_missing_tokenizer_is_one_data_error(corpus_dir, tmp_path):
    cfg = config_lib.resolve("tiny", overrides(corpus_dir, tmp_path / "cache", tmp_path / "run",
                                               tmp_path / "gone" / "tokenizer.json"))
    with pytest.raises(DataError) as e:
        pretrain(cfg, log=lambda *a, **k: None)
    assert "\n" not in str(e.value) and str(e.value).startswith("data.tokenizer=") and ".tiktoken" in str(e.value)


def test_export_loads_in_transformers_with_the_same_tokenizer_and_logits(trained, tmp_path):
    from gptjax.checkpoint import open_step

    run, _, _ = trained
    out = tmp_path / "hf"
    hf.convert_to_hf(run, out, log=lambda _: None)
    ours = load_tokenizer(run)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["vocab_size"] == ours.vocab_size and hf_cfg["eos_token_id"] == ours.eot_id
    m = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert m.get_input_embeddings().weight.shape[0] == ours.vocab_size  # unpadded rows

    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ids = ours.encode(SAMPLE)
    long = ours.encode(SAMPLE * 4)
    assert auto(SAMPLE)["input_ids"] == fast(SAMPLE)["input_ids"] == ids
    assert auto.eos_token == EOT and auto.decode(ids, skip_special_tokens=True) == ours.decode(ids)

    ckpts, step, stored = open_step(run, log=lambda _: None)
    cfg = config_lib.stored_train_config(stored).model
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), model.abstract_params(cfg))
    params = ckpts.restore({"params": target}, step, params_only=True)[1]["params"]
    ckpts.close()
    tokens = np.asarray([long[:32], long[7:39]], np.int32)
    logits = np.asarray(jax.jit(model.forward, static_argnums=0)(cfg, params, tokens))
    assert logits.shape[-1] == cfg.padded_vocab > ours.vocab_size
    with torch.no_grad():
        theirs = m(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(logits[..., :ours.vocab_size] - theirs).max() <= 1e-4


def test_pretraining_in_a_supplied_tiktoken_file(tok_files, corpus_dir, tmp_path):
    run = tmp_path / "run"
    summary = pretrain(config_lib.resolve("tiny", overrides(corpus_dir, tmp_path / "cache", run,
                                                            tok_files["tiktoken"], steps=2)), log=lambda *a, **k: None)
    tok = TiktokenTokenizer(tok_files["tiktoken"])
    assert summary["step"] == 2 and np.isfinite(summary["val_loss"])
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == tok.vocab_size
    assert (run / "mini.tiktoken").read_bytes() == tok_files["tiktoken"].read_bytes()
    assert isinstance(load_tokenizer(run), TiktokenTokenizer)


def test_compile_only_builds_the_model_in_the_supplied_tokenizers_vocabulary(tok_files, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    from gptjax import flops

    out = tmp_path / "report.json"
    args = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32", "batch_size=4",
            f"data.tokenizer={tok_files['json']}"]
    proc = subprocess.run([sys.executable, "train.py", "--config", "tiny", *args, "--compile-only", "--json", str(out)],
                          cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config_lib.resolve("tiny", args + ["model.vocab_size=601"])
    assert json.loads(out.read_text())["params"] == flops.param_counts(cfg.model)["total"]
    assert flops.param_counts(config_lib.resolve("tiny", args).model)["total"] != flops.param_counts(cfg.model)["total"]
