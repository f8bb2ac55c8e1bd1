"""Pretraining: language modelling on a corpus, as one client of the training loop (loop.py).

train.py parses the command line and calls `pretrain(cfg)`. This module gathers what the stage needs: the
run directory (locked, checked against what it already holds), the token cache (tokenized with the run's
own tokenizer), the mesh and the jitted steps (steps.py), the starting state (fresh, or a parent's weights
with init_from), and after the loop the held-out evaluation, the gzip baseline and a sample.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import distributed
from gptjax import flops as flops_lib
from gptjax.checkpoint import Checkpoints, weights_only_message, weights_only_step
from gptjax.config import TrainConfig
from gptjax.data.tokenizers import Tokenizer, open_tokenizer
from gptjax.errors import CheckpointError, ConfigError, DataError
from gptjax.eval.scoring import heldout
from gptjax.generate import sample
from gptjax.sharding import make_mesh
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking
from gptjax.train.steps import check_batch_fits_mesh, make_train_steps


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_run_dir(cfg: TrainConfig, run_dir: Path, log=print) -> None:
    """Resuming into a run directory that holds another model is an error; other changes are noted."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    raw = config_lib.read_config(path, f"run_dir={run_dir}")
    if raw.get("stage", "pretrain") != "pretrain":
        raise ConfigError(f"{run_dir} holds a {raw['stage']} run; train into a new run_dir=...")
    old = {k: v for k, v in raw.items() if k not in config_lib.RECORD_KEYS}
    new = config_lib.to_dict(cfg)
    model_diff = _changed_keys(old.get("model", {}), new["model"], "model.")
    # fields that change the computation but not the parameters are fine to change on resume
    harmless = ("model.scan_layers", "model.remat", "model.attention_impl", "model.dtype", "model.loss_chunk")
    model_diff = [d for d in model_diff if not d.startswith(harmless)]
    if model_diff:
        raise ConfigError(f"{run_dir} holds a run of a different model ({'; '.join(model_diff[:3])}); "
                          f"choose a new run_dir=... or delete that directory")
    if _has_checkpoint(run_dir) and old.get("init_from", "") != new["init_from"]:
        raise ConfigError(f"{run_dir} holds a run started from init_from={old.get('init_from') or '(nothing)'!s}, not "
                          f"{new['init_from'] or '(nothing)'}; rerun it as it was, or train into a new run_dir=...")
    other = [d for d in _changed_keys(old, new) if not d.startswith("model.")]
    if other:
        log(f"note: resuming {run_dir} with changed settings: {'; '.join(other[:6])}")


