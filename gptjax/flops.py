"""Parameter counts, FLOPs per token, device peak FLOP/s and MFU."""

from __future__ import annotations

import math

import jax

from gptjax.config import ModelConfig
from gptjax.model import abstract_params


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters (as allocated, padded vocabulary included) and non-embedding parameters
    (total minus the token and position embeddings, as Kaplan et al. count N)."""
    ab = abstract_params(cfg)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(ab))
    embedding = math.prod(ab["wte"]["embedding"].shape) + math.prod(ab["wpe"]["embedding"].shape)
    return {"total": total, "non_embedding": total - embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs per token, attention and the output layer included.

    Forward: 2 FLOPs per multiply-add over every non-embedding weight matrix, plus the output layer
    (2 * D * V, tied weights still cost a matmul), plus attention scores and weighted values
    (2 * 2 * T * D per layer, full T x T as the kernels compute it). Training is 3x forward."""
    D, F, L, V = cfg.d_model, cfg.ff_dim, cfg.n_layer, cfg.padded_vocab
    per_layer = 2 * (D * 3 * D + D * D + 2 * D * F)
    fwd = L * per_layer + attention_flops_per_token(cfg, seq_len) + 2 * D * V
    return float(3 * fwd if training else fwd)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of attention scores and weighted values, all layers (a band of w keys costs w)."""
    T = seq_len or cfg.block_size
    spans = (min(T, cfg.local_window) if kind == "banded" else T
             for kind in cfg.attention_pattern * (cfg.n_layer // len(cfg.attention_pattern)))
    return float(sum(2 * 2 * span * cfg.d_model for span in spans))


# Dense bf16 peak FLOP/s per chip (no sparsity), matched against device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12), matched first below
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


# Memory per chip (HBM) in GiB, matched the same way.
HBM_GIB = {
    "H200": 141, "H100": 80, "H100 PCIe": 80, "A100": 80, "L4": 24, "A10G": 24,
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32, "TPU v6e": 32,
}


def _lookup(table: dict, device) -> float | None:
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name in sorted(table, key=len, reverse=True):  # most specific name first
        if name.lower() in kind.lower():
            return table[name]
    return None


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPUs)."""
    return _lookup(PEAK_FLOPS, device or jax.devices()[0])


def device_memory_gib(device: jax.Device | None = None) -> float | None:
    """HBM of one device in GiB, or None where unknown (CPUs)."""
    return _lookup(HBM_GIB, device or jax.devices()[0])


def mfu(tokens_per_s: float, cfg: ModelConfig, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token(cfg) / (peak * n_devices)
