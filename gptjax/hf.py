"""Hugging Face GPT-2 interop: import a `transformers` GPT-2 checkpoint directory, export one back.

A Hugging Face GPT-2 directory holds config.json and model.safetensors (or model-*.safetensors shards with
model.safetensors.index.json). Its Conv1D weights are stored [in, out], as ours are, so a tensor maps over
by a rename and a reshape: c_attn.weight [D, 3D] is q, k, v as three consecutive D-column chunks, each
split into N heads of H, which is our c_attn.kernel [D, 3, N, H]; layers are stacked on a leading L axis.
Weights are read with `safetensors.numpy` only: a pickle (pytorch_model.bin) can run code when loaded, so
it is refused.

A converted run directory is what eval.py reads: RUN/config.json, RUN/checkpoints/0/ (parameters and
config, no optimizer state) and the tokenizer files beside them.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import ModelConfig
from gptjax.errors import ConversionError

# GPT-2's tanh-approximate GELU under its Hugging Face names; our MLP computes exactly this one.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Tokenizer files copied along with the weights, both ways (load_tokenizer reads the first three kinds).
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                      "special_tokens_map.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
           "model.ckpt.index")
# Files a converted or exported directory may hold that --force replaces.
RUN_FILES = ("config.json", "data.json", "metrics.jsonl", "summary.json", "hf.json", "tokenizer.model")
EXPORT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json")




# ----------------------------------------------------------------------------------------------
# Reading and writing Hugging Face files


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; pass a Hugging Face GPT-2 model directory "
                              f"(config.json + model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def model_config_from_hf(hf: dict, name: str = "gpt2-hf") -> ModelConfig:
    """Our ModelConfig for a Hugging Face GPT-2 config.json, or one error listing what we cannot represent."""
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2' (only GPT-2 checkpoints convert)")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        problems.append(f"activation_function is {act!r}; gptjax's MLP uses the tanh-approximate GELU "
                        f"({' / '.join(TANH_GELU)})")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx is true (attention scores scaled by 1/layer index)")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights is false (attention scores not scaled by 1/sqrt(head dim))")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention is true (an encoder-decoder model)")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings is false (gptjax ties the output layer to wte)")
    try:
        D, L, N = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        V = int(hf["vocab_size"])
        T = int(hf.get("n_positions") or hf["n_ctx"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json lacks a usable GPT-2 size field ({e}); it needs n_embd, n_layer, "
                              f"n_head, n_positions and vocab_size") from None
    if min(D, L, N, V, T) <= 0 or D % N:
        problems.append(f"n_embd={D} must be a positive multiple of n_head={N}")
    F = hf.get("n_inner")
    if F is not None and (not isinstance(F, int) or F <= 0):
        problems.append(f"n_inner={F!r} is not a positive integer")
    if problems:
        raise ConversionError("cannot represent this checkpoint in gptjax: " + "; ".join(problems))
    # reorder_and_upcast_attn only changes the order and precision of the attention arithmetic, which our
    # float32 attention already computes exactly, so it is accepted.
    return ModelConfig(
        name=name, vocab_size=V, block_size=T, n_layer=L, n_head=N, d_model=D,
        d_ff=0 if F in (None, 4 * D) else F, norm="pre", final_norm=True, attention_pattern=("dense",),
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, init_std=float(hf.get("initializer_range", 0.02)),
        ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or its shards), as numpy arrays; never a pickle."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints load)

    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConversionError('reading safetensors needs the safetensors package: pip install -e ".[hf]"') from None
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
        expect = None
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index} names shard(s) missing from {hf_dir}: {', '.join(missing)}")
        expect = weight_map
    else:
        pickles = [p for p in PICKLES if (hf_dir / p).exists()]
        if pickles:
            raise ConversionError(
                f"{hf_dir} holds {', '.join(pickles)} but no model.safetensors. gptjax never loads pickled weights "
                f"(unpickling can run arbitrary code). Download the model's model.safetensors (the Hub has one for "
                f"gpt2, gpt2-medium, gpt2-large, gpt2-xl), or, in an environment where you trust the file, convert it: "
                f"python -c \"from transformers import GPT2LMHeadModel as M; "
                f"M.from_pretrained('{hf_dir}').save_pretrained('OUT_DIR', safe_serialization=True)\"")
        raise ConversionError(f"{hf_dir} has no model.safetensors (nor model.safetensors.index.json with shards)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # safetensors raises its own SafetensorError, and TypeError for unknown dtypes
            raise ConversionError(f"cannot read {f}: {e}") from None
        for k, v in part.items():
            if k in tensors:
                raise ConversionError(f"tensor {k} appears in more than one shard ({f.name} and another)")
            if expect is not None and expect.get(k) != f.name:
                raise ConversionError(f"tensor {k} is in {f.name} but the index puts it in {expect.get(k)}")
            tensors[k] = v
    if expect is not None:
        absent = sorted(set(expect) - set(tensors))
        if absent:
            raise ConversionError(f"the index lists tensors no shard holds: {', '.join(absent[:5])}")
    return tensors


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every tensor of a GPT-2 checkpoint (without the `transformer.` prefix) and its shape."""
    D, F, V, T = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.block_size
    shapes = {"wte.weight": (V, D), "wpe.weight": (T, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(cfg.n_layer):
        shapes.update({
            f"h.{i}.ln_1.weight": (D,), f"h.{i}.ln_1.bias": (D,),
            f"h.{i}.attn.c_attn.weight": (D, 3 * D), f"h.{i}.attn.c_attn.bias": (3 * D,),
            f"h.{i}.attn.c_proj.weight": (D, D), f"h.{i}.attn.c_proj.bias": (D,),
            f"h.{i}.ln_2.weight": (D,), f"h.{i}.ln_2.bias": (D,),
            f"h.{i}.mlp.c_fc.weight": (D, F), f"h.{i}.mlp.c_fc.bias": (F,),
            f"h.{i}.mlp.c_proj.weight": (F, D), f"h.{i}.mlp.c_proj.bias": (D,)})
    return shapes


# Per-layer tensors: HF name -> (our path under "h", reshape of one layer's tensor to our layout).
def _layer_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple]]:
    D, N, H, F = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ff_dim
    return {
        "ln_1.weight": (("ln_1", "scale"), (D,)), "ln_1.bias": (("ln_1", "bias"), (D,)),
        "attn.c_attn.weight": (("attn", "c_attn", "kernel"), (D, 3, N, H)),
        "attn.c_attn.bias": (("attn", "c_attn", "bias"), (3, N, H)),
        "attn.c_proj.weight": (("attn", "c_proj", "kernel"), (N, H, D)),
        "attn.c_proj.bias": (("attn", "c_proj", "bias"), (D,)),
        "ln_2.weight": (("ln_2", "scale"), (D,)), "ln_2.bias": (("ln_2", "bias"), (D,)),
        "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), (D, F)), "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), (F,)),
        "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), (F, D)), "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), (D,)),
    }


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our float32 params tree from GPT-2 tensors; every missing, unexpected or misshapen tensor is named."""
    named = {}
    for k, v in tensors.items():
        short = k[len("transformer."):] if k.startswith("transformer.") else k
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", short):
            continue  # the causal-mask buffers older transformers versions saved: not weights
        if short in named:
            raise ConversionError(f"tensor {short} appears twice (with and without the 'transformer.' prefix)")
        named[short] = v
    lm_head = named.pop("lm_head.weight", None)
    shapes = _hf_shapes(cfg)
    unexpected = sorted(set(named) - set(shapes))
    missing = sorted(set(shapes) - set(named), key=lambda s: (len(s), s))
    wrong = [f"{k} {tuple(named[k].shape)} (expected {shapes[k]})" for k in shapes
             if k in named and tuple(named[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:6])}" + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:6])}"
                        + (f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else ""))
    if wrong:
        problems.append(f"shape mismatch for {'; '.join(wrong[:6])}")
    if problems:
        raise ConversionError("the weights do not match config.json (n_embd, n_layer, n_head, n_inner, n_positions, "
                              "vocab_size): " + "; ".join(problems))
    if lm_head is not None and not (lm_head.shape == named["wte.weight"].shape and np.array_equal(lm_head, named["wte.weight"])):
        raise ConversionError("lm_head.weight differs from wte.weight: gptjax ties the output layer to the input "
                              "embedding, so an untied model cannot be represented")

    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    wte = np.zeros((cfg.padded_vocab, cfg.d_model), np.float32)  # rows past vocab_size: padding, masked out
    wte[:cfg.vocab_size] = f32(named["wte.weight"])
    params: dict[str, Any] = {"wte": {"embedding": wte}, "wpe": {"embedding": f32(named["wpe.weight"])},
                              "ln_f": {"scale": f32(named["ln_f.weight"]), "bias": f32(named["ln_f.bias"])}}
    for hf_name, (path, shape) in _layer_map(cfg).items():
        stacked = np.stack([f32(named[f"h.{i}.{hf_name}"]).reshape(shape) for i in range(cfg.n_layer)])
        _set(params, ("h",) + path, stacked)
    return params


def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """GPT-2 tensors (keys as transformers' GPT2LMHeadModel.save_pretrained writes them) from our params."""
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    out = {"transformer.wte.weight": f32(params["wte"]["embedding"])[:cfg.vocab_size],
           "transformer.wpe.weight": f32(params["wpe"]["embedding"]),
           "transformer.ln_f.weight": f32(params["ln_f"]["scale"]), "transformer.ln_f.bias": f32(params["ln_f"]["bias"])}
    shapes = _hf_shapes(cfg)
    for hf_name, (path, _) in _layer_map(cfg).items():
        stacked = np.asarray(_get(params["h"], path), dtype=np.float32)
        for i in range(cfg.n_layer):
            out[f"transformer.h.{i}.{hf_name}"] = f32(stacked[i]).reshape(shapes[f"h.{i}.{hf_name}"])
    return out


def check_params(cfg: ModelConfig, params: dict) -> None:
    """The params tree has exactly the names and shapes `cfg` declares (model.abstract_params)."""
    import jax

    from gptjax.model import abstract_params

    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    have = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    diffs = [f"{k}: {'missing' if k not in have else 'unexpected' if k not in want else f'{have[k]} vs {want[k]}'}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        raise ConversionError(f"parameters do not match the model config: {'; '.join(diffs[:6])}")


# ----------------------------------------------------------------------------------------------
# Public API


def import_gpt2(hf_dir: str | Path, *, name: str = "gpt2-hf") -> tuple[ModelConfig, dict]:
    """(ModelConfig, float32 numpy params tree) of a Hugging Face GPT-2 directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory; pass a Hugging Face GPT-2 model directory")
    cfg = model_config_from_hf(read_hf_config(hf_dir), name)
    params = params_from_hf(cfg, read_safetensors(hf_dir))
    check_params(cfg, params)
    return cfg, params


def hf_config(cfg: ModelConfig, *, eot_id: int | None = None) -> dict:
    """config.json for transformers' GPT2LMHeadModel; refuses what GPT-2's architecture cannot express."""
    problems = []
    if cfg.norm != "pre":
        problems.append("model.norm is 'post' (GPT-1); GPT-2 normalises before each sublayer")
    if not cfg.final_norm:
        problems.append("model.final_norm is false; GPT-2 has a final layer norm (ln_f)")
    if any(k != "dense" for k in cfg.attention_pattern):
        problems.append(f"model.attention_pattern is {','.join(cfg.attention_pattern)}; GPT-2 has only dense "
                        f"attention (GPT-3's banded layers have no GPT-2 equivalent)")
    if problems:
        raise ConversionError("cannot export as GPT-2: " + "; ".join(problems))
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None if cfg.ff_dim == 4 * cfg.d_model else cfg.ff_dim,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.ln_eps, "initializer_range": cfg.init_std,
        "resid_pdrop": cfg.resid_pdrop, "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def export_gpt2(cfg: ModelConfig, params: dict, out_dir: str | Path, *, eot_id: int | None = None) -> Path:
    """Write config.json + model.safetensors (float32, unpadded vocabulary) that transformers loads as a
    GPT2LMHeadModel. `eot_id` becomes bos/eos_token_id when known."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ConversionError('writing safetensors needs the safetensors package: pip install -e ".[hf]"') from None
    config = hf_config(cfg, eot_id=eot_id)
    check_params(cfg, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(cfg, params), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Whole directories (what convert.py runs)


def _prepare_target(path: Path, force: bool, ours: tuple[str, ...], what: str, sources: tuple[Path, ...]) -> None:
    """Refuse a non-empty target unless `force`; with it, remove only the files a conversion writes."""
    if any(path.resolve() == s.resolve() for s in sources):
        raise ConversionError(f"{path} is also the source; write the converted model into another directory")
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ConversionError(f"{path} is not empty; choose a new {what} directory, or pass --force to replace "
                                  f"the model files in it")
        for n in ours:
            if (path / n).is_file():
                (path / n).unlink()
        for p in list(path.glob("*.tiktoken")) + list(path.glob("model-*.safetensors")):
            p.unlink()
        for n in HF_TOKENIZER_FILES:
            if (path / n).is_file():
                (path / n).unlink()
        if (path / "checkpoints").is_dir():
            shutil.rmtree(path / "checkpoints")
    path.mkdir(parents=True, exist_ok=True)


def _tokenizer_source(src: Path, explicit: bool):
    """(files to copy, tokenizer or None) from directory `src`."""
    from gptjax.data import EOT, load_tokenizer

    if not src.is_dir():
        raise ConversionError(f"--tokenizer {src} is not a directory")
    files = [src / n for n in HF_TOKENIZER_FILES if (src / n).is_file()] + sorted(src.glob("*.tiktoken"))
    if not any(f.name in ("tokenizer.json", "vocab.json") or f.suffix == ".tiktoken" for f in files):
        if (src / "tokenizer.model").is_file():  # gptjax's own SentencePiece model, from a to-hf export
            files = [src / "tokenizer.model"]
        elif explicit:
            raise ConversionError(f"--tokenizer {src} holds no tokenizer.json, vocab.json + merges.txt or .tiktoken file")
        else:
            return [], None
    staged = Path(tempfile.mkdtemp(prefix="gptjax-tok-"))
    try:  # load from a copy of exactly the files we will copy, so the run directory gets a working set
        for f in files:
            shutil.copyfile(f, staged / f.name)
        tok = load_tokenizer(staged)
        if files[0].name == "tokenizer.model" and tok.token_id(EOT) != tok.eot_id:
            raise ConversionError(f"{src / 'tokenizer.model'} is not a gptjax tokenizer (it has no {EOT} piece); "
                                  f"pass --tokenizer DIR with GPT-2's tokenizer.json or vocab.json + merges.txt")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return files, tok


def convert_from_hf(hf_dir: str | Path, run_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                    force: bool = False, log=print) -> Path:
    """A Hugging Face GPT-2 directory -> a gptjax run directory that eval.py reads."""
    import dataclasses

    import jax

    from gptjax import config as config_lib
    from gptjax.checkpoint import Checkpoints

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    cfg, params = import_gpt2(hf_dir)  # everything is checked before anything is written
    files, tok = _tokenizer_source(Path(tokenizer_dir) if tokenizer_dir else hf_dir, tokenizer_dir is not None)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} "
                              f"embedding rows; use the tokenizer the model was trained with")
    _prepare_target(run_dir, force, RUN_FILES, "run", (hf_dir,) + ((Path(tokenizer_dir),) if tokenizer_dir else ()))

    train_cfg = dataclasses.replace(config_lib.TrainConfig(), model=cfg, preset="hf", run_dir=str(run_dir),
                                    batch_size=8, steps=1, sample_prompt="")
    train_cfg = config_lib.validate(train_cfg)
    cfg_dict = config_lib.to_dict(train_cfg)
    ckpts = Checkpoints(run_dir, async_save=False, log=log)
    ckpts.save_params(0, params, cfg_dict)  # numpy arrays: Orbax restores them onto any mesh
    ckpts.close()
    config_lib.save_json(train_cfg, run_dir / "config.json")
    for f in files:
        shutil.copyfile(f, run_dir / f.name)
    (run_dir / "hf.json").write_text(json.dumps(
        {"imported_from": str(hf_dir.absolute()), "tokenizer_from": str(files[0].parent.absolute()) if files else None,
         "tokenizer_files": [f.name for f in files]}, indent=2) + "\n")
    n = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
    log(f"imported {hf_dir}: GPT-2 with {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context "
        f"{cfg.block_size}, vocabulary {cfg.vocab_size} ({n / 1e6:.1f}M parameters incl. padding) -> {run_dir}")
    if tok is None:
        log(f"note: {hf_dir} has no tokenizer files; before eval.py can read text, copy tokenizer.json (or vocab.json "
            f"and merges.txt) into {run_dir}, or convert again with --tokenizer DIR --force")
    else:
        log(f"tokenizer: {', '.join(f.name for f in files)} ({tok.vocab_size} tokens, end-of-text id {tok.eot_id})")
    return run_dir


def convert_to_hf(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, force: bool = False,
                  log=print) -> Path:
    """A gptjax run directory (trained or converted) -> a Hugging Face GPT-2 directory."""
    import jax

    from gptjax import config as config_lib
    from gptjax.checkpoint import open_step
    from gptjax.data import load_tokenizer
    from gptjax.errors import DataError
    from gptjax.model import abstract_params

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    asked = step
    ckpts, step, stored = open_step(run_dir, step, log=log)
    cfg = config_lib.stored_train_config(stored).model
    hf_config(cfg)  # refuse a non-GPT-2 architecture before reading any weights

    dev = jax.devices()[0]
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(dev)),
                          abstract_params(cfg))
    step, state = ckpts.restore({"params": target}, asked, params_only=True)  # None: the latest readable one
    ckpts.close()
    params = jax.tree.map(np.asarray, state["params"])

    try:
        tok = load_tokenizer(run_dir)
    except DataError:
        tok = None
    _prepare_target(out_dir, force, EXPORT_FILES + ("tokenizer.model",), "output", (run_dir,))
    export_gpt2(cfg, params, out_dir, eot_id=None if tok is None else tok.eot_id)
    copied = [n for n in HF_TOKENIZER_FILES + ("tokenizer.model",) if (run_dir / n).is_file()]
    copied += [p.name for p in run_dir.glob("*.tiktoken")]
    for n in copied:
        shutil.copyfile(run_dir / n, out_dir / n)
    log(f"exported {run_dir} step {step} -> {out_dir} (config.json, model.safetensors"
        + "".join(f", {n}" for n in copied) + ")")
    if "tokenizer.model" in copied:
        log("note: tokenizer.model is gptjax's SentencePiece tokenizer; transformers' GPT-2 tokenizer classes cannot "
            "read it (load it with sentencepiece, or with gptjax.data.load_tokenizer)")
    elif not copied:
        log(f"note: {run_dir} has no tokenizer files to copy")
    return out_dir