def batch_for_step(td: data_lib.TokenData | data_lib.Mixture, cfg: TrainConfig, step: int, sharding) -> jax.Array:
    """The global batch of `step`, [micro_batches, B / micro_batches, T+1] on `sharding`; this process
    reads only the rows its own devices hold (offsets depend on (seed, step) alone, so all agree)."""
    M, B, T = cfg.micro_batches, cfg.batch_size, cfg.model.block_size
    shape = (M, B // M, T + 1)
    rows = np.arange(B // M)[distributed.local_rows(sharding, shape, axis=1)]
    local = td.batch(cfg.seed, step, B, T, rows=(np.arange(M)[:, None] * (B // M) + rows).ravel(),
                     sampling=cfg.data.sampling)
    return jax.make_array_from_process_local_data(sharding, local.reshape(M, len(rows), T + 1), shape)


def _has_checkpoint(run_dir: Path) -> bool:
    from gptjax.checkpoint import complete_steps

    return bool(complete_steps(run_dir / "checkpoints"))


def _supplied_tokenizer(cfg: TrainConfig, run_dir: Path) -> Tokenizer | None:
    """The tokenizer named by data.tokenizer, opened (None: the run trains its own on its corpus, or takes its
    parent's). A resumed run must find the very tokenizer it was trained with: its run directory holds a copy."""
    resuming = not cfg.init_from and _has_checkpoint(run_dir)
    if not cfg.data.tokenizer:
        if resuming and not (run_dir / "tokenizer.model").is_file():
            try:
                own = data_lib.load_tokenizer(run_dir)
            except DataError:  # no copy here to compare with; _prepare_data and check_run_dir judge the rest
                return None
            path = run_dir / "config.json"
            raw = config_lib.read_config(path, f"run_dir={run_dir}") if path.is_file() else {}
            was = (raw.get("data") or {}).get("tokenizer")
            raise DataError(f"{run_dir} was trained with the tokenizer data.tokenizer={was or '?'} (its copy: "
                            f"{', '.join(Path(f).name for f in own.files)}), not one trained on the corpus; its "
                            f"checkpoints are untouched. Resume with data.tokenizer={was or 'PATH'} again, or train "
                            f"into a new run_dir=...")
        return None
    if cfg.init_from:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} cannot be used with init_from={cfg.init_from}: a run "
                          f"started from a parent's weights tokenizes its corpus with the parent's tokenizer (its "
                          f"embedding rows are that tokenizer's); drop data.tokenizer")
    tok = open_tokenizer(cfg.data.tokenizer)
    if resuming:
        try:
            own = data_lib.load_tokenizer(run_dir)
        except DataError:
            own = None
        if own is not None:
            was, now = data_lib.fingerprint(own.files), data_lib.fingerprint(tok.files)
            if was != now:
                raise DataError(f"{run_dir} was trained with another tokenizer than data.tokenizer="
                                f"{cfg.data.tokenizer} (tokenizer {was[:12]} -> {now[:12]}: its copy in the run "
                                f"directory, {', '.join(Path(f).name for f in own.files)}, differs); its checkpoints "
                                f"are untouched. Point data.tokenizer at the tokenizer it was trained with, train "
                                f"into a new run_dir=..., or continue these weights with init_from={run_dir} "
                                f"run_dir=NEW_DIR (in this run's own tokenizer)")
    return tok


def _vocab_follows(cfg: TrainConfig, tok: Tokenizer, log) -> TrainConfig:
    """With a supplied tokenizer the model's vocabulary is the tokenizer's (its embedding rows padded up to
    model.vocab_multiple), whatever the preset said; the run's config.json records the resolved size."""
    if tok.vocab_size == cfg.model.vocab_size:
        return cfg
    model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    log(f"data: model.vocab_size {cfg.model.vocab_size} -> {tok.vocab_size} (the tokenizer's; embedding rows padded "
        f"to {model.padded_vocab})")
    return dataclasses.replace(cfg, model=model)


def _prepare_data(cfg: TrainConfig, run_dir: Path, parent: lineage_lib.Parent | None, supplied: Tokenizer | None,
                  log) -> dict:
    """The token cache of the run's corpus in the run's own tokenizer, as data.json records it: {"data_dir"}, and
    for a mixture {"data_dir" (its first source's), "mixture": [{"name", "weight", "data_dir"}...]}. A fresh run
    trains a tokenizer on its corpus, takes the one data.tokenizer names (`supplied`, already checked against a
    resumed run's copy), or takes its parent's; a resumed run must find the tokenizer it was trained with, or is
    refused."""
    resuming = _has_checkpoint(run_dir)
    tok = supplied
    if tok is None and cfg.init_from:
        tok = data_lib.load_tokenizer(run_dir) if resuming else parent.tokenizer
    if cfg.data.mixture:
        entries = data_lib.prepare_mixture(cfg.data, cfg.model.vocab_size, tokenizer=tok, log=log)
        handle = {"data_dir": entries[0]["data_dir"], "mixture": entries}
    else:
        handle = {"data_dir": str(data_lib.prepare(cfg.data, cfg.model.vocab_size, tokenizer=tok, log=log).absolute())}
    if tok is None and resuming and (run_dir / "tokenizer.model").is_file():
        own = data_lib.fingerprint([run_dir / "tokenizer.model"])
        now = json.loads((Path(handle["data_dir"]) / "manifest.json").read_text())["tokenizer"]["sha256"]
        if own != now:
            raise DataError(f"{run_dir} was trained with another tokenizer than its corpus now produces (tokenizer "
                            f"{own[:12]} -> {now[:12]}: the corpus changed under this run_dir); its checkpoints are "
                            f"untouched. Restore the corpus, train into a new run_dir=..., or continue these weights "
                            f"on the new corpus with init_from={run_dir} run_dir=NEW_DIR")
    return handle


def _open_data(handle: dict) -> data_lib.TokenData | data_lib.Mixture:
    return data_lib.Mixture(handle["mixture"]) if "mixture" in handle else data_lib.TokenData(handle["data_dir"])


def _on_this_host(handle: dict) -> bool:
    """Whether every token cache process 0 prepared is readable here (a shared disk)."""
    dirs = [handle["data_dir"]] + [e["data_dir"] for e in handle.get("mixture", [])]
    return all((Path(d) / "manifest.json").is_file() for d in dirs)


def pretrain(cfg: TrainConfig, *, log=print) -> dict:
    """Train (or resume) `cfg`, evaluate on the held-out split and print a sample. Returns a summary."""
    main = distributed.is_main()  # every process computes; process 0 alone prints and writes the run files
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)  # a missing tracker package, before any data is prepared
    imported = weights_only_step(run_dir)
    if imported is not None:  # before any data preparation: a converted run has no optimizer state to resume
        raise CheckpointError(weights_only_message(run_dir, imported))
    # Process 0 takes the run directory's lock (the processes of one job share it); the others wait for it.
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _pretrain(cfg, run_dir, main, t_start, log)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(cfg: TrainConfig, run_dir: Path, main: bool, t_start: float, log) -> dict:
    # a supplied tokenizer fixes the model's vocabulary: resolved first, so the run directory is checked
    # against (and records) the model that is built
    supplied = _supplied_tokenizer(cfg, run_dir)
    if supplied is not None:
        cfg = _vocab_follows(cfg, supplied, log)
    # a child being resumed needs nothing of its parent (which may have moved): its own files say it all
    parent = lineage_lib.open_parent(cfg.init_from, log=log) if cfg.init_from and not _has_checkpoint(run_dir) else None

    def prepare() -> str:
        if main:  # the others wait for its verdict (and must not read config.json while it is rewritten)
            check_run_dir(cfg, run_dir, log)
        return json.dumps(_prepare_data(cfg, run_dir, parent, supplied, log))

    def reuse(prepared: str) -> str:  # on a shared disk the others never read the corpus
        return prepared if _on_this_host(json.loads(prepared)) else prepare()

    # Process 0 builds the token cache; the others then read it (or, without a shared disk, build their own).
    handle = json.loads(distributed.process0_first(prepare, "prepare the run", others=reuse))
    data_dir = Path(handle["data_dir"])
    td = _open_data(handle)
    distributed.check_same(bytes.fromhex(td.manifest["tokenizer"]["sha256"]), f"the tokenizer in {data_dir}")
    # a tokenizer trained here (for the corpus or a mixture) or supplied sets the vocabulary exactly; a parent's may
    # have fewer tokens than the model has rows
    exact = not cfg.init_from
    if td.tokenizer.vocab_size > cfg.model.vocab_size or (exact and td.tokenizer.vocab_size != cfg.model.vocab_size):
        fix = ("the model's vocabulary follows data.tokenizer, so that cache holds another tokenizer's tokens: "
               "delete that cache directory" if supplied is not None else
               "delete that cache directory or set model.vocab_size to match")
        raise ConfigError(f"the tokenizer in {data_dir} has {td.tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; {fix}")
    if td.tokens("train") <= cfg.model.block_size:
        raise ConfigError(f"the training split has {td.tokens('train')} tokens, fewer than model.block_size="
                          f"{cfg.model.block_size}; add data or shorten the context")

    mesh = make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    steps = make_train_steps(cfg, mesh)
    resuming = _has_checkpoint(run_dir)
    run_lineage = lineage_lib.read_lineage(run_dir) if resuming else []
    start_params = None
    if parent is not None and not resuming:
        start_params = lineage_lib.restore_params(parent, steps.abstract_state()["params"], log=log)
        run_lineage = lineage_lib.lineage(parent, lineage_lib.params_fingerprint(start_params))

    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        config_lib.save_json(cfg, run_dir / "config.json", **({"lineage": run_lineage} if run_lineage else {}))
        data_lib.install(td.tokenizer, run_dir)  # the run's own copy of its tokenizer
        config_lib.write_json(run_dir / "data.json", handle)

    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    cfg_dict = {**config_lib.to_dict(cfg), **({"lineage": run_lineage} if run_lineage else {})}

    counts = flops_lib.param_counts(cfg.model)
    log(f"model: {cfg.model.name}, {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M "
        f"non-embedding); mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
        f"({mesh.devices.size} x {jax.devices()[0].platform}); run dir {run_dir}")

    peak = flops_lib.device_peak_flops()
    metrics = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, cfg_dict)

    def per_source(params, max_batches: int = 0) -> dict:
        """A mixture's held-out loss on each source's own split (beside the overall one, over all of them)."""
        out = {}
        for name, part in zip(getattr(td, "names", []), getattr(td, "parts", [])):
            ev = heldout(steps, params, part, max_batches=max_batches)
            out |= {f"val_loss/{name}": ev["loss"], f"val_bits_per_byte/{name}": ev["bits_per_byte"]}
        return out

    def evaluate(state) -> tuple[dict, str]:
        ev = heldout(steps, state["params"], td, max_batches=cfg.eval_batches)
        return ({"val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"],
                 **per_source(state["params"], cfg.eval_batches)},
                f"val loss {ev['loss']:.4f}, {ev['bits_per_byte']:.3f} bits/byte")

    def fresh_state():
        if start_params is None:
            return steps.init(jax.random.key(cfg.seed))
        return steps.start_from(start_params)

    def on_fresh_start(state):
        if parent is None:
            return
        ev = heldout(steps, state["params"], td)  # the parent's weights on this corpus, before any update
        metrics.write({"step": 0, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
        log(f"init_from {parent.run_dir} step {parent.step} (parameters {run_lineage[0]['params_fingerprint']}): "
            f"held-out loss {ev['loss']:.4f} nats/token, {ev['bits_per_byte']:.3f} bits/byte at step 0")

    stage = loop.Stage(steps=cfg.steps, step_fn=steps.step,
                       batch=lambda step: batch_for_step(td, cfg, step, steps.batch_sharding),
                       all_finite=steps.all_finite, tokens_per_step=cfg.tokens_per_step, log_every=cfg.log_every,
                       checkpoint_every=cfg.checkpoint.every, eval_every=cfg.eval_every, evaluate=evaluate,
                       mfu=lambda tps: flops_lib.mfu(tps, cfg.model, mesh.devices.size, peak), config=cfg_dict,
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics, fresh_state=fresh_state, abstract_state=steps.abstract_state,
                          on_fresh_start=on_fresh_start, main=main, log=log)
    except BaseException:
        metrics.close()
        raise
    state = result.state

    # Final evaluation, gzip baseline, and a sample.
    ev = heldout(steps, state["params"], td)
    sources = per_source(state["params"])
    val_bytes = b"\n".join((p.path / "val.txt").read_bytes() for p in getattr(td, "parts", [td]))
    gz = data_lib.gzip_bits_per_byte(val_bytes)
    final_step = int(jax.device_get(state["step"]))
    metrics.write({"step": final_step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"],
                   "gzip_bits_per_byte": gz, **sources})
    for name in getattr(td, "names", []):
        log(f"held-out on '{name}': loss {sources[f'val_loss/{name}']:.4f} nats/token, "
            f"{sources[f'val_bits_per_byte/{name}']:.3f} bits/byte")
    log(f"held-out (step {final_step}): loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.2f}, "
        f"{ev['bits_per_byte']:.3f} bits/byte  |  gzip -9 on the same text: {gz:.3f} bits/byte")
    text = ""
    if cfg.sample_tokens > 0:
        tok = td.tokenizer
        new = sample(cfg.model, state["params"], tok.encode(cfg.sample_prompt) or [tok.eot_id], cfg.sample_tokens,
                     temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, stop_id=tok.eot_id)
        text = cfg.sample_prompt + tok.decode(new)
        log("sample:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    rates = result.tokens_per_s
    summary = {"step": final_step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
               "val_bits_per_byte": ev["bits_per_byte"], "gzip_bits_per_byte": gz,
               "train_seconds": result.train_seconds, "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(rates)) if rates else None,
               "parameters": counts, "sample": text, **sources}
    if run_lineage:
        summary["lineage"] = run_lineage
    if main:
        config_lib.write_json(run_dir / "summary.json", summary)
    ckpts.close()
    metrics.close()
    return summary
