"""Native GPT-NeoX (DeepSpeed) checkpoints: reader (any TP degree, both layouts) and writer.

On disk (reference 2.3):

    SAVE/latest                                   "global_stepN"
    SAVE/global_stepN/layer_LL-model_TT-model_states.pt   pipeline layout, one per (layer LL, TP rank TT)
    SAVE/global_stepN/mp_rank_TT_model_states.pt          DeepSpeed client state (args, iteration);
                                                          in the sequential layout (pipe-parallel-size 0)
                                                          also sd["module"] = {"sequential.LL.<param>": ...}
    SAVE/global_stepN/configs/*.yml                       the run's GPT-NeoX YAML (merged in name order)

LL: 0 embedding (`word_embeddings.weight`), 2..L+1 transformer block LL-2, L+3 final norm
(`norm.*`), L+4 output layer (`final_linear.weight`, absent when embeddings are tied).

Tensor-parallel merge (reference 2.4), applied per tensor in torch layout, then mapping.py turns
the merged tensor into ours:

    column-parallel (qkv, dense_h_to_4h, word_embeddings, final_linear)   concatenate along dim 0
    row-parallel weights (attention.dense, dense_4h_to_h)                 concatenate along dim 1
    row-parallel biases (attention.dense.bias, dense_4h_to_h.bias)        SUM over ranks when
        gpt-j-residual (every rank adds its copy before the one all-reduce, reference 1.4);
        average (identical copies, added once after the reduce) otherwise
    LayerNorms                                                            average
    attention.rotary_emb.inv_freq                                         ignored (recomputed)

Sums and averages are computed in float64 and rounded once to the stored dtype, so identical
copies merge exactly.  The writer splits by the inverse rules; a parallel-residual row-parallel
bias b becomes TP identical copies of b/TP, as in real checkpoints, whenever that is exact (TP a
power of two and no fp16/bf16 underflow: the rank sum, which GPT-NeoX's forward pass and every
converter compute, then gives b back bit for bit); otherwise rank 0 gets b and the other ranks
(negative) zeros, which sums to b exactly in any dtype.  Layer files use the MLP names of the GPT-NeoX
they are for (`--neox-names`: current, or legacy v1.0/v2.0 with fresh `inv_freq` buffers, which the v1.0
converter copies); `mp_rank_TT` files get the `args` GPT-NeoX's `save_ds_checkpoint` writes.

Files are read with `torch.load(weights_only=True, mmap=True)`: pickles that would need arbitrary
classes are refused (numpy arrays, found in `np_rng_state`, are allow-listed data).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from ..config import ModelConfig, _yaml_problem, from_neox_yaml, load_yaml
from ..errors import CheckpointError, ConfigError
from .formats import Entry, NativeTensor, Reader, Writer, check_slice, numpy_to_torch, torch_dtype_np, torch_load, \
    torch_to_numpy
from .mapping import LAYER_MAP, our_entries, to_ours, torch_shape

log = logging.getLogger(__name__)

# our per-layer name -> (GPT-NeoX parameter suffix, TP kind)
NEOX_LAYER = {n: (suffix, kind) for n, (suffix, _, _), kind in zip(
    LAYER_MAP, LAYER_MAP.values(),
    ["norm", "norm", "norm", "norm", "col", "col", "row", "rowbias", "col", "col", "row", "rowbias"])}
assert NEOX_LAYER["attn/out/bias"] == ("attention.dense.bias", "rowbias")
assert NEOX_LAYER["mlp/fc_out/kernel"] == ("mlp.dense_4h_to_h.weight", "row")
# our global name -> (pipeline index given L, GPT-NeoX parameter name, TP kind)
NEOX_GLOBAL = {
    "embed_in/embedding": (lambda L: 0, "word_embeddings.weight", "col"),
    "final_ln/scale": (lambda L: L + 3, "norm.weight", "norm"),
    "final_ln/bias": (lambda L: L + 3, "norm.bias", "norm"),
    "embed_out/kernel": (lambda L: L + 4, "final_linear.weight", "col"),
}
# names used by GPT-NeoX since 2024 (#1212) for the same MLP parameters
NEW_NAMES = {"mlp.linear1.weight": "mlp.dense_h_to_4h.weight", "mlp.linear1.bias": "mlp.dense_h_to_4h.bias",
             "mlp.linear2.weight": "mlp.dense_4h_to_h.weight", "mlp.linear2.bias": "mlp.dense_4h_to_h.bias"}
IGNORED = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
# What the writer's layer files hold for each GPT-NeoX generation (`convert --neox-names`):
#   current  GPT-NeoX since #1212 (Sep 2024): mlp.linear1 / mlp.linear2, and no rotary inv_freq (a
#            non-persistent buffer since #1168, Mar 2024: a strict load refuses it as unexpected)
#   legacy   v1.0 / v2.0, the code Pythia and 20B were trained with: mlp.dense_h_to_4h /
#            mlp.dense_4h_to_h, and inv_freq in every layer file (a persistent buffer there)
NEOX_NAMES = ("current", "legacy")
_TO_CURRENT = {old: new for new, old in NEW_NAMES.items()}

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def layer_file(ll: int, rank: int) -> str:
    return f"layer_{ll:02d}-model_{rank:02d}-model_states.pt"


def mp_file(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def rank_shape(full: tuple[int, ...], kind: str, tp: int) -> tuple[int, ...]:
    if kind == "col":
        return (full[0] // tp,) + tuple(full[1:])
    if kind == "row":
        return (full[0], full[1] // tp)
    return tuple(full)


def merge(kind: str, parts: list[np.ndarray], parallel_residual: bool) -> np.ndarray:
    """Merge per-rank torch-layout tensors by the tensor-parallel rules (module docstring)."""
    if len(parts) == 1:
        return parts[0]
    if kind == "col":
        return np.concatenate(parts, axis=0)
    if kind == "row":
        return np.concatenate(parts, axis=1)
    dt = parts[0].dtype
    sum_ranks = kind == "rowbias" and parallel_residual
    if not sum_ranks and all(np.array_equal(p.view(np.uint8), parts[0].view(np.uint8)) for p in parts[1:]):
        return parts[0]  # identical copies (every real checkpoint's LayerNorms): exact, signs of zeros kept
    total = parts[0].astype(np.float64)
    for p in parts[1:]:  # not np.sum: its reduction starts at +0.0 and would turn -0.0 into +0.0
        total = total + p.astype(np.float64)
    return (total if sum_ranks else total / len(parts)).astype(dt)


def split(kind: str, full: np.ndarray, tp: int, parallel_residual: bool) -> list[np.ndarray]:
    """Inverse of `merge`: per-rank tensors, each owning its memory."""
    if tp == 1:
        return [np.ascontiguousarray(full)]
    if kind == "col":
        return [p.copy() for p in np.split(full, tp, axis=0)]
    if kind == "row":
        return [np.ascontiguousarray(p) for p in np.split(full, tp, axis=1)]
    if kind == "rowbias" and parallel_residual:
        share = (full.astype(np.float64) / tp).astype(full.dtype)
        if np.array_equal((share.astype(np.float64) * tp).astype(full.dtype).view(np.uint8), full.view(np.uint8)):
            return [share.copy() for _ in range(tp)]
        log.info("row-parallel bias not divisible by TP %d exactly in %s: whole bias on rank 0", tp, full.dtype)
        # x + (-0.0) == x bit for bit for every x (also -0.0 and +0.0), so the sum restores b exactly
        return [full.copy()] + [np.full_like(full, -0.0) for _ in range(tp - 1)]
    return [full.copy() for _ in range(tp)]


def inv_freq(cfg: ModelConfig, dtype) -> np.ndarray:
    R = cfg.rotary_dims
    return (1.0 / (cfg.rotary_emb_base ** (np.arange(0, R, 2, dtype=np.float32) / R))).astype(dtype)


# ----------------------------------------------------------------------------- reader


def find_step_dir(path: Path) -> Path:
    """SAVE (with `latest`), or a global_stepN directory itself."""
    if re.match(r"global_step\d+$", path.name) and path.is_dir():
        return path
    latest = path / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        step = path / tag
        if not step.is_dir():
            raise CheckpointError(f"{latest}: names {tag!r}, which is not a directory in {path}")
        return step
    steps = sorted((int(m.group(1)), c) for c in path.iterdir() if (m := re.match(r"global_step(\d+)$", c.name)))
    if len(steps) == 1:
        return steps[0][1]
    if steps:
        raise CheckpointError(f"{path}: no 'latest' file and several global_stepN directories; pass one of them")
    raise CheckpointError(f"{path}: no 'latest' file or global_stepN directory")


def read_neox_yaml(files: list[Path]) -> dict:
    raw: dict = {}
    for f in files:
        try:
            part = load_yaml(Path(f).read_text())
        except OSError as e:
            raise ConfigError(f"{f}: cannot read GPT-NeoX YAML ({e.strerror or e.__class__.__name__})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{f}: not valid GPT-NeoX YAML ({_yaml_problem(e)})") from None
        if isinstance(part, dict):
            raw.update(part)
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


class NeoxReader(Reader):
    fmt = "neox"

    def __init__(self, path: Path, config_files: list[str] | None = None):
        super().__init__(path)
        self.step_dir = find_step_dir(path)
        m = re.match(r"global_step(\d+)$", self.step_dir.name)
        self.extras["step"] = int(m.group(1)) if m else 0
        files = [Path(f) for f in config_files] if config_files else sorted(
            f for f in (self.step_dir / "configs").glob("*.y*ml") if f.suffix in (".yml", ".yaml"))
        if not files:
            raise CheckpointError(f"{self.step_dir / 'configs'}: no GPT-NeoX *.yml config "
                                  f"(pass the run's YAML with --neox-config)")
        self.config_files = files
        raw = read_neox_yaml(files)
        cfg = from_neox_yaml([str(f) for f in files])
        self.parallel = cfg.use_parallel_residual

        names = [p.name for p in self.step_dir.iterdir()]
        layer_files = [(int(m.group(1)), int(m.group(2))) for n in names if (m := _LAYER_FILE.match(n))]
        mp_files = sorted(int(m.group(1)) for n in names if (m := _MP_FILE.match(n)))
        if layer_files:
            self.layout = "pipeline"
            self.tp = 1 + max(r for ll, r in layer_files if ll == 0) if any(ll == 0 for ll, _ in layer_files) else 0
            if self.tp == 0:
                raise CheckpointError(f"{self.step_dir / layer_file(0, 0)}: missing (embedding layer file)")
        elif mp_files:
            self.layout = "sequential"
            self.tp = len(mp_files)
        else:
            raise CheckpointError(f"{self.step_dir}: no layer_XX-model_YY-model_states.pt or "
                                  f"mp_rank_XX_model_states.pt files")
        yml_tp = raw.get("model_parallel_size")
        if yml_tp and int(yml_tp) != self.tp:
            raise CheckpointError(f"{files[0]}: model-parallel-size {yml_tp} but the checkpoint has "
                                  f"{self.tp} tensor-parallel rank(s)")
        self._sd_cache: tuple[int, list[dict]] | None = None
        self._seq: list[dict] | None = None
        if self.layout == "sequential":
            self._seq = []
            for r in range(self.tp):
                f = self.step_dir / mp_file(r)
                if not f.exists():
                    raise CheckpointError(f"{f}: missing (tensor-parallel rank {r})")
                sd = torch_load(f)
                mod = sd.get("module") if isinstance(sd, dict) else None
                if not isinstance(mod, dict):
                    raise CheckpointError(f"{f}: no 'module' state dict (not a sequential-layout checkpoint)")
                self._seq.append(mod)

        # vocabulary: the embedding rows decide unless the YAML states padded-vocab-size
        emb = self._rank_tensors(0, "word_embeddings.weight")
        rows = int(emb[0].shape[0]) * self.tp
        if raw.get("padded_vocab_size"):
            if rows != cfg.vocab_size:
                raise CheckpointError(f"{self._file(0, 0)}: word_embeddings has {rows} rows over {self.tp} rank(s), "
                                      f"the config's padded-vocab-size is {cfg.vocab_size}")
        elif rows != cfg.vocab_size:
            log.info("%s: padded vocabulary %d taken from the embedding (YAML padding rule gave %d)",
                     self.step_dir, rows, cfg.vocab_size)
            cfg = cfg.replace(vocab_size=rows, tokenizer_vocab_size=min(cfg.tokenizer_vocab_size, rows))
        if self.layout == "pipeline":
            L = cfg.num_layers
            untied = L + 4
            if cfg.tie_word_embeddings and any(ll == untied for ll, _ in layer_files):
                raise CheckpointError(f"{self._file(untied, 0)}: present, but the config says the embeddings are "
                                      f"tied (no-weight-tying false)")
            extra = sorted({ll for ll, _ in layer_files} - set(self._expected_layer_indices(cfg)))
            if extra:
                raise CheckpointError(f"{self._file(extra[0], 0)}: the config has {L} layers, which have no "
                                      f"pipeline index {extra[0]}")
        self.config = cfg
        vocab_file = raw.get("vocab_file")
        if vocab_file and str(vocab_file).endswith(".json") and Path(vocab_file).is_file():
            self.extras["tokenizer_files"] = {"tokenizer.json": str(vocab_file)}
        self._entries = self._check()

    # -- files and keys
    def _expected_layer_indices(self, cfg: ModelConfig) -> list[int]:
        L = cfg.num_layers
        idx = [0] + [i + 2 for i in range(L)] + [L + 3]
        if not cfg.tie_word_embeddings:
            idx.append(L + 4)
        return idx

    def _file(self, ll: int, rank: int) -> Path:
        if self.layout == "pipeline":
            return self.step_dir / layer_file(ll, rank)
        return self.step_dir / mp_file(rank)

    def _layer_sds(self, ll: int) -> list[dict]:
        """Per-rank {param: tensor} of pipeline index ll (cached: one layer's files at a time)."""
        if self._seq is not None:
            prefix = f"sequential.{ll}."
            out = []
            for mod in self._seq:
                sd = {k[len(prefix):]: v for k, v in mod.items() if k.startswith(prefix)}
                out.append({NEW_NAMES.get(k, k): v for k, v in sd.items()})
            return out
        if self._sd_cache is not None and self._sd_cache[0] == ll:
            return self._sd_cache[1]
        self._sd_cache = None
        sds = []
        for r in range(self.tp):
            f = self._file(ll, r)
            if not f.exists():
                raise CheckpointError(f"{f}: missing (pipeline index {ll}, tensor-parallel rank {r})")
            sd = torch_load(f)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: not a state dict")
            sd = {NEW_NAMES.get(k, k): v for k, v in sd.items()}
            sds.append(sd)
        self._sd_cache = (ll, sds)
        return sds

    def _rank_tensors(self, ll: int, param: str) -> list:
        sds = self._layer_sds(ll)
        out = []
        for r, sd in enumerate(sds):
            if param not in sd:
                where = self._file(ll, r)
                key = param if self.layout == "pipeline" else f"sequential.{ll}.{param}"
                raise CheckpointError(f"{where}: tensor {key} is missing")
            out.append(sd[param])
        return out

    def _where(self, name: str, layer: int | None) -> tuple[int, str, str]:
        """(pipeline index, parameter name, TP kind) of one of our entries."""
        if layer is None:
            idx, param, kind = NEOX_GLOBAL[name]
            return idx(self.config_L), param, kind
        suffix, kind = NEOX_LAYER[name[len("layers/"):]]
        return layer + 2, suffix, kind

    def _check(self) -> list[Entry]:
        cfg = self.config
        self.config_L = cfg.num_layers
        entries = []
        by_ll: dict[int, list[Entry]] = {}
        for e in our_entries(cfg):
            by_ll.setdefault(self._where(e.name, e.layer)[0], []).append(e)
        for ll in self._expected_layer_indices(cfg):
            sds = self._layer_sds(ll)
            wanted = {self._where(e.name, e.layer)[1] for e in by_ll[ll]}
            for r, sd in enumerate(sds):
                for k in sd:
                    if k not in wanted and not k.endswith(IGNORED):
                        key = k if self.layout == "pipeline" else f"sequential.{ll}.{k}"
                        raise CheckpointError(f"{self._file(ll, r)}: unexpected tensor {key} (not a "
                                              f"Pythia-era GPT-NeoX parameter for pipeline index {ll})")
            for e in by_ll[ll]:
                _, param, kind = self._where(e.name, e.layer)
                want = rank_shape(torch_shape(e.name, cfg), kind, self.tp)
                dts = set()
                for r, t in enumerate(self._rank_tensors(ll, param)):
                    if tuple(t.shape) != want:
                        key = param if self.layout == "pipeline" else f"sequential.{ll}.{param}"
                        raise CheckpointError(f"{self._file(ll, r)}: tensor {key} has shape {tuple(t.shape)}, "
                                              f"the config with TP={self.tp} implies {want}")
                    dts.add(torch_dtype_np(t))
                if len(dts) != 1:
                    raise CheckpointError(f"{self._file(ll, 0)}: {param} has different dtypes across ranks {dts}")
                entries.append(e.with_dtype(dts.pop()))
        self._sd_cache = None
        order = {(e.name, e.layer): i for i, e in enumerate(our_entries(cfg))}
        return sorted(entries, key=lambda e: order[(e.name, e.layer)])

    # -- data
    def entries(self) -> list[Entry]:
        return list(self._entries)

    def read(self, entry: Entry) -> np.ndarray:
        out = to_ours(entry.name, self.read_torch(entry), self.config)
        check_slice(entry, out, str(self.step_dir))
        return out

    def read_torch(self, entry: Entry) -> np.ndarray:
        """The tensor merged over TP ranks, torch (HF) layout."""
        ll, param, kind = self._where(entry.name, entry.layer)
        parts = [torch_to_numpy(t) for t in self._rank_tensors(ll, param)]
        return merge(kind, parts, self.parallel)

    def native_tensors(self) -> Iterator[NativeTensor]:
        if self.layout == "pipeline":
            files = sorted(p for p in self.step_dir.iterdir() if _LAYER_FILE.match(p.name))
            for f in files:
                sd = torch_load(f)
                for k in sorted(sd):
                    t = sd[k]
                    yield f"{f.stem}/{k}", tuple(t.shape), torch_dtype_np(t), (lambda t=t: torch_to_numpy(t))
                del sd
        else:
            for r, mod in enumerate(self._seq or []):
                for k in sorted(mod, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
                    t = mod[k]
                    yield f"{mp_file(r)[:-3]}/{k}", tuple(t.shape), torch_dtype_np(t), (lambda t=t: torch_to_numpy(t))

    def describe(self) -> str:
        return f"GPT-NeoX {self.layout} checkpoint {self.step_dir} (TP={self.tp})"

    def close(self) -> None:
        self._sd_cache = None
        self._seq = None


# ----------------------------------------------------------------------------- writer


def vocab_divisor(cfg: ModelConfig, tp: int, tokenizer_size: int | None = None) -> int:
    """make-vocab-size-divisible-by that makes GPT-NeoX's padding rule, ceil(tokenizer size / (m*TP))
    * m*TP, give exactly cfg.vocab_size (else the v1.0 / HEAD converters assert on the embedding rows).

    With a known tokenizer size the usual 128 (or a smaller power of two) is kept when it works;
    otherwise m = V/TP, which gives V for any tokenizer of at most V ids (tools/merge20b.py does
    the same)."""
    V = cfg.vocab_size
    tok = tokenizer_size or cfg.tokenizer_vocab_size
    if tok and tok <= V:
        for m in (128, 64, 32, 16, 8):
            if math.ceil(tok / (m * tp)) * m * tp == V:
                return m
    return V // tp


def tokenizer_size(path: str | None) -> int | None:
    """Vocabulary size GPT-NeoX's HFTokenizer reports for a tokenizers JSON (added tokens included)."""
    if not path:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # a tokenizer file we cannot parse: fall back to the safe divisor
        log.warning("%s: cannot read the tokenizer (%s); using make-vocab-size-divisible-by = V/TP", path, e)
        return None


def neox_yaml(cfg: ModelConfig, tp: int, dtype: str, vocab_file: str | None, tok_size: int | None = None) -> dict:
    """The GPT-NeoX YAML our writer puts in global_stepN/configs/ (keys GPT-NeoX's converters read)."""
    d: dict[str, Any] = {
        "num-layers": cfg.num_layers,
        "hidden-size": cfg.hidden_size,
        "num-attention-heads": cfg.num_heads,
        "seq-length": cfg.max_position_embeddings,
        "max-position-embeddings": cfg.max_position_embeddings,
        "pos-emb": "rotary",
        "rotary-pct": cfg.rotary_pct,
        # an int where it is one: GPT-NeoX declares rotary_emb_base an int, and its YAML type check
        # fails on 10000.0 (found running GPT-NeoX's own loader on our output)
        "rotary-emb-base": int(cfg.rotary_emb_base) if float(cfg.rotary_emb_base).is_integer() else cfg.rotary_emb_base,
        "norm": "layernorm",
        "layernorm-epsilon": cfg.layer_norm_eps,
        "gpt-j-residual": cfg.use_parallel_residual,
        "gpt-j-tied": False,
        "no-weight-tying": not cfg.tie_word_embeddings,
        "activation": "gelu",
        "bias-gelu-fusion": cfg.hidden_act == "gelu_tanh",
        "output-layer-parallelism": "column",
        "attention-config": [[["global"], cfg.num_layers]],
        "init_method": "small_init" if cfg.init == "small_wang" else "normal",
        "output_layer_init_method": "wang_init" if cfg.init == "small_wang" else "scaled_normal",
        "init-method-std": cfg.init_std,
        "model-parallel-size": tp,
        "pipe-parallel-size": 1,
        "make-vocab-size-divisible-by": vocab_divisor(cfg, tp, tok_size),
        "padded-vocab-size": cfg.vocab_size,
        "tokenizer-type": "HFTokenizer",
        "vocab-file": vocab_file,
    }
    if cfg.intermediate_size != 4 * cfg.hidden_size:
        d["intermediate-size"] = cfg.intermediate_size
    if dtype == "float16":
        d["fp16"] = {"enabled": True}
    elif dtype == "bfloat16":
        d["bf16"] = {"enabled": True}
    d["precision"] = {"float16": "fp16", "bfloat16": "bfloat16", "float32": "fp32"}[dtype]
    return d


class NeoxWriter(Writer):
    fmt = "neox"
    layout = "torch"

    def __init__(self, tmp: Path, cfg: ModelConfig, entries: list[Entry], *, tp: int = 1, step: int = 0,
                 final_dst: Path | None = None, extras: dict | None = None, names: str = "current"):
        if names not in NEOX_NAMES:
            raise CheckpointError(f"--neox-names {names!r}: expected one of {NEOX_NAMES}")
        self.names = names
        N, F, V = cfg.num_heads, cfg.intermediate_size, cfg.vocab_size
        for what, n in (("num_heads", N), ("intermediate_size", F), ("vocab_size", V)):
            if n % tp:
                raise CheckpointError(f"--tp {tp} does not divide {what} {n}")
        self.tmp, self.cfg, self.tp, self.step = tmp, cfg, tp, step
        self.extras = extras or {}
        self.final_dst = Path(final_dst or tmp).resolve()
        self.tag = f"global_step{step}"
        self.dir = tmp / self.tag
        self.dir.mkdir(parents=True)
        self.L = cfg.num_layers
        self.expected: dict[int, int] = {}  # pipeline index -> number of tensors to come
        self.dtype_of: dict[int, np.dtype] = {}
        for e in entries:
            ll = self._where(e)[0]
            self.expected[ll] = self.expected.get(ll, 0) + 1
            self.dtype_of.setdefault(ll, np.dtype(e.dtype))
        self.buf: dict[int, list[dict]] = {}
        dts = {np.dtype(e.dtype).name for e in entries}
        self.dtype = dts.pop() if len(dts) == 1 else "float32"

    def _where(self, e: Entry) -> tuple[int, str, str]:
        if e.layer is None:
            idx, param, kind = NEOX_GLOBAL[e.name]
            return idx(self.L), param, kind
        suffix, kind = NEOX_LAYER[e.name[len("layers/"):]]
        return e.layer + 2, suffix, kind

    def write(self, entry: Entry, array: np.ndarray) -> None:
        """array: torch layout, merged over ranks (HF key's shape); split here into TP shards."""
        ll, param, kind = self._where(entry)
        want = torch_shape(entry.name, self.cfg)
        if tuple(array.shape) != want:
            raise CheckpointError(f"neox writer: tensor {entry.label} came as {tuple(array.shape)}, expected {want}")
        parts = split(kind, array, self.tp, self.cfg.use_parallel_residual)
        ranks = self.buf.setdefault(ll, [{} for _ in range(self.tp)])
        for r, p in enumerate(parts):
            ranks[r][param] = numpy_to_torch(p)
        if len(ranks[0]) == self.expected[ll]:
            self._flush(ll)

    def _flush(self, ll: int) -> None:
        import torch

        ranks = self.buf.pop(ll)
        if 2 <= ll <= self.L + 1 and self.names == "legacy":
            freq = numpy_to_torch(inv_freq(self.cfg, self.dtype_of[ll]))
            for sd in ranks:
                sd["attention.rotary_emb.inv_freq"] = freq.clone()
        for r, sd in enumerate(ranks):
            order = [p for p, _ in NEOX_LAYER.values()] + ["attention.rotary_emb.inv_freq"]
            ordered = {k: sd[k] for k in sorted(sd, key=lambda k: order.index(k) if k in order else -1)}
            if self.names == "current":
                ordered = {_TO_CURRENT.get(k, k): v for k, v in ordered.items()}
            torch.save(ordered, self.dir / layer_file(ll, r))
        self.expected.pop(ll)

    def finish(self) -> None:
        import torch

        if self.expected:
            ll = sorted(self.expected)[0]
            raise CheckpointError(f"neox writer: pipeline index {ll} never received all its tensors")
        tok = (self.extras.get("tokenizer_files") or {}).get("tokenizer.json")
        vocab_file = None
        if tok:
            shutil.copy2(tok, self.tmp / "tokenizer.json")
            vocab_file = str(self.final_dst / "tokenizer.json")
        else:
            log.warning("no tokenizer.json in the source: set vocab-file in %s/configs/neox_jax.yml before "
                        "running GPT-NeoX's tools on it", self.tag)
        y = neox_yaml(self.cfg, self.tp, self.dtype, vocab_file, tokenizer_size(tok))
        (self.dir / "configs").mkdir()
        (self.dir / "configs" / "neox_jax.yml").write_text(
            "# written by neox-jax convert (GPT-NeoX YAML; keys read by tools/ckpts/convert_neox_to_hf.py)\n"
            + yaml.safe_dump(y, sort_keys=False))
        args = {
            "num_layers": self.cfg.num_layers, "hidden_size": self.cfg.hidden_size,
            "num_attention_heads": self.cfg.num_heads, "max_position_embeddings": self.cfg.max_position_embeddings,
            "make_vocab_size_divisible_by": y["make-vocab-size-divisible-by"],
            "padded_vocab_size": self.cfg.vocab_size, "tokenizer_type": "HFTokenizer", "model_parallel_size": self.tp,
        }
        for r in range(self.tp):
            state = {
                "module": None, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                "sparse_tensor_module_names": [], "skipped_steps": 0, "global_steps": self.step,
                "global_samples": 0, "dp_world_size": 1, "mp_world_size": self.tp,
                "iteration": self.step, "args": dict(args),
            }
            torch.save(state, self.dir / mp_file(r))
        (self.tmp / "latest").write_text(self.tag)
