"""Training tokens/s of one model shape in PyTorch eager, torch.compile and gptjax, side by side in one process.

  python bench/compare_torch.py                                  # CPU, the shape of the throughput issue
  python bench/compare_torch.py --device cuda --bf16 --n-layer 12 --d-model 768 --n-head 12 --block 1024 --batch 8
  python bench/compare_torch.py --no-compile --json out.json     # skip torch.compile (slow to compile on CPU)

Same shape for all three: a GPT-2 block (pre-LN, causal attention, tanh GELU, tied embeddings, no dropout),
AdamW (b2 0.95, weight decay 0.1) with global-norm clipping at 1.0, random tokens. The frameworks take turns:
`--rounds` rounds of `--steps` timed steps each, after warm-up, so a noisy neighbour on a shared machine hits all
three alike; the median step of each is reported, with the ratios. Like the commands, it restarts itself once with
transparent huge pages for host memory (gptjax/hostmem.py), which both frameworks then share;
`GPTJAX_HUGE_PAGES=0 python bench/compare_torch.py` measures without. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time


def torch_model(args, device, dtype):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            D = args.d_model
            self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.c_fc, self.mlp_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, args.n_head, D // args.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, D))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(args.vocab, args.d_model)
            self.wpe = nn.Embedding(args.block, args.d_model)
            self.h = nn.ModuleList(Block() for _ in range(args.n_layer))
            self.ln_f = nn.LayerNorm(args.d_model)
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.h:
                x = b(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    model = GPT().to(device)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    return model, opt


def torch_runner(args, compiled: bool):
    import torch

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    model, opt = torch_model(args, device, dtype)
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator(device="cpu").manual_seed(0)

    def step():
        tok = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=g).to(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=args.bf16):
            loss = fwd(tok[:, :-1], tok[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def jax_runner(args):
    import jax
    import numpy as np

    from gptjax import config as config_lib
    from gptjax.sharding import make_mesh
    from gptjax.train.steps import make_train_steps

    overrides = [f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", f"model.n_head={args.n_head}",
                 f"model.block_size={args.block}", f"model.vocab_size={args.vocab}", f"batch_size={args.batch}",
                 "mesh.fsdp=1", f"model.dtype={'bfloat16' if args.bf16 else 'float32'}", "steps=100000",
                 "optim.warmup_steps=0"] + list(args.overrides)
    cfg = config_lib.resolve("tiny", overrides)
    trainer = make_train_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    state = {"s": trainer.init(jax.random.key(0))}

    def step():
        b = rng.integers(0, args.vocab, size=(1, args.batch, args.block + 1), dtype=np.int32)
        state["s"], m = trainer.step(state["s"], jax.device_put(b, trainer.batch_sharding))
        return float(m["loss"])  # blocks until the step is done

    return step, cfg


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (autocast in torch, model.dtype in gptjax)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation) per framework")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="gptjax config overrides")
    args = p.parse_args()
    if args.device == "cuda":
        import jax

        assert jax.default_backend() == "gpu", "--device cuda needs jax with CUDA"

    runners = {"torch_eager": torch_runner(args, compiled=False)}
    if not args.no_compile:
        runners["torch_compile"] = torch_runner(args, compiled=True)
    runners["gptjax"], cfg = jax_runner(args)
    compile_s = {}
    for name, step in runners.items():
        t = time.perf_counter()
        for _ in range(args.warmup):
            loss = step()
        compile_s[name] = round(time.perf_counter() - t, 2)
        assert math.isfinite(loss), (name, loss)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, step in runners.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.block
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    import torch

    res = {"shape": {k: getattr(args, k) for k in ("n_layer", "d_model", "n_head", "block", "vocab", "batch")},
           "device": args.device, "bf16": args.bf16, "machine": platform.processor() or platform.machine(),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge pages for both frameworks, or not
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "jax": __import__("jax").__version__, "gptjax_overrides": list(args.overrides),
           "attention_impl": cfg.model.attention_impl, "loss_chunk": getattr(cfg.model, "loss_chunk", None),
           "warmup_s": compile_s, "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
           "ratio_gptjax_over_torch_eager": round(tps["gptjax"] / tps["torch_eager"], 3)}
    if "torch_compile" in tps:
        res["ratio_gptjax_over_torch_compile"] = round(tps["gptjax"] / tps["torch_compile"], 3)
    for k, v in res.items():
        print(f"{k:>32}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    main()
