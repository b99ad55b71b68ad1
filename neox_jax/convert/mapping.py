"""Name and layout mapping between our parameter tree and PyTorch GPT-NeoX state dicts.

One table serves Hugging Face (`gpt_neox.layers.{i}.<suffix>`) and native GPT-NeoX layer files
(`<suffix>` inside `layer_{i+2:02d}-model_XX-model_states.pt`): per-layer suffixes are the same.
Torch `Linear.weight` is [out, in]; our kernels are [in, ..., out] (see neox_jax/model.py).

QKV (reference 2.2): torch rows are ordered (head, part, head_dim) with part in q, k, v, i.e.
W_qkv.reshape(N, 3, H, D).  Ours is kernel [D, 3, N, H] and bias [3, N, H].
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..config import ModelConfig
from ..tree import flatten, unflatten
from .formats import Entry

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


# ----------------------------------------------------------------------------- per-tensor layout


def hf_name(entry_name: str, layer: int | None) -> str:
    if layer is None:
        return HF_GLOBAL_MAP[entry_name][0]
    return hf_layer_key(layer, LAYER_MAP[entry_name[len("layers/"):]][0])


def _transforms(entry_name: str):
    """(torch -> ours, ours -> torch) for one of our flat names."""
    if entry_name.startswith("layers/"):
        _, fwd, back = LAYER_MAP[entry_name[len("layers/"):]]
    else:
        _, fwd, back = HF_GLOBAL_MAP[entry_name]
    return fwd, back


def to_ours(entry_name: str, torch_layout: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _transforms(entry_name)[0](torch_layout, cfg)


def to_torch(entry_name: str, ours: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _transforms(entry_name)[1](ours, cfg)


def torch_shape(entry_name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the torch (HF / merged NeoX) tensor for one of our flat names."""
    D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    table = {
        "embed_in/embedding": (V, D), "embed_out/kernel": (V, D), "final_ln/scale": (D,), "final_ln/bias": (D,),
        "layers/ln_attn/scale": (D,), "layers/ln_attn/bias": (D,),
        "layers/ln_mlp/scale": (D,), "layers/ln_mlp/bias": (D,),
        "layers/attn/qkv/kernel": (3 * D, D), "layers/attn/qkv/bias": (3 * D,),
        "layers/attn/out/kernel": (D, D), "layers/attn/out/bias": (D,),
        "layers/mlp/fc_in/kernel": (F, D), "layers/mlp/fc_in/bias": (F,),
        "layers/mlp/fc_out/kernel": (D, F), "layers/mlp/fc_out/bias": (D,),
    }
    return table[entry_name]


def our_entries(cfg: ModelConfig, dtype: Any = np.float32) -> list[Entry]:
    """Every (name, layer) slice of our parameter tree for cfg, layer-major (the natural HF order)."""
    D, V, N, H, F = cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    layer_shapes = {
        "ln_attn/scale": (D,), "ln_attn/bias": (D,), "ln_mlp/scale": (D,), "ln_mlp/bias": (D,),
        "attn/qkv/kernel": (D, 3, N, H), "attn/qkv/bias": (3, N, H),
        "attn/out/kernel": (N, H, D), "attn/out/bias": (D,),
        "mlp/fc_in/kernel": (D, F), "mlp/fc_in/bias": (F,),
        "mlp/fc_out/kernel": (F, D), "mlp/fc_out/bias": (D,),
    }
    assert set(layer_shapes) == set(LAYER_MAP)
    dt = np.dtype(dtype)
    out = [Entry("embed_in/embedding", None, (V, D), dt)]
    for i in range(cfg.num_layers):
        out += [Entry(f"layers/{n}", i, layer_shapes[n], dt) for n in LAYER_MAP]
    out += [Entry("final_ln/scale", None, (D,), dt), Entry("final_ln/bias", None, (D,), dt)]
    if not cfg.tie_word_embeddings:
        out.append(Entry("embed_out/kernel", None, (D, V), dt))
    assert {e.name for e in out} - {"embed_out/kernel"} <= set(HF_GLOBAL_MAP) | {f"layers/{n}" for n in LAYER_MAP}
    return out


def leaf_shapes(entries: list[Entry], cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Our flat leaf name -> (full shape, dtype); stacked leaves get the leading L axis.

    A stacked leaf whose layers came in different dtypes gets the promoted dtype."""
    leaves: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for e in entries:
        shape = e.shape if e.layer is None else (cfg.num_layers,) + tuple(e.shape)
        if e.name in leaves:
            dt = np.promote_types(leaves[e.name][1], e.dtype)
            leaves[e.name] = (shape, dt)
        else:
            leaves[e.name] = (shape, np.dtype(e.dtype))
    return leaves
