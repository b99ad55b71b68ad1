"""Nested parameter dicts <-> flat '/'-joined names, and parameter counts (no jax import needed)."""

from __future__ import annotations

from typing import Any

import numpy as np

Params = dict[str, Any]


def flatten(tree: Params, sep: str = "/") -> dict[str, Any]:
    """{'layers': {'attn': {'qkv': {'kernel': x}}}} -> {'layers/attn/qkv/kernel': x}."""
    out: dict[str, Any] = {}

    def rec(prefix, node):
        if isinstance(node, dict):
            for k in sorted(node):
                rec(f"{prefix}{sep}{k}" if prefix else str(k), node[k])
        else:
            out[prefix] = node

    rec("", tree)
    return out


def unflatten(flat: dict[str, Any], sep: str = "/") -> Params:
    tree: Params = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def count_params(tree: Params) -> int:
    return int(sum(np.prod(x.shape) for x in flatten(tree).values()))
