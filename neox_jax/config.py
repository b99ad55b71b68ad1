"""Model configuration: one frozen, validated dataclass, YAML presets, HF and GPT-NeoX config I/O.

`ModelConfig` holds the architecture (what a checkpoint's tensors mean) and the numerics (how
the forward pass is computed).  Only the architecture fields decide whether a checkpoint fits a
config; `ARCH_FIELDS` lists them.

Three readers produce a `ModelConfig`:
  * `load_config(path)`: our YAML presets (`configs/*.yaml`, section `model:`) and checkpoint
    `config.json` files.
  * `from_hf_config(dict)`: a Hugging Face `config.json` (old `rotary_pct`/`rotary_emb_base` keys
    or the transformers-5 `rope_parameters` form).
  * `from_neox_yaml(path_or_dict)`: GPT-NeoX's own YAML (`configs/20B.yml`, `configs/pythia/*.yml`).

Every reader refuses keys it does not know (our formats) or keys that would change the math but
that we do not implement (foreign formats), naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .values import CHECKS, Fields

log = logging.getLogger(__name__)

HIDDEN_ACTS = ("gelu", "gelu_tanh")  # exact erf GELU (HF Pythia configs) / tanh approximation (NeoX training)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the one list of dtype names (model.DTYPES, convert --dtype)
RUN_DTYPES = ("float32", "bfloat16")  # what score / generate / eval compute in
ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_attn", "save_proj")
BIAS_GRADS = ("fused", "separate")
INIT_SCHEMES = ("small_wang", "normal")

# HF `hidden_act` spellings -> ours.
_HF_ACTS = {
    "gelu": "gelu",
    "gelu_fast": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def _yaml_problem(e: Exception) -> str:
    """One line for a YAML error: 'line L, column C: problem'."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e.__class__.__name__)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last one,
    silently: `lr: 1e-3` ... `lr: 1e-4` trained at 1e-4).  Merge keys (`<<: *base`) may still be
    overridden, as YAML means them to be."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {first + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, loader: type = UniqueKeyLoader):
    """`text` parsed by `loader` (default `UniqueKeyLoader`); the project's one way to read YAML."""
    return yaml.load(text, Loader=loader)


