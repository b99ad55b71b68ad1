"""Weight-only int8 for decoding: each matmul weight stored as int8 with a float32 scale per output
channel, dequantized inside the jitted program (`generate --int8`).

    scale = max |w| over the contraction dims / 127        (1 where a channel is all zero)
    q     = round(w / scale), in [-127, 127]               w ~ q * scale, |error| <= scale / 2

Quantized: the attention QKV and output projections, the two MLP matrices and the untied vocab head
(`embed_out`); the embedding table (a gather), LayerNorms and biases stay as loaded.  Memory: the
quantized matrices take a quarter of their float32 bytes (half of bf16), which is what decoding reads
per token.  Whether XLA fuses the dequantization into the matmul (so the int8 bytes are all that
moves) is the backend's choice; on CPU it does not, so there it saves memory, not time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from .sharding import fit_spec
from .tree import flatten, unflatten

# our flat name -> contraction dims of one layer's kernel (the stacked layer axis excluded)
CONTRACT = {"layers/attn/qkv/kernel": (0,), "layers/attn/out/kernel": (0, 1), "layers/mlp/fc_in/kernel": (0,),
            "layers/mlp/fc_out/kernel": (0,), "embed_out/kernel": (0,)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8:
    """w ~ q * scale: q int8 of w's shape, scale float32 with w's shape but 1 on the contraction dims."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequant(self, dtype) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)


def weight(w: Any, dtype) -> jax.Array:
    """A matmul weight in `dtype`: cast, or dequantized when it is `Int8`."""
    return w.dequant(dtype) if isinstance(w, Int8) else w.astype(dtype)


def quantize(w: jax.Array, axes: tuple[int, ...]) -> Int8:
    """Symmetric int8 with one float32 scale per slice over `axes` (the contraction dims)."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8(q, scale)


def _axes(name: str) -> tuple[int, ...]:
    dims = CONTRACT[name]
    return tuple(d + 1 for d in dims) if name.startswith("layers/") else dims


def quantize_params(params: dict) -> dict:
    """The parameter tree with every weight in CONTRACT replaced by its `Int8`."""
    flat = flatten(params)
    return unflatten({k: (quantize(v, _axes(k)) if k in CONTRACT else v) for k, v in flat.items()})


def quantized_shardings(shardings: dict, abstract: dict) -> dict:
    """Shardings for `quantize_params`'s output: q as its weight; scale as its weight minus the
    contraction dims (size 1: replicated there)."""
    flat = flatten(shardings)
    shapes = flatten(jax.eval_shape(quantize_params, abstract))
    out = {}
    for k, s in flat.items():
        if k in CONTRACT and isinstance(s, NamedSharding):
            scale_shape = shapes[k].scale.shape
            out[k] = Int8(s, NamedSharding(s.mesh, fit_spec(s.spec, scale_shape, s.mesh.shape)))
        else:
            out[k] = s
    return unflatten(out)


def nbytes(params: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
