"""The training run: data, mesh, state, loop, checkpoints, metrics, final evaluation and a sample.

train.py parses the command line and calls `run(cfg)`; everything with side effects lives here, the
pure pieces in train_lib.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import distributed
from gptjax import flops as flops_lib
from gptjax.checkpoint import CheckpointError, Checkpoints, weights_only_message, weights_only_step
from gptjax.config import ConfigError, TrainConfig
from gptjax.evaluate import heldout
from gptjax.generate import sample
from gptjax.sharding import make_mesh
from gptjax.train_lib import check_batch_fits_mesh, make_trainer


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


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
    old = json.loads(path.read_text())
    new = config_lib.to_dict(cfg)
    model_diff = _changed_keys(old.get("model", {}), new["model"], "model.")
    # fields that change the computation but not the parameters are fine to change on resume
    harmless = ("model.scan_layers", "model.remat", "model.attention_impl", "model.dtype")
    model_diff = [d for d in model_diff if not d.startswith(harmless)]
    if model_diff:
        raise ConfigError(f"{run_dir} holds a run of a different model ({'; '.join(model_diff[:3])}); "
                          f"choose a new run_dir=... or delete that directory")
    other = [d for d in _changed_keys(old, new) if not d.startswith("model.")]
    if other:
        log(f"note: resuming {run_dir} with changed settings: {'; '.join(other[:6])}")


def batch_for_step(td: data_lib.TokenData, cfg: TrainConfig, step: int, sharding) -> jax.Array:
    """The global batch of `step`, [micro_batches, B / micro_batches, T+1] on `sharding`; this process
    reads only the rows its own devices hold (offsets depend on (seed, step) alone, so all agree)."""
    M, B, T = cfg.micro_batches, cfg.batch_size, cfg.model.block_size
    shape = (M, B // M, T + 1)
    rows = np.arange(B // M)[distributed.local_rows(sharding, shape, axis=1)]
    local = td.batch(cfg.seed, step, B, T, rows=(np.arange(M)[:, None] * (B // M) + rows).ravel())
    return jax.make_array_from_process_local_data(sharding, local.reshape(M, len(rows), T + 1), shape)


def run(cfg: TrainConfig, *, log=print) -> dict:
    """Train (or resume) `cfg`, evaluate on the held-out split and print a sample. Returns a summary."""
    main = distributed.is_main()  # every process computes; process 0 alone prints and writes the run files
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    imported = weights_only_step(run_dir)
    if imported is not None:  # before any data preparation: a converted run has no optimizer state to resume
        raise CheckpointError(weights_only_message(run_dir, imported))

    def prepare() -> Path:
        if main:  # the others wait for its verdict (and must not read config.json while it is rewritten)
            check_run_dir(cfg, run_dir, log)
        return data_lib.prepare(cfg.data, cfg.model.vocab_size, log=log)

    # Process 0 builds the token cache; the others then read it (or, without a shared disk, build their own).
    data_dir = distributed.process0_first(prepare, "prepare the run")
    td = data_lib.TokenData(data_dir)
    distributed.check_same(bytes.fromhex(td.manifest["tokenizer"]["sha256"]), f"the tokenizer in {data_dir}")
    if td.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer in {data_dir} has {td.tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; delete that cache directory or set model.vocab_size to match")
    if td.tokens("train") <= cfg.model.block_size:
        raise ConfigError(f"the training split has {td.tokens('train')} tokens, fewer than model.block_size="
                          f"{cfg.model.block_size}; add data or shorten the context")

    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        config_lib.save_json(cfg, run_dir / "config.json")
        shutil.copyfile(data_dir / "tokenizer.model", run_dir / "tokenizer.model")
        (run_dir / "data.json").write_text(json.dumps({"data_dir": str(data_dir.absolute())}, indent=2) + "\n")

    mesh = make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    trainer = make_trainer(cfg, mesh)
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    cfg_dict = config_lib.to_dict(cfg)

    counts = flops_lib.param_counts(cfg.model)
    log(f"model: {cfg.model.name}, {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M "
        f"non-embedding); mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
        f"({mesh.devices.size} x {jax.devices()[0].platform}); run dir {run_dir}")

    if ckpts.latest_step() is not None:
        start, state = ckpts.restore(trainer.abstract_state())
        log(f"resuming from checkpoint at step {start}")
    else:
        start, state = 0, trainer.init(jax.random.key(cfg.seed))

    peak = flops_lib.device_peak_flops()
    metrics_path = run_dir / "metrics.jsonl"
    torn = metrics_path.exists() and metrics_path.stat().st_size and not metrics_path.read_bytes().endswith(b"\n")
    metrics_file = open(metrics_path, "a") if main else open(os.devnull, "w")
    if torn and main:  # a kill cut the last line short: start ours on a fresh line
        metrics_file.write("\n")

    def write_metrics(rec: dict):
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    stop = {"signal": None}
    old_handler = None

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    def preempted(done: int) -> bool:
        """Whether to save and stop after step `done`. With several processes, all must agree (the save is
        collective) although each receives its own signal, possibly steps apart: they compare flags every
        log_every steps, at the same steps."""
        if jax.process_count() == 1:
            return bool(stop["signal"])
        if done % cfg.log_every:
            return False
        return bool(multihost_utils.process_allgather(np.int32(stop["signal"] is not None)).any())

    try:
        old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): no preemption hook
        pass

    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step", dynamic_ncols=True, disable=not main)
    pending = None  # (step, metrics on device, dispatch time): fetched after the next step is dispatched
    last = {"time": time.time(), "step": start}
    last_good = ckpts.latest_step()
    rates: list[float] = []

    def record(item) -> dict:
        step, metrics, _ = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            bar.close()
            where = f"the last good checkpoint (step {last_good}) in {ckpts.dir} is intact" if last_good is not None \
                else "no checkpoint had been saved yet"
            raise NonFiniteLoss(f"loss became {m['loss']} (grad norm {m['grad_norm']}) at step {step}; stopping. "
                                f"{where}. Lower optim.lr or raise optim.warmup_steps and resume.")
        now = time.time()
        steps_done = step - last["step"]
        tps = steps_done * cfg.tokens_per_step / max(now - last["time"], 1e-9) if steps_done else 0.0
        last.update(time=now, step=step)
        util = flops_lib.mfu(tps, cfg.model, mesh.devices.size, peak)
        rec = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": tps, "mfu": util, "time": now - t_start}
        write_metrics(rec)
        if step - steps_done > start:  # the first interval includes compilation
            rates.append(tps)
        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tps:,.0f}",
                        mfu="n/a" if util is None else f"{util:.1%}", refresh=False)
        return rec

    def save(step: int, *, force: bool = False):
        nonlocal last_good
        if not bool(trainer.all_finite(state["params"])):
            raise NonFiniteLoss(f"parameters became non-finite by step {step}; not saving them. The last good "
                                f"checkpoint (step {last_good}) in {ckpts.dir} is intact. Lower optim.lr and resume.")
        if ckpts.save(step, state, cfg_dict, force=force):
            last_good = step

    t_loop = time.time()
    try:
        for step in range(start, cfg.steps):
            batch = batch_for_step(td, cfg, step, trainer.batch_sharding)
            state, metrics = trainer.step(state, batch)
            done = step + 1
            if pending is not None:
                record(pending)
            pending = (done, metrics, time.time())
            bar.update(1)
            is_ckpt = done % cfg.checkpoint.every == 0 or done == cfg.steps
            stopping = preempted(done)
            if is_ckpt or stopping or (cfg.eval_every and done % cfg.eval_every == 0):
                rec = record(pending)  # checked finite before anything is saved
                pending = None
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    ev = heldout(trainer, state["params"], td, max_batches=cfg.eval_batches)
                    write_metrics({"step": done, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
                    if main:
                        bar.write(f"step {done}: train loss {rec['loss']:.4f}, val loss {ev['loss']:.4f}, "
                                  f"{ev['bits_per_byte']:.3f} bits/byte")
                    last["time"] = time.time()  # don't count evaluation in tokens/s
                if is_ckpt or stopping:
                    save(done, force=stopping)
                if stopping:
                    ckpts.wait()
                    bar.close()
                    raise Preempted(f"received signal {stop['signal'] or 'SIGTERM (on another process)'}: saved a "
                                    f"checkpoint at step {done} in "
                                    f"{ckpts.dir}; rerun the same command to resume")
        if pending is not None:
            record(pending)
        bar.close()
        ckpts.wait()
    finally:
        bar.close()
        metrics_file.flush()
        ckpts.wait()  # never exit with a good checkpoint half-written
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    train_time = time.time() - t_loop

    # Final evaluation, gzip baseline, and a sample.
    ev = heldout(trainer, state["params"], td)
    val_bytes = (data_dir / "val.txt").read_bytes()
    gz = data_lib.gzip_bits_per_byte(val_bytes)
    final_step = int(jax.device_get(state["step"]))
    write_metrics({"step": final_step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"],
                   "gzip_bits_per_byte": gz})
    log(f"held-out (step {final_step}): loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.2f}, "
        f"{ev['bits_per_byte']:.3f} bits/byte  |  gzip -9 on the same text: {gz:.3f} bits/byte")
    text = ""
    if cfg.sample_tokens > 0:
        tok = td.tokenizer
        new = sample(cfg.model, state["params"], tok.encode(cfg.sample_prompt), cfg.sample_tokens,
                     temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, stop_id=tok.eot_id)
        text = cfg.sample_prompt + tok.decode(new)
        log("sample:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    summary = {"step": final_step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
               "val_bits_per_byte": ev["bits_per_byte"], "gzip_bits_per_byte": gz,
               "train_seconds": train_time, "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(rates)) if rates else None,
               "parameters": counts, "sample": text}
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ckpts.close()
    metrics_file.close()
    return summary