def _read_text(p: Path) -> str:
    """A config file's text; one that is not UTF-8 is refused naming the file (OSError passes)."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- architecture (decides the parameter tree) ---
    vocab_size: int  # padded vocabulary (rows of embed_in / embed_out), e.g. 50304
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int = 0  # 0 means 4 * hidden_size (every NeoX/Pythia model)
    max_position_embeddings: int = 2048  # context length used for windowed scoring
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embedding
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: sequential
    tie_word_embeddings: bool = False  # NeoX/Pythia: untied
    hidden_act: str = "gelu_tanh"  # "gelu" (erf) or "gelu_tanh"; NeoX trained with tanh
    tokenizer_vocab_size: int = 0  # real tokenizer size (50277) for sampling masks; 0 = vocab_size

    # --- numerics and execution (do not change the parameter tree) ---
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    rotary_dtype: str = "float32"  # float16/bfloat16 reproduce NeoX-era low-precision rotary tables
    attention: str = "xla"  # "xla" everywhere, "cudnn" on NVIDIA GPUs
    scan_layers: bool = True  # lax.scan over stacked layers (compile time independent of depth)
    remat: str = "none"  # none | full | dots (save matmul outputs) | dots_attn (dots + cuDNN attention) | save_proj
    fp32_allreduce: bool = False  # weight/bias gradients leave their matmuls in float32, so data-parallel
    #                               reduction and accumulation run in float32 (GPT-NeoX fp32_allreduce)
    bias_grad: str = "fused"  # fused: XLA sums a dense layer's bias gradient inside the kernel that makes the
    #                           output gradient (GELU / rotary backward); separate: that gradient is written
    #                           first and summed in float32 by a reduction of its own (model.dense)
    init: str = "small_wang"  # small_wang (Pythia <= 2.8B, 20B) | normal (Pythia 6.9B/12B)
    init_std: float = 0.02  # std of the "normal" scheme

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):  # types first (values may come from JSON/YAML files)
            object.__setattr__(self, f.name, CHECKS[_FIELD_TYPES[f.name]](getattr(self, f.name), f.name))
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{f} must be a positive int, got {v!r}")
        need(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        need(self.intermediate_size >= 0, f"intermediate_size must be >= 0, got {self.intermediate_size}")
        if self.intermediate_size == 0:  # 0 means 4h; store it explicitly so equal models compare equal
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        need(self.max_position_embeddings > 0, "max_position_embeddings must be positive")
        need(
            isinstance(self.rotary_pct, (int, float)) and 0.0 < self.rotary_pct <= 1.0,
            f"rotary_pct must be in (0, 1], got {self.rotary_pct!r}",
        )
        need(self.rotary_dims > 0, f"rotary_pct {self.rotary_pct} gives 0 rotary dims for head_dim {self.head_dim}")
        need(
            self.rotary_dims % 2 == 0,
            f"rotary dims int(head_dim * rotary_pct) = {self.rotary_dims} must be even "
            f"(head_dim {self.head_dim}, rotary_pct {self.rotary_pct})",
        )
        need(self.rotary_emb_base > 0, "rotary_emb_base must be positive")
        need(self.layer_norm_eps > 0, "layer_norm_eps must be positive")
        need(self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        need(self.tokenizer_vocab_size >= 0,
             f"tokenizer_vocab_size must be >= 0 (0: vocab_size), got {self.tokenizer_vocab_size}")
        need(
            self.tokenizer_vocab_size <= self.vocab_size,
            f"tokenizer_vocab_size {self.tokenizer_vocab_size} exceeds vocab_size {self.vocab_size}",
        )
        for f in ("param_dtype", "compute_dtype"):
            need(getattr(self, f) in FLOAT_DTYPES, f"{f} must be one of {FLOAT_DTYPES}, got {getattr(self, f)!r}")
        need(self.rotary_dtype in FLOAT_DTYPES, f"rotary_dtype must be one of {FLOAT_DTYPES}")
        need(self.attention in ATTENTION_IMPLS, f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        need(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        need(self.remat != "dots_attn" or self.attention == "cudnn",
             "remat dots_attn saves cuDNN attention's forward outputs: it needs attention cudnn "
             f"(with attention {self.attention!r} use remat dots)")
        need(self.init in INIT_SCHEMES, f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        need(self.init_std > 0, f"init_std must be positive, got {self.init_std}")
        need(self.bias_grad in BIAS_GRADS, f"bias_grad must be one of {BIAS_GRADS}, got {self.bias_grad!r}")
        for f in ("use_parallel_residual", "tie_word_embeddings", "scan_layers"):
            need(isinstance(getattr(self, f), bool), f"{f} must be true or false")

    # --- derived sizes ---
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def real_vocab_size(self) -> int:
        return self.tokenizer_vocab_size or self.vocab_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def arch_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    def num_params(self) -> int:
        """Exact parameter count: L*(12h^2 + 13h) + 2h + (1 or 2)*V*h for the default 4h MLP."""
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        per_layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return L * per_layer + 2 * h + v * h * (1 if self.tie_word_embeddings else 2)


_FIELD_TYPES = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type]
                for f in dataclasses.fields(ModelConfig)}
ARCH_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
    "rotary_pct", "rotary_emb_base", "layer_norm_eps", "use_parallel_residual",
    "tie_word_embeddings", "hidden_act",
)
_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def from_dict(d: Mapping[str, Any], *, where: str = "config") -> ModelConfig:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    try:
        return ModelConfig(**d)
    except TypeError as e:  # missing required keys
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


# ---------------------------------------------------------------- our YAML / JSON


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def preset_path(name: str) -> Path:
    """`pythia-1.4b` -> configs/pythia-1.4b.yaml (searched in $NEOX_JAX_CONFIGS, then the repo)."""
    dirs = [Path(p) for p in os.environ.get("NEOX_JAX_CONFIGS", "").split(os.pathsep) if p]
    dirs.append(repo_root() / "configs")
    for d in dirs:
        p = d / f"{name}.yaml"
        if p.exists():
            return p
    raise ConfigError(f"no preset named {name!r} in {[str(d) for d in dirs]}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in (repo_root() / "configs").glob("*.yaml"))


def parse_override(item: str) -> tuple[str, Any]:
    """`model.compute_dtype=float32` -> ("compute_dtype", "float32"); values parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.startswith("model."):
        key = key[len("model."):]
    try:
        return key, load_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None


