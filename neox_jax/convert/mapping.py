"""Name and layout mapping between our parameter tree and PyTorch GPT-NeoX state dicts.

One table serves Hugging Face (`gpt_neox.layers.{i}.<suffix>`) and native GPT-NeoX layer files
(`<suffix>` inside `layer_{i+2:02d}-model_XX-model_states.pt`): per-layer suffixes are the same.
Torch `Linear.weight` is [out, in]; our kernels are [in, ..., out] (see neox_jax/model.py).

QKV (reference 2.2): torch rows are ordered (head, part, head_dim) with part in q, k, v, i.e.
W_qkv.reshape(N, 3, H, D).  Ours is kernel [D, 3, N, H] and bias [3, N, H].
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..config import ModelConfig

Array = np.ndarray


def transpose2d(w: Array) -> Array:
    """`np.ascontiguousarray(w.T)` for a 2-D array, 2-4x faster on big matrices: numpy's transposing
    copy walks one side with a large stride; copying strips of 16 rows x 1024 columns stays in cache
    (the converter moves whole checkpoints through this)."""
    R, C = w.shape
    if R * C < 1 << 16:
        return np.ascontiguousarray(w.T)
    out = np.empty((C, R), w.dtype)
    for i in range(0, R, 16):
        src, dst = w[i:i + 16], out[:, i:i + 16]
        for j in range(0, C, 1024):
            dst[j:j + 1024] = src[:, j:j + 1024].T
    return out


def _t(w: Array) -> Array:
    return transpose2d(w)


def _qkv_w_in(w: Array, cfg: ModelConfig) -> Array:  # [3D', D] -> [D, 3, N, H]
    N, H = cfg.num_heads, cfg.head_dim
    D = w.shape[-1]
    rows = np.ascontiguousarray(w.reshape(N, 3, H, D).transpose(1, 0, 2, 3))  # (N,3,H) -> (3,N,H) rows
    return transpose2d(rows.reshape(3 * N * H, D)).reshape(D, 3, N, H)


def _qkv_w_out(k: Array, cfg: ModelConfig) -> Array:  # [D, 3, N, H] -> [3D', D]
    D, _, N, H = k.shape
    rows = transpose2d(k.reshape(D, 3 * N * H)).reshape(3, N, H, D)
    return np.ascontiguousarray(rows.transpose(1, 0, 2, 3)).reshape(-1, D)


def _qkv_b_in(b: Array, cfg: ModelConfig) -> Array:  # [3D'] -> [3, N, H]
    return np.ascontiguousarray(b.reshape(cfg.num_heads, 3, cfg.head_dim).transpose(1, 0, 2))


def _qkv_b_out(b: Array, cfg: ModelConfig) -> Array:  # [3, N, H] -> [3D']
    return np.ascontiguousarray(b.transpose(1, 0, 2).reshape(-1))


def _dense_w_in(w: Array, cfg: ModelConfig) -> Array:  # [D, N*H] (out, in) -> [N, H, D]
    return transpose2d(w).reshape(cfg.num_heads, cfg.head_dim, -1)


def _dense_w_out(k: Array, cfg: ModelConfig) -> Array:  # [N, H, D] -> [D, N*H]
    return transpose2d(k.reshape(-1, k.shape[-1]))


def _same(x: Array, cfg: ModelConfig) -> Array:
    return x


def _trans(x: Array, cfg: ModelConfig) -> Array:
    return _t(x)


Transform = Callable[[Array, ModelConfig], Array]

# our per-layer name (under layers/) -> (torch suffix, torch->ours, ours->torch)
LAYER_MAP: dict[str, tuple[str, Transform, Transform]] = {
    "ln_attn/scale": ("input_layernorm.weight", _same, _same),
    "ln_attn/bias": ("input_layernorm.bias", _same, _same),
    "ln_mlp/scale": ("post_attention_layernorm.weight", _same, _same),
    "ln_mlp/bias": ("post_attention_layernorm.bias", _same, _same),
    "attn/qkv/kernel": ("attention.query_key_value.weight", _qkv_w_in, _qkv_w_out),
    "attn/qkv/bias": ("attention.query_key_value.bias", _qkv_b_in, _qkv_b_out),
    "attn/out/kernel": ("attention.dense.weight", _dense_w_in, _dense_w_out),
    "attn/out/bias": ("attention.dense.bias", _same, _same),
    "mlp/fc_in/kernel": ("mlp.dense_h_to_4h.weight", _trans, _trans),
    "mlp/fc_in/bias": ("mlp.dense_h_to_4h.bias", _same, _same),
    "mlp/fc_out/kernel": ("mlp.dense_4h_to_h.weight", _trans, _trans),
    "mlp/fc_out/bias": ("mlp.dense_4h_to_h.bias", _same, _same),
}

# our global name -> (HF key, torch->ours, ours->torch)
HF_GLOBAL_MAP: dict[str, tuple[str, Transform, Transform]] = {
    "embed_in/embedding": ("gpt_neox.embed_in.weight", _same, _same),
    "final_ln/scale": ("gpt_neox.final_layer_norm.weight", _same, _same),
    "final_ln/bias": ("gpt_neox.final_layer_norm.bias", _same, _same),
    "embed_out/kernel": ("embed_out.weight", _trans, _trans),
}

# HF buffers that older checkpoints carry; recomputed, never loaded (reference 6.10).
HF_IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def hf_layer_key(i: int, suffix: str) -> str:
    return f"gpt_neox.layers.{i}.{suffix}"


def hf_keys(cfg: ModelConfig) -> list[str]:
    """Every tensor key of an HF GPTNeoXForCausalLM checkpoint for this config."""
    keys = [k for name, (k, _, _) in HF_GLOBAL_MAP.items()
            if not (name == "embed_out/kernel" and cfg.tie_word_embeddings)]
    keys += [hf_layer_key(i, s) for i in range(cfg.num_layers) for s, _, _ in LAYER_MAP.values()]
    return keys


def params_from_hf(cfg: ModelConfig, sd: Mapping[str, Array]) -> dict:
    """In-memory HF state dict (numpy arrays) -> our nested parameter dict (layers stacked)."""
    from ..model import unflatten

    flat = {}
    for name, (key, fwd, _) in HF_GLOBAL_MAP.items():
        if name == "embed_out/kernel" and cfg.tie_word_embeddings:
            continue
        if key not in sd and key == "embed_out.weight" and "lm_head.weight" in sd:
            key = "lm_head.weight"  # transformers 5 in-memory name; files keep embed_out.weight
        flat[name] = fwd(np.asarray(sd[key]), cfg)
    for name, (suffix, fwd, _) in LAYER_MAP.items():
        flat[f"layers/{name}"] = np.stack(
            [fwd(np.asarray(sd[hf_layer_key(i, suffix)]), cfg) for i in range(cfg.num_layers)]
        )
    return unflatten(flat)


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, Array]:
    """Our nested parameter dict -> HF state dict of numpy arrays."""
    from ..model import flatten

    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    sd = {}
    for name, (key, _, back) in HF_GLOBAL_MAP.items():
        if name in flat:
            sd[key] = back(flat[name], cfg)
    for name, (suffix, _, back) in LAYER_MAP.items():
        stacked = flat[f"layers/{name}"]
        for i in range(cfg.num_layers):
            sd[hf_layer_key(i, suffix)] = back(stacked[i], cfg)
    return sd
