"""`neox-jax inspect CKPT` and `neox-jax diff A B`, for any of the three formats.

inspect: the config, the parameter count, and for every tensor *as stored* (HF keys, native
`layer_LL-model_TT/<param>` per rank, or our stacked leaves) its shape, dtype, L2 norm and the
sha256 of its bytes (C order, stored dtype, little-endian): equal hashes mean equal tensors, across
files, formats with the same layout, and machines.

diff: both checkpoints are mapped to our names and layout (TP shards merged), then compared tensor
by tensor (per layer for stacked tensors): relative L2 difference ||A-B|| / ||A||, max |A-B|, and
a status: identical (same dtype, same bits), equal (same values, different dtype), close
(relative difference <= --rtol), DIFFERENT, or a missing / shape mismatch.  Exit status 0 when
everything is identical, equal or close, 1 otherwise (2 for unreadable input).  This is how to
find duplicated or mislabelled checkpoints (e.g. Pythia step branches serving final weights).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from .. import atomic
from ..errors import UserError
from .dispatch import open_reader
from .formats import Entry, Reader, dtype_name, human_bytes


CHUNK = 1 << 22  # elements per float64 pass: bounded memory however big the tensor


def _parts(loaded) -> list[np.ndarray] | Any:
    return [loaded] if isinstance(loaded, np.ndarray) else loaded


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def tensor_stats(loaded, *, hash_bytes: bool = True) -> tuple[float, str | None]:
    """(L2 norm, sha256 hex) of an array or of consecutive C-order parts of one."""
    h = hashlib.sha256() if hash_bytes else None
    sq = 0.0
    for part in _parts(loaded):
        flat = np.ascontiguousarray(part).reshape(-1)
        if h is not None:
            h.update(memoryview(flat.view(np.uint8)))
        for i in range(0, flat.size, CHUNK):
            x = flat[i:i + CHUNK].astype(np.float64)
            sq += float(np.dot(x, x))
    return math.sqrt(sq), (h.hexdigest() if h is not None else None)


def inspect_checkpoint(path: str, *, hashes: bool = True, neox_config: list[str] | None = None) -> dict:
    with open_reader(path, neox_config=neox_config) as r:
        cfg = r.config
        tensors = []
        for name, shape, dt, load in r.native_tensors():
            norm, sha = tensor_stats(load(), hash_bytes=hashes)
            tensors.append({"name": name, "shape": list(shape), "dtype": dtype_name(dt), "norm": norm,
                            "sha256": sha, "bytes": int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize})
        info: dict[str, Any] = {
            # (a path whose bytes are not UTF-8 is shown escaped, `\xff`: printing its surrogates failed)
            "format": r.fmt, "path": atomic.shown(r.path), "description": atomic.shown(r.describe()),
            "config": cfg.arch_dict() | {"max_position_embeddings": cfg.max_position_embeddings,
                                         "tokenizer_vocab_size": cfg.tokenizer_vocab_size},
            "num_params": cfg.num_params(),
            "stored_elements": int(sum(np.prod(t["shape"], dtype=np.int64) for t in tensors)),
            "stored_bytes": int(sum(t["bytes"] for t in tensors)),
            "dtypes": sorted({t["dtype"] for t in tensors}),
            "tensors": tensors,
        }
        if r.fmt == "neox":
            from .zero import optimizer_files, optimizer_ranks

            zero = optimizer_files(r.step_dir)
            info["neox"] = {"layout": r.layout, "tp": r.tp, "step_dir": str(r.step_dir),
                            "config_files": [str(f) for f in r.config_files],
                            "optimizer_files": len(zero),
                            "optimizer_ranks": list(optimizer_ranks(zero)) if zero else None}
    return info


def format_inspect(info: dict) -> str:
    c = info["config"]
    lines = [
        info["description"],
        f"  layers {c['num_layers']}  hidden {c['hidden_size']}  heads {c['num_heads']}  ffn {c['intermediate_size']}"
        f"  vocab {c['vocab_size']} (tokenizer {c['tokenizer_vocab_size'] or '?'})  context {c['max_position_embeddings']}",
        f"  rotary_pct {c['rotary_pct']}  rotary_base {c['rotary_emb_base']:g}  ln_eps {c['layer_norm_eps']:g}"
        f"  parallel_residual {c['use_parallel_residual']}  tied {c['tie_word_embeddings']}  act {c['hidden_act']}",
        f"  parameters {info['num_params']:,}   stored tensors {len(info['tensors'])}, "
        f"{info['stored_elements']:,} elements, {human_bytes(info['stored_bytes'])}, dtypes {', '.join(info['dtypes'])}",
    ]
    if "neox" in info:
        nx = info["neox"]
        lines.append(f"  optimizer state: {nx['optimizer_files']} ZeRO files (data-parallel {nx['optimizer_ranks'][0]} "
                     f"x model ranks {nx['optimizer_ranks'][1]}): train.init_from_neox continues this run"
                     if nx["optimizer_files"] else "  optimizer state: none (no zero_pp_rank_* files): weights only")
    lines.append("")
    w = max([len(t["name"]) for t in info["tensors"]] + [4])
    lines.append(f"{'name':<{w}}  {'shape':<22}{'dtype':<10}{'norm':>14}  sha256 (first 16; --json has all)")
    for t in info["tensors"]:
        sha = (t["sha256"] or "-")[:16]
        lines.append(f"{t['name']:<{w}}  {str(tuple(t['shape'])):<22}{t['dtype']:<10}{t['norm']:>14.6g}  {sha}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- diff

OK_STATUSES = ("identical", "equal", "close")


class _Acc:
    def __init__(self):
        self.sq_d = self.sq_a = 0.0
        self.max_abs = 0.0
        self.identical = True
        self.equal = True
        self.problem: str | None = None
        self.n = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.n += 1
        same_dtype = a.dtype == b.dtype
        self.identical &= same_dtype
        fa, fb = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
        for i in range(0, fa.size, CHUNK):
            x, y = fa[i:i + CHUNK], fb[i:i + CHUNK]
            if self.identical and not np.array_equal(_bits(x), _bits(y)):
                self.identical = False
            x, y = x.astype(np.float64), y.astype(np.float64)
            d = x - y
            self.sq_d += float(np.dot(d, d))
            self.sq_a += float(np.dot(x, x))
            if d.size:
                m = float(np.max(np.abs(d)))
                self.max_abs = max(self.max_abs, m) if not math.isnan(m) else math.nan
            if self.equal and not np.array_equal(x, y):
                self.equal = False

    def row(self, name: str, rtol: float) -> dict:
        rel = math.sqrt(self.sq_d) / math.sqrt(self.sq_a) if self.sq_a > 0 else (0.0 if self.sq_d == 0 else math.inf)
        if self.problem:
            status = self.problem
        elif self.identical:
            status = "identical"
        elif self.equal:
            status = "equal"
        elif rel <= rtol:
            status = "close"
        else:
            status = "DIFFERENT"
        return {"name": name, "rel_l2": rel, "max_abs": self.max_abs, "status": status}


def _order(ra: Reader, rb: Reader) -> list[Entry]:
    """Compare in the order of the reader that cannot seek cheaply (an Orbax leaf read whole)."""
    ea, eb = ra.entries(), rb.entries()
    return eb if _layer_major(ea) and not _layer_major(eb) else ea


def _layer_major(entries: list[Entry]) -> bool:
    layers = [e.layer for e in entries if e.layer is not None]
    return layers == sorted(layers)


def diff_checkpoints(a: str, b: str, *, rtol: float = 0.0, per_layer: bool = False,
                     neox_config_a: list[str] | None = None, neox_config_b: list[str] | None = None) -> dict:
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise UserError(f"--rtol {rtol}: must be a finite number >= 0")
    with open_reader(a, neox_config=neox_config_a) as ra, open_reader(b, neox_config=neox_config_b) as rb:
        arch_a, arch_b = ra.config.arch_dict(), rb.config.arch_dict()
        config_diff = {k: [arch_a[k], arch_b[k]] for k in arch_a if arch_a[k] != arch_b[k]}
        ea = {(e.name, e.layer): e for e in ra.entries()}
        eb = {(e.name, e.layer): e for e in rb.entries()}
        order = [(e.name, e.layer) for e in _order(ra, rb)]
        order += [k for k in eb if k not in ea]
        torch_layout = ra.fmt != "orbax" and rb.fmt != "orbax"  # the statistics do not depend on the layout
        accs: dict[str, _Acc] = {}
        layer_rows = []
        for key in order:
            name, layer = key
            acc = accs.setdefault(name, _Acc())
            if key not in eb:
                acc.problem = "missing in B"
                continue
            if key not in ea:
                acc.problem = "missing in A"
                continue
            if tuple(ea[key].shape) != tuple(eb[key].shape):
                acc.problem = f"shape {tuple(ea[key].shape)} vs {tuple(eb[key].shape)}"
                continue
            if torch_layout:  # HF and NeoX store torch layout: compare as stored, no transposes
                x, y = ra.read_torch(ea[key]), rb.read_torch(eb[key])
            else:
                x, y = ra.read(ea[key]), rb.read(eb[key])
            acc.add(x, y)
            if per_layer and layer is not None:
                la = _Acc()
                la.add(x, y)
                layer_rows.append(la.row(f"{name}[{layer}]", rtol))
        rows = [accs[n].row(n, rtol) for n in dict.fromkeys(k[0] for k in order)]
        if per_layer:
            rows = rows + layer_rows
        summary_rows = [r for r in rows if "[" not in r["name"]]
        match = all(r["status"] in OK_STATUSES for r in summary_rows)
        counts: dict[str, int] = {}
        for r in summary_rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {"a": ra.describe(), "b": rb.describe(), "rtol": rtol, "config_diff": config_diff,
                "tensors": rows, "counts": counts, "match": match}


def format_diff(res: dict) -> str:
    lines = [f"A: {res['a']}", f"B: {res['b']}"]
    for k, (va, vb) in res["config_diff"].items():
        lines.append(f"  config {k}: {va} vs {vb}")
    w = max([len(r["name"]) for r in res["tensors"]] + [4])
    lines.append(f"{'tensor':<{w}}  {'rel L2':>11}  {'max |d|':>11}  status")
    for r in res["tensors"]:
        lines.append(f"{r['name']:<{w}}  {r['rel_l2']:>11.4g}  {r['max_abs']:>11.4g}  {r['status']}")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(res["counts"].items()))
    verdict = "MATCH" if res["match"] else "DIFFER"
    lines.append(f"{verdict} within rtol {res['rtol']:g}: {counts}")
    return "\n".join(lines)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=float)