def load_config(path_or_preset: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """Read a YAML preset (section `model:`), a preset name, or a checkpoint's config.json."""
    p = Path(path_or_preset)
    if not p.exists() and p.suffix not in (".yaml", ".yml", ".json") and os.sep not in str(path_or_preset):
        p = preset_path(str(path_or_preset))
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = load_yaml(_read_text(p))  # JSON is YAML
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML/JSON ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at top level")
    if "model" in raw:
        extra = sorted(set(raw) - {"model"})
        if extra:
            raise ConfigError(f"{p}: unknown top-level section(s) {extra} (known: ['model'])")
        raw = Fields(raw, str(p)).mapping("model")
    raw = dict(raw)
    for item in overrides:
        k, v = parse_override(item)
        raw[k] = v
    return from_dict(raw, where=str(p))


def save_config(cfg: ModelConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- Hugging Face config.json

# HF keys that carry no math for inference (or that we recompute); accepted and ignored.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "hidden_dropout", "attention_dropout", "classifier_dropout",
    "_name_or_path", "_attn_implementation_autoset", "is_decoder", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "add_cross_attention", "cross_attention_hidden_size", "pruned_heads",
    "torchscript", "use_bfloat16", "bad_words_ids", "decoder_start_token_id", "is_encoder_decoder",
}


def from_hf_config(hf: Mapping[str, Any], *, where: str = "config.json", **numerics) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face GPT-NeoX `config.json` dict.

    Unknown or unsupported keys that would change the forward pass raise ConfigError."""
    f = Fields(hf, where)
    hf = dict(hf)
    mt = f.str("model_type", "gpt_neox")
    if mt != "gpt_neox":
        raise ConfigError(f"{where}: model_type {mt!r} is not gpt_neox")
    arch = f.list("architectures", str, ["GPTNeoXForCausalLM"], nullable=True) or ["GPTNeoXForCausalLM"]
    if not any(a.startswith("GPTNeoX") for a in arch):
        raise ConfigError(f"{where}: unsupported architectures {arch}")

    rope = f.mapping("rope_parameters", {}, nullable=True)
    rope.update(f.mapping("rope_scaling", {}, nullable=True))
    r = Fields(rope, where, "rope_parameters.")
    rope_type = r.str("rope_type", None) or r.str("type", "default")
    if rope_type != "default":
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (only default rotary)")
    unknown_rope = set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if unknown_rope:
        raise ConfigError(f"{where}: unsupported rope parameter(s) {sorted(unknown_rope)}")
    rotary_pct = (r.float("partial_rotary_factor") if r.has("partial_rotary_factor") else
                  f.float("rotary_pct") if f.has("rotary_pct") else f.float("partial_rotary_factor", 0.25))
    rope_theta = (r.float("rope_theta") if r.has("rope_theta") else
                  f.float("rotary_emb_base") if f.has("rotary_emb_base") else f.float("rope_theta", 10000.0))

    act = f.str("hidden_act", "gelu")
    if act not in _HF_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (known: {sorted(_HF_ACTS)})")
    if not f.bool("attention_bias", True):
        raise ConfigError(f"{where}: attention_bias=false is not supported (NeoX linears all have biases)")
    for k in ("rope_scaling",):
        hf.pop(k, None)

    known = _HF_IGNORED | {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "rotary_pct", "rotary_emb_base", "rope_theta", "partial_rotary_factor",
        "rope_parameters", "layer_norm_eps", "use_parallel_residual", "tie_word_embeddings",
        "hidden_act", "attention_bias",
    }
    unknown = sorted(set(hf) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (would they change the math? refusing to guess)")
    try:
        return ModelConfig(
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            num_layers=f.int("num_hidden_layers"),
            num_heads=f.int("num_attention_heads"),
            intermediate_size=f.int("intermediate_size", 0, nullable=True),
            max_position_embeddings=f.int("max_position_embeddings", 2048),
            rotary_pct=rotary_pct,
            rotary_emb_base=rope_theta,
            layer_norm_eps=f.float("layer_norm_eps", 1e-5),
            use_parallel_residual=f.bool("use_parallel_residual", True),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            hidden_act=_HF_ACTS[act],
            **numerics,
        )
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def to_hf_config(cfg: ModelConfig, *, torch_dtype: str = "float32", bos_token_id: int = 0, eos_token_id: int = 0) -> dict:
    """HF `config.json` readable by transformers 4.x (rotary_pct/rotary_emb_base) and 5.x (rope_parameters)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_emb_base,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rotary_emb_base,
            "partial_rotary_factor": cfg.rotary_pct,
        },
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": cfg.use_parallel_residual,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "gelu" if cfg.hidden_act == "gelu" else "gelu_fast",
        "attention_bias": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


