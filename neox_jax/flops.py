"""Model FLOPs and MFU (MaxText's convention, causal attention counted once).

Per token, with D hidden, F MLP width, L layers, V padded vocab, S sequence length:

    N_matmul   = L * (4 D^2 + 2 D F) + D V          weights that take part in a matmul
                 (QKV 3D^2 + attention out D^2 + MLP 2DF per layer, and the LM head; the input
                 embedding is a gather and biases/LayerNorms are negligible, so neither counts)
    attention  = 2 * L * S * D  forward              QK^T and PV: 2 matmuls x 2 flops x S keys x D,
                                                     halved because the mask is causal
    forward    = 2 * N_matmul + 2 L S D
    training   = 3 * forward = 6 * N_matmul + 6 L S D   (backward = 2 x forward)

MFU = achieved model FLOPs / peak FLOPs.  Rematerialisation is not counted (that would be HFU).
"""

from __future__ import annotations

from .config import ModelConfig

# Dense bf16 peak FLOP/s per chip (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    return L * (4 * D * D + 2 * D * F) + D * V


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward causal attention FLOPs per token."""
    return 2 * cfg.num_layers * seq_len * cfg.hidden_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 3 * forward_flops_per_token(cfg, seq_len)


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_second: float, num_chips: int, chip: str = "h100") -> float:
    """Model FLOPs utilisation of a training run (fraction of peak)."""
    if chip not in PEAK_FLOPS:
        raise ValueError(f"unknown chip {chip!r}; known: {sorted(PEAK_FLOPS)}")
    return train_flops_per_token(cfg, seq_len) * tokens_per_second / (num_chips * PEAK_FLOPS[chip])
