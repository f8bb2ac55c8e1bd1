"""Hugging Face GPT-2 interop: logit parity with transformers' GPT2LMHeadModel on the same weights, exact
round trips, converted runs that eval.py reads with a GPT-2 BPE tokenizer built here, and the refusals
(pickles, architectures we cannot represent, mismatched tensors, non-empty targets, resuming imported weights)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import run_script
from safetensors.numpy import load_file, save_file

from gptjax import config as config_lib
from gptjax import hf, model
from gptjax.checkpoint import CheckpointError, Checkpoints
from gptjax.data import EOT, BPETokenizer, DataError, TiktokenTokenizer, load_tokenizer
from gptjax.hf import ConversionError

transformers.logging.set_verbosity_error()
V = 500  # not a multiple of 128, so the imported embedding is padded


def make_hf_model(out: Path, seed: int = 0, *, sharded: bool = False, **kw) -> transformers.GPT2LMHeadModel:
    """A small random GPT-2, saved as safetensors. Biases and layer norms are perturbed away from HF's
    zeros and ones, so a dropped or transposed one shows in the logits."""
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=V, bos_token_id=V - 1, eos_token_id=V - 1)
    args.update(kw)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**args)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif ".ln_" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    m.save_pretrained(out, safe_serialization=True, **({"max_shard_size": "60KB"} if sharded else {}))
    return m


def torch_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    logits = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)
    return np.asarray(logits)[..., :cfg.vocab_size]


def random_tokens(vocab: int, B: int = 2, T: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return d, make_hf_model(d)


@pytest.fixture(scope="module")
def imported(hf_dir):
    return hf.import_gpt2(hf_dir[0])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE trained here on a little Python (no network): tokenizer.json, the
    vocab.json + merges.txt pair, and the same ranks as a .tiktoken file; end-of-text comes last, as in GPT-2."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [str(root / "json" / n) for n in ("__init__.py", "decoder.py", "encoder.py")]
    t = ByteLevelBPETokenizer()
    t.train(files, vocab_size=400, min_frequency=2, show_progress=False)
    t.add_special_tokens([EOT])
    d = tmp_path_factory.mktemp("tok")
    (d / "json").mkdir()
    t.save(str(d / "json" / "tokenizer.json"))
    (d / "pair").mkdir()
    t.save_model(str(d / "pair"))
    vocab = json.loads((d / "pair" / "vocab.json").read_text())
    vocab[EOT] = len(vocab)  # GPT-2's vocab.json lists <|endoftext|> too
    (d / "pair" / "vocab.json").write_text(json.dumps(vocab))
    byte_of = {c: b for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(ByteLevel.alphabet()) == set(byte_of)
    import base64
    (d / "tiktoken").mkdir()
    (d / "tiktoken" / "tiny.tiktoken").write_text("".join(
        f"{base64.b64encode(bytes(byte_of[c] for c in s)).decode()} {i}\n" for s, i in vocab.items() if s != EOT))
    return d


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in bs}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


# ----------------------------------------------------------------------------------------------
# Parity and round trips


def test_imported_gpt2_matches_transformers_logits(hf_dir, imported):
    d, m = hf_dir
    cfg, params = imported
    assert (cfg.vocab_size, cfg.padded_vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model) == (V, 512, 64, 2, 4, 64)
    assert cfg.norm == "pre" and cfg.final_norm and cfg.attention_pattern == ("dense",) and cfg.ff_dim == 256
    assert not params["wte"]["embedding"][V:].any()  # padding rows are zero
    tokens = random_tokens(V)
    ref = torch_logits(m, tokens)
    assert np.abs(our_logits(cfg, params, tokens) - ref).max() <= 1e-4
    # and the model is not trivially flat: the logits vary well beyond the tolerance
    assert ref.std() > 0.05


def test_sharded_bare_keys_and_other_options_import_the_same(tmp_path):
    """n_inner, layer_norm_epsilon and gelu_pytorch_tanh carry over; sharded safetensors load; Hub-style keys
    without 'transformer.', with the old attn.bias / masked_bias buffers and a tied lm_head.weight, are accepted."""
    m = make_hf_model(tmp_path / "a", seed=1, sharded=True, n_inner=96, layer_norm_epsilon=1e-3,
                      activation_function="gelu_pytorch_tanh")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    cfg, params = hf.import_gpt2(tmp_path / "a")
    assert cfg.ff_dim == 96 and cfg.ln_eps == 1e-3
    tokens = random_tokens(V, seed=1)
    assert np.abs(our_logits(cfg, params, tokens) - torch_logits(m, tokens)).max() <= 1e-4

    tensors = {}
    for f in sorted((tmp_path / "a").glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(cfg.n_layer):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    bare["lm_head.weight"] = bare["wte.weight"].copy()
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    save_file(bare, str(tmp_path / "b" / "model.safetensors"))
    _, params_b = hf.import_gpt2(tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, params, params_b)


def test_import_export_import_is_identical_and_transformers_loads_the_export(hf_dir, imported, tmp_path):
    d, m = hf_dir
    cfg, params = imported
    hf.export_gpt2(cfg, params, tmp_path / "out", eot_id=V - 1)
    # the exported tensors are the original ones, bit for bit, under the names transformers writes
    assert load_file(str(tmp_path / "out" / "model.safetensors")).keys() == load_file(str(d / "model.safetensors")).keys()
    jax.tree.map(np.testing.assert_array_equal, load_file(str(tmp_path / "out" / "model.safetensors")),
                 load_file(str(d / "model.safetensors")))
    cfg2, params2 = hf.import_gpt2(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    m2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert m2.config.eos_token_id == V - 1 and m2.config.n_positions == 64
    tokens = random_tokens(V, seed=2)
    np.testing.assert_array_equal(torch_logits(m2, tokens), torch_logits(m, tokens))


def test_a_gptjax_model_exports_to_transformers_with_the_same_logits(tmp_path):
    """The other direction: gptjax parameters (padded vocabulary, d_ff != 4 d_model) in transformers."""
    cfg = config_lib.ModelConfig(name="t", vocab_size=300, block_size=32, n_layer=2, n_head=2, d_model=32,
                                 d_ff=48, ln_eps=1e-6)
    rng = np.random.default_rng(0)  # random everywhere, padding rows of wte included (they must not matter)
    params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), model.abstract_params(cfg))
    params["ln_f"]["scale"] += 1
    hf.export_gpt2(cfg, params, tmp_path)
    m = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = random_tokens(300, T=32, seed=3)
    assert np.abs(our_logits(cfg, params, tokens) - torch_logits(m, tokens)).max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Converted runs and tokenizers


def test_gpt2_tokenizer_files_all_load_the_same(tok_dir):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "tool.py").read_text() + " héllo 😀 wörld  \n\n  x's" + EOT + "z"
    toks = [load_tokenizer(tok_dir / k) for k in ("json", "pair", "tiktoken")]
    assert [type(t) for t in toks] == [BPETokenizer, BPETokenizer, TiktokenTokenizer]
    ids = [t.encode(text) for t in toks]
    assert ids[0] == ids[1] == ids[2]
    assert all(t.eot_id == t.pad_id == 400 and t.vocab_size == 401 for t in toks)
    assert ids[0].count(400) == 1  # end-of-text in the text is the special token, not split into pieces
    assert all(t.decode(i) == text.replace(EOT, "") for t, i in zip(toks, ids))
    assert all(t.encode_batch(["a b", "def f():"]) == [t.encode("a b"), t.encode("def f():")] for t in toks)


def test_load_tokenizer_names_the_fix_when_there_is_none(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json.*convert.py from-hf"):
        load_tokenizer(tmp_path)


def test_converted_run_evaluates_with_eval_py_and_exports_back(hf_dir, tok_dir, tmp_path):
    d, m = hf_dir
    run, out = tmp_path / "run", tmp_path / "out"
    r = run_script("convert.py", "from-hf", d, run, "--tokenizer", tok_dir / "json")
    assert r.returncode == 0, r.stderr
    assert (run / "tokenizer.json").exists() and (run / "checkpoints" / "0").is_dir()
    assert config_lib.load_json(run / "config.json").model == hf.import_gpt2(d)[0]

    text_file = Path(sysconfig.get_paths()["stdlib"]) / "json" / "scanner.py"
    r = run_script("eval.py", run, "--text", text_file, "--json", tmp_path / "r.json",
                   "--prompt", "def ", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())

    # the same loss from transformers on the same windows (each of 64 predicted tokens, stride 64)
    tok = load_tokenizer(run)
    ids = tok.encode(text_file.read_text())
    nll = []
    for s in range(0, len(ids) - 1, 64):
        w = torch.as_tensor(ids[s:s + 65])[None]
        with torch.no_grad():
            logp = torch.log_softmax(m(w[:, :-1]).logits.double(), -1)
        nll.append(-logp[0, torch.arange(w.shape[1] - 1), w[0, 1:]])
    nll = torch.cat(nll)
    assert res["tokens"] == len(nll) == len(ids) - 1
    assert abs(res["loss"] - nll.mean().item()) < 1e-4

    # greedy continuation as transformers generates it, up to end-of-text
    prompt = tok.encode("def ")
    with torch.no_grad():
        gen = m.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.eot_id)[0, len(prompt):].tolist()
    gen = gen[:gen.index(tok.eot_id)] if tok.eot_id in gen else gen
    assert res["sample"] == "def " + tok.decode(gen)

    # back to Hugging Face: the tokenizer travels, end-of-text becomes bos/eos, weights are the original ones
    hf.convert_to_hf(run, out, log=lambda _: None)
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "json" / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eot_id
    jax.tree.map(np.testing.assert_array_equal, load_file(str(out / "model.safetensors")),
                 load_file(str(d / "model.safetensors")))


def test_tokenizer_files_travel_with_the_model(hf_dir, tok_dir, tmp_path):
    d, _ = hf_dir
    src = tmp_path / "hf"
    shutil.copytree(d, src)
    for f in (tok_dir / "pair").iterdir():
        shutil.copyfile(f, src / f.name)
    hf.convert_from_hf(src, tmp_path / "run", log=lambda _: None)
    assert isinstance(load_tokenizer(tmp_path / "run"), BPETokenizer)
    # a tokenizer larger than the embedding is refused before anything is written
    big = tmp_path / "big"
    big.mkdir()
    vocab = {**json.loads((tok_dir / "pair" / "vocab.json").read_text()), **{f"x{i}": 1000 + i for i in range(200)}}
    (big / "vocab.json").write_text(json.dumps(vocab))
    shutil.copyfile(tok_dir / "pair" / "merges.txt", big / "merges.txt")
    with pytest.raises(ConversionError, match="tokenizer has .* tokens but the model only 500"):
        hf.convert_from_hf(d, tmp_path / "run2", tokenizer_dir=big, log=lambda _: None)
    assert not (tmp_path / "run2").exists()


# ----------------------------------------------------------------------------------------------
# Refusals


def test_pickle_only_directory_is_refused_without_unpickling(hf_dir, tmp_path):
    src = tmp_path / "pickle"
    src.mkdir()
    shutil.copyfile(hf_dir[0] / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"not a pickle: it must never be opened")
    with pytest.raises(ConversionError, match="pytorch_model.bin.*never loads pickled weights"):
        hf.import_gpt2(src)
    r = run_script("convert.py", "from-hf", src, tmp_path / "run")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "safetensors" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt_neo"}, "model_type is 'gpt_neo'"),
    ({"activation_function": "relu"}, "activation_function is 'relu'"),
    ({"activation_function": "gelu"}, "tanh-approximate GELU"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights is false"),
    ({"tie_word_embeddings": False}, "ties the output layer"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_head": 5}, "multiple of n_head=5"),
])
def test_unsupported_configs_are_refused(hf_dir, tmp_path, change, message):
    src = tmp_path / "src"
    shutil.copytree(hf_dir[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConversionError, match=message):
        hf.import_gpt2(src)


def _rewrite(hf_src: Path, dst: Path, edit) -> Path:
    shutil.copytree(hf_src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_mismatched_tensors_are_named(hf_dir, tmp_path):
    d = hf_dir[0]
    src = tmp_path / "ctx"
    shutil.copytree(d, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "n_positions": 32}))
    with pytest.raises(ConversionError, match=r"shape mismatch for wpe.weight \(64, 64\) \(expected \(32, 64\)\)"):
        hf.import_gpt2(src)
    src = _rewrite(d, tmp_path / "missing", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ConversionError, match=r"missing tensor\(s\): h.1.mlp.c_fc.bias"):
        hf.import_gpt2(src)
    src = _rewrite(d, tmp_path / "extra", lambda t: t.update({"transformer.h.0.attn.rotary": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\): h.0.attn.rotary"):
        hf.import_gpt2(src)
    src = _rewrite(d, tmp_path / "untied", lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}))
    with pytest.raises(ConversionError, match="lm_head.weight differs from wte.weight"):
        hf.import_gpt2(src)
    with pytest.raises(ConversionError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        shutil.copyfile(d / "config.json", tmp_path / "empty" / "config.json")
        hf.import_gpt2(tmp_path / "empty")


@pytest.mark.parametrize("change, message", [
    ({"attention_pattern": ("dense", "banded")}, "banded layers have no GPT-2 equivalent"),
    ({"norm": "post"}, "model.norm is 'post'"),
    ({"final_norm": False}, "final layer norm"),
])
def test_export_refuses_what_gpt2_cannot_express(imported, tmp_path, change, message):
    cfg, params = imported
    bad = dataclasses.replace(cfg, **change)
    with pytest.raises(ConversionError, match=message):
        hf.export_gpt2(bad, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_targets_need_force_and_imported_weights_do_not_resume(hf_dir, tmp_path):
    d = hf_dir[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "tokenizer.model").write_text("a stale SentencePiece model would shadow the GPT-2 tokenizer")
    with pytest.raises(ConversionError, match="is not empty.*--force"):
        hf.convert_from_hf(d, run, log=lambda _: None)
    hf.convert_from_hf(d, run, force=True, log=lambda _: None)
    assert (run / "notes.txt").read_text() == "mine" and not (run / "tokenizer.model").exists()
    with pytest.raises(ConversionError, match="also the source"):
        hf.convert_from_hf(d, d, force=True, log=lambda _: None)

    # eval.py's restore (params only) reads it; a training resume is refused with one clear message
    cfg = config_lib.load_json(run / "config.json")
    ab = model.abstract_params(cfg.model)
    ckpts = Checkpoints(run, read_only=True, log=lambda _: None)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), ab)
    step, state = ckpts.restore({"params": target}, params_only=True)
    jax.tree.map(np.testing.assert_array_equal, state["params"], hf.import_gpt2(d)[1])
    with pytest.raises(CheckpointError, match="imported weights without optimizer state"):
        ckpts.restore({"params": target, "step": None, "opt_state": None})
    ckpts.close()
    from gptjax.train.pretrain import pretrain
    with pytest.raises(CheckpointError, match="imported weights without optimizer state.*new run_dir"):
        pretrain(dataclasses.replace(cfg, run_dir=str(run)), log=lambda *_: None)


def test_imported_gpt2_continues_pretraining_in_its_own_tokenizer(hf_dir, tok_dir, tmp_path, corpus_dir):
    from gptjax.train.pretrain import pretrain

    parent, child = tmp_path / "gpt2", tmp_path / "continued"
    hf.convert_from_hf(hf_dir[0], parent, tokenizer_dir=tok_dir / "json", log=lambda _: None)
    cfg = config_lib.resolve("tiny", [
        f"init_from={parent}", f"run_dir={child}", "data.source=text", f"data.paths={corpus_dir}/*.py",
        f"data.cache_dir={tmp_path / 'cache'}", "steps=8", "batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2",
        "sample_tokens=0", "checkpoint.every=8"])
    assert cfg.model == config_lib.load_json(parent / "config.json").model  # the parent's model, not tiny's
    summary = pretrain(cfg, log=lambda *_: None)
    recs = [json.loads(line) for line in (child / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "loss" not in recs[0]
    assert summary["val_loss"] < recs[0]["val_loss"] - 0.1, (recs[0], summary["val_loss"])
    # the corpus was tokenized with the parent's GPT-2 BPE, not a SentencePiece model trained on it
    assert (child / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    assert not (child / "tokenizer.model").exists()
    data_dir = Path(json.loads((child / "data.json").read_text())["data_dir"])
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["tokenizer"]["trained_here"] is False and manifest["tokenizer"]["files"] == ["tokenizer.json"]
    from gptjax.data import TokenData

    head = load_tokenizer(parent).decode(TokenData(data_dir).shards["train"][0][:200])
    assert len(head) > 200 and any(p.read_text().startswith(head) for p in corpus_dir.glob("*.py"))
    assert json.loads((child / "config.json").read_text())["lineage"][0]["run_dir"] == str(parent.absolute())


def test_imported_gpt2_fine_tunes_with_new_task_token_rows(hf_dir, tok_dir, tmp_path):
    from gptjax.checkpoint import Checkpoints
    from gptjax.finetune.config import resolve
    from gptjax.finetune.stage import finetune, init_task_head

    parent, child = tmp_path / "gpt2", tmp_path / "ft"
    hf.convert_from_hf(hf_dir[0], parent, tokenizer_dir=tok_dir / "json", log=lambda _: None)
    lines = [ln.strip() for ln in (Path(json.__file__).parent / "decoder.py").read_text().splitlines()
             if len(ln.strip()) > 8]
    recs = [{"sentence": ln, "label": int("(" in ln)} for ln in lines[:120]]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = resolve([f"init_from={parent}", f"task={tmp_path / 't.jsonl'}", f"run_dir={child}", "steps=6",
                   "batch_size=8", "eval_batch_size=8", "optim.lr=1e-3"])
    summary = finetune(cfg, devices=jax.devices()[:1], log=lambda *_: None)
    info = json.loads((child / "finetune.json").read_text())
    # GPT-2's BPE has no task tokens: three new ids just past the model's vocabulary, as new embedding rows
    assert info["special_ids"]["added"] == 3 and info["special_ids"]["start"] == V
    assert info["model"]["vocab_size"] == V + 3
    assert summary["step"] == 6 and np.isfinite(summary["val_acc"])
    mcfg = config_lib.from_dict(config_lib.ModelConfig, info["model"])
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = dict(model.abstract_params(mcfg))
    target["head"] = jax.eval_shape(lambda: init_task_head(mcfg, 2, jax.random.key(0)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), target)
    ck = Checkpoints(child / "best", read_only=True, log=lambda _: None)
    params = ck.restore({"params": target}, ck.latest_step(), params_only=True)[1]["params"]
    ck.close()
    wte = np.asarray(params["wte"]["embedding"])
    assert wte.shape[0] == mcfg.padded_vocab and np.abs(wte[V:V + 3]).sum() > 0  # initialised, then trained