# ---------------------------------------------------------------- GPT-NeoX YAML

# Keys of GPT-NeoX's YAML that change the forward pass, with the values we implement
# (None: any value, handled below).  Any other value of these keys is refused.
_NEOX_MATH_ALLOWED: dict[str, tuple] = {
    "pos_emb": ("rotary",),
    "norm": ("layernorm",),
    "gpt_j_tied": (False,),
    "activation": ("gelu",),
    "num_kv_heads": (None,),  # must equal num_attention_heads (checked below)
    "mlp_type": ("regular",),
    "use_bias_in_norms": (True,),
    "use_bias_in_attn_linear": (True,),
    "use_bias_in_mlp": (True,),
    "use_qk_layernorm": (False,),
    "rotary_interleaved": (False,),
    "use_mup": (False,),
    "num_experts": (1,),
    "moe_num_experts": (1,),
    "sliding_window_width": (None,),
    "opt_pos_emb_offset": (0,),
    "scaled_masked_softmax_fusion": (True, False),
    "scaled_upper_triang_masked_softmax_fusion": (True, False),
    "apply_query_key_layer_scaling": (True, False),  # mathematically identical
    "attention_softmax_in_fp32": (True, False),
    "rope_fusion": (True, False),
    "output_layer_parallelism": ("row", "column"),
    "output_layer_init_method": None, "init_method": None,
    "soft_prompt_tuning": (None,),
    "use_flashattn_swiglu": (False,),
    "use_bnb_optimizer": (False, True),
    "mamba_inner_func_fusion": (False,), "mamba_selective_scan_fusion": (False,),
}
# Keys read into ModelConfig (after `-` -> `_`).
_NEOX_READ = {
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
    "rotary_pct", "rotary_emb_base", "layernorm_epsilon", "gpt_j_residual", "bias_gelu_fusion",
    "no_weight_tying", "make_vocab_size_divisible_by", "model_parallel_size", "padded_vocab_size",
    "intermediate_size", "attention_config", "hidden_dropout", "attention_dropout",
}


def _neox_attention_kinds(ac: Any, where: str) -> set[str]:
    """Attention kinds of GPT-NeoX's `attention_config`, e.g. [[["global"], 24]]."""
    kinds: set[str] = set()
    if ac is not None and not isinstance(ac, list):
        raise ConfigError(f"{where}: attention_config must be a list like [[[\"global\"], N]], got {ac!r}")
    for entry in ac or []:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ConfigError(f"{where}: attention_config entry {entry!r} is not [kinds, count]")
        names = entry[0] if isinstance(entry[0], list) else [entry[0]]
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}: attention_config entry {entry!r}: kinds must be strings")
        kinds.update(names)
    return kinds


def from_neox_yaml(src: str | os.PathLike | Mapping[str, Any] | list, *, tokenizer_vocab_size: int = 50277,
                   where: str = "neox config", **numerics) -> ModelConfig:
    """Read GPT-NeoX YAML config(s) (one file, a list of files merged in order, or a dict).

    `tokenizer_vocab_size` is what NeoX gets from its tokenizer (50277 for the 20B tokenizer); the
    padded size follows `make_vocab_size_divisible_by * model_parallel_size` unless the config
    carries `padded_vocab_size`."""
    if isinstance(src, Mapping):
        raw = dict(src)
    else:
        paths = src if isinstance(src, list) else [src]
        raw = {}
        for p in paths:
            try:
                part = load_yaml(_read_text(Path(p)))
            except OSError as e:
                raise ConfigError(f"{p}: cannot read GPT-NeoX YAML ({e.strerror})") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
            if not isinstance(part, dict):
                raise ConfigError(f"{p}: expected a mapping at top level")
            raw.update(part)
        where = ", ".join(str(p) for p in paths)
    d = {str(k).replace("-", "_"): v for k, v in raw.items()}

    for key, allowed in _NEOX_MATH_ALLOWED.items():
        if key not in d or allowed is None or d[key] is None:
            continue
        if key == "num_kv_heads":
            if d[key] != d.get("num_attention_heads"):
                raise ConfigError(f"{where}: num_kv_heads={d[key]} (grouped-query attention) is not supported")
            continue
        if key == "sliding_window_width" or key == "soft_prompt_tuning":
            raise ConfigError(f"{where}: {key}={d[key]!r} is not supported")
        if d[key] not in allowed:
            raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (supported: {list(allowed)})")
    if "pos_emb" not in d:
        raise ConfigError(f"{where}: no pos_emb key; GPT-NeoX's default is 'learned', which is not supported")
    kinds = _neox_attention_kinds(d.get("attention_config"), where)
    bad = kinds - {"global", "flash"}
    if bad:
        raise ConfigError(f"{where}: attention_config kinds {sorted(bad)} are not supported (global/flash only)")
    for k in ("hidden_dropout", "attention_dropout"):
        if d.get(k):
            log.warning("%s: %s=%s is a training-time dropout; neox-jax applies no dropout", where, k, d[k])
    for k in ("num_layers", "hidden_size", "num_attention_heads"):
        if k not in d:
            raise ConfigError(f"{where}: missing key {k!r}")

    f = Fields(d, where)
    padded = f.int("padded_vocab_size", 0, nullable=True)
    tp = f.int("model_parallel_size", 1, nullable=True) or 1
    if padded:
        vocab = padded
    else:
        multiple = f.int("make_vocab_size_divisible_by", 128, nullable=True) * tp
        if multiple <= 0:
            raise ConfigError(f"{where}: make_vocab_size_divisible_by x model_parallel_size must be positive")
        vocab = int(math.ceil(tokenizer_vocab_size / multiple) * multiple)
    seq = (f.int("max_position_embeddings", 0, nullable=True) or f.int("seq_length", 0, nullable=True)
           or 2048)
    init_method = f.str("init_method", None, nullable=True)
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=f.int("hidden_size"),
            num_layers=f.int("num_layers"),
            num_heads=f.int("num_attention_heads"),
            intermediate_size=f.int("intermediate_size", 0, nullable=True),
            max_position_embeddings=seq,
            rotary_pct=f.float("rotary_pct", 1.0),
            rotary_emb_base=f.float("rotary_emb_base", 10000.0),
            layer_norm_eps=f.float("layernorm_epsilon", 1e-5),
            use_parallel_residual=f.bool("gpt_j_residual", False),
            tie_word_embeddings=not f.bool("no_weight_tying", False),
            hidden_act="gelu_tanh" if f.bool("bias_gelu_fusion", False) else "gelu",
            tokenizer_vocab_size=min(tokenizer_vocab_size, vocab),
            init="small_wang" if init_method == "small_init" else "normal",
            **numerics,
        )
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
