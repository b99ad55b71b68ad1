"""Config validation, presets, HF config.json and GPT-NeoX YAML readers/writers."""

import json
import resource

import pytest
import torch
import yaml
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_jax import model as M
from neox_jax.config import (
    ARCH_FIELDS, ConfigError, ModelConfig, from_hf_config, from_neox_yaml, list_presets, load_config, to_hf_config,
)
from neox_jax.convert.neox import neox_yaml

PRESETS = ["neox-20b"] + [f"pythia-{s}" for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")]


def test_all_presets_exist():
    assert set(PRESETS) | {"tiny"} <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_equals_hf(name):
    """Count HF's parameters on torch's meta device (nothing allocated) and compare to ours."""
    cfg = load_config(name)
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert cfg.num_params() == hf_count
    assert M.count_params(M.abstract_params(cfg)) == hf_count


# The published configs, copied from ../shared/reference/neox-reference.md 1.8 (GPT-NeoX configs/20B.yml)
# and 1.9 (configs/pythia/*.yml): layers, hidden, heads, head dim, rotary dims, ffn, padded vocab, init,
# parameter count.  Common to all (1.8-1.9): seq 2048, rotary_pct 0.25, rotary base 10000 (not set),
# LayerNorm eps 1e-5, gpt_j_residual true, no_weight_tying true, bias_gelu_fusion true (tanh GELU),
# 50277-token tokenizer.
PUBLISHED = {
    #              L    h     nh  hn   r   ffn    V_pad  init          params
    "neox-20b":   (44, 6144, 64, 96,  24, 24576, 50432, "small_wang", 20_554_567_680),
    "pythia-14m": (6,  128,  4,  32,  8,  512,   50304, "small_wang", 14_067_712),
    "pythia-31m": (6,  256,  8,  32,  8,  1024,  50304, "small_wang", 30_494_720),
    "pythia-70m": (6,  512,  8,  64,  16, 2048,  50304, "small_wang", 70_426_624),
    "pythia-160m": (12, 768, 12, 64,  16, 3072,  50304, "small_wang", 162_322_944),
    "pythia-410m": (24, 1024, 16, 64, 16, 4096,  50304, "small_wang", 405_334_016),
    "pythia-1b":  (16, 2048, 8,  256, 64, 8192,  50304, "small_wang", 1_011_781_632),
    "pythia-1.4b": (24, 2048, 16, 128, 32, 8192, 50304, "small_wang", 1_414_647_808),
    "pythia-2.8b": (32, 2560, 32, 80, 20, 10240, 50304, "small_wang", 2_775_208_960),
    "pythia-6.9b": (32, 4096, 32, 128, 32, 16384, 50432, "normal", 6_857_302_016),
    "pythia-12b": (36, 5120, 40, 128, 32, 20480, 50688, "normal", 11_846_072_320),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_fields_equal_the_published_config(name):
    """Every architecture field (and init, tokenizer size, derived head/rotary dims) of the preset, one by
    one, against the published GPT-NeoX / Pythia config: a swapped head count, a wrong rotary_pct or
    eps would not change the parameter count, but fails here."""
    L, h, nh, hn, r, ffn, V, init, params = PUBLISHED[name]
    want = {
        "vocab_size": V, "hidden_size": h, "num_layers": L, "num_heads": nh, "intermediate_size": ffn,
        "rotary_pct": 0.25, "rotary_emb_base": 10000.0, "layer_norm_eps": 1e-5, "use_parallel_residual": True,
        "tie_word_embeddings": False, "hidden_act": "gelu_tanh",
        "max_position_embeddings": 2048, "tokenizer_vocab_size": 50277, "init": init, "init_std": 0.02,
    }
    assert set(ARCH_FIELDS) <= set(want)  # every field that decides what the tensors mean is checked
    cfg = load_config(name)
    for field, value in want.items():
        assert getattr(cfg, field) == value, (name, field, getattr(cfg, field), value)
        assert type(getattr(cfg, field)) is type(value) or isinstance(value, float), (name, field)
    assert (cfg.head_dim, cfg.rotary_dims) == (hn, r)
    assert cfg.num_params() == params
    assert cfg.param_dtype == "float32" and cfg.rotary_dtype == "float32"  # HF-parity numerics by default


def test_published_counts():
    assert load_config("neox-20b").num_params() == 20_554_567_680
    assert load_config("pythia-1.4b").num_params() == 1_414_647_808
    assert load_config("pythia-12b").vocab_size == 50688
    assert load_config("neox-20b").rotary_dims == 24


@pytest.mark.parametrize("name", ["neox-20b", "pythia-12b"])
def test_large_presets_build_abstractly(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tree = M.abstract_params(load_config(name))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert M.count_params(tree) == load_config(name).num_params()
    assert grown_mb < 500, f"eval_shape allocated {grown_mb:.0f} MB"


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(hidden_size=100, num_heads=3), "not divisible"),
        (dict(rotary_pct=0.0), r"rotary_pct must be in \(0, 1\]"),
        (dict(rotary_pct=1.5), r"rotary_pct must be in \(0, 1\]"),
        (dict(hidden_size=64, num_heads=4, rotary_pct=0.3125), "must be even"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(remat="everything"), "remat must be one of"),
        (dict(compute_dtype="int8"), "compute_dtype"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(init_std=-1.0), "init_std must be positive"),
        (dict(init_std=0.0), "init_std must be positive"),
        (dict(tokenizer_vocab_size=-1), r"tokenizer_vocab_size must be >= 0"),
    ],
)
def test_invalid_values_are_refused(changes, match):
    base = load_config("configs/tiny.yaml")
    with pytest.raises(ConfigError, match=match):
        base.replace(**changes)


def test_unknown_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  vocab_size: 128\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 4\n  rotary_precent: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rotary_precent'\]"):
        load_config(p)
    p.write_text("model:\n  vocab_size: 128\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 4\ntrainer: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level section"):
        load_config(p)


def test_model_section_must_be_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    for text, got in (("model: 5\n", "got 5"), ("model:\n", "got null"), ("model: [1]\n", "got [1]")):
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert str(p) in str(e.value) and "model must be a mapping" in str(e.value) and got in str(e.value)


def test_non_utf8_config_files_are_refused_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"model: {vocab_size: 64, hidden_size: 8, num_layers: 1, num_heads: 2}\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"{p}: not UTF-8 text \(byte 0xff at offset 71\)"):
        load_config(p)
    n = tmp_path / "n.yml"
    n.write_bytes(b'{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "rotary"}\n# \xff\n')
    with pytest.raises(ConfigError, match=rf"{n}: not UTF-8 text"):
        from_neox_yaml(n)


def test_overrides():
    cfg = load_config("tiny", ["model.num_layers=3", "compute_dtype=bfloat16"])
    assert cfg.num_layers == 3 and cfg.compute_dtype == "bfloat16"


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(Exception):
        cfg.hidden_size = 3


# ------------------------------------------------------------------ HF config.json


def test_hf_old_style_keys():
    hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 50432,
          "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64, "intermediate_size": 24576,
          "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-5,
          "use_parallel_residual": True, "tie_word_embeddings": False, "hidden_act": "gelu_fast",
          "bos_token_id": 0, "eos_token_id": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
          "initializer_range": 0.02, "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True}
    cfg = from_hf_config(hf)
    assert cfg.num_params() == 20_554_567_680
    assert cfg.hidden_act == "gelu_tanh" and cfg.rotary_pct == 0.25 and not cfg.tie_word_embeddings


def test_hf_rope_parameters_form_from_transformers5():
    hf = GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       rotary_pct=0.5, rotary_emb_base=5000, hidden_act="gelu").to_dict()
    assert "rope_parameters" in hf
    cfg = from_hf_config(hf)
    assert cfg.rotary_pct == 0.5 and cfg.rotary_emb_base == 5000 and cfg.hidden_act == "gelu"


def test_hf_config_written_is_read_by_transformers(tmp_path):
    cfg = load_config("pythia-70m").replace(rotary_pct=0.5, rotary_emb_base=20000.0, hidden_act="gelu")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    hf = GPTNeoXConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5
    assert hf.rope_parameters["rope_theta"] == 20000.0
    assert hf.hidden_act == "gelu" and hf.use_parallel_residual and not hf.tie_word_embeddings
    assert from_hf_config(hf.to_dict()).arch_dict() == cfg.arch_dict()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type"),
        ({"attention_bias": False}, "attention_bias"),
        ({"hidden_act": "silu"}, "hidden_act"),
        ({"sliding_window": 512}, r"unknown key\(s\) \['sliding_window'\]"),
    ],
)
def test_hf_unsupported_math_is_refused(change, match):
    hf = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, **change}
    with pytest.raises(ConfigError, match=match):
        from_hf_config(hf)


# ------------------------------------------------------------------ GPT-NeoX YAML

NEOX_20B_YML = """
# GPT-NeoX-20B, as in GPT-NeoX configs/20B.yml (JSON-style YAML with comments)
{
  "pipe-parallel-size": 4,
  "model-parallel-size": 2,
  "num-layers": 44,
  "hidden-size": 6144,
  "num-attention-heads": 64,
  "seq-length": 2048,
  "max-position-embeddings": 2048,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": true,
  "output_layer_parallelism": "column",
  "scaled-upper-triang-masked-softmax-fusion": true,
  "bias-gelu-fusion": true,
  "init_method": "small_init",
  "output_layer_init_method": "wang_init",
  "optimizer": {"type": "Adam", "params": {"lr": 0.97e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "min_lr": 0.97e-5,
  "zero_optimization": {"stage": 1},
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 32,
  "data-impl": "mmap",
  "split": "995,4,1",
  "checkpoint-activations": true,
  "gradient_clipping": 1.0,
  "weight-decay": 0.01,
  "hidden-dropout": 0,
  "attention-dropout": 0,
  "fp16": {"fp16": true, "enabled": true, "loss_scale": 0, "initial_scale_power": 12},
  "train-iters": 150000,
  "lr-decay-iters": 150000,
  "tokenizer_type": "HFTokenizer",
  "vocab-file": "./20B_checkpoints/20B_tokenizer.json",
}
"""

PYTHIA_410M_YML = """
{
  "pipe-parallel-size": 1, "model-parallel-size": 1,
  "num-layers": 24, "hidden-size": 1024, "num-attention-heads": 16, "seq-length": 2048,
  "max-position-embeddings": 2048, "pos-emb": "rotary", "rotary-pct": 0.25, "no-weight-tying": true,
  "gpt-j-residual": true, "output-layer-parallelism": "column",
  "attention-config": [[["flash"], 24]],
  "scaled-upper-triang-masked-softmax-fusion": true, "bias-gelu-fusion": true,
  "init_method": "small_init", "output_layer_init_method": "wang_init",
  "optimizer": {"type": "Adam", "params": {"lr": 0.0003, "betas": [0.9, 0.95], "eps": 1.0e-08}},
  "min_lr": 0.00003, "hidden-dropout": 0, "attention-dropout": 0,
}
"""


def test_neox_20b_yaml(tmp_path):
    p = tmp_path / "20B.yml"
    p.write_text(NEOX_20B_YML)
    cfg = from_neox_yaml(p)
    assert cfg.vocab_size == 50432 and cfg.num_params() == 20_554_567_680
    assert cfg.hidden_act == "gelu_tanh" and cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert cfg.arch_dict() == load_config("neox-20b").arch_dict()


def test_neox_pythia_yaml_dash_and_underscore_keys(tmp_path):
    p = tmp_path / "410M.yml"
    p.write_text(PYTHIA_410M_YML)
    cfg = from_neox_yaml(p)
    assert cfg.vocab_size == 50304 and cfg.num_params() == 405_334_016
    assert cfg.arch_dict() == load_config("pythia-410m").arch_dict()


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"gpt_j_tied": True}, "gpt_j_tied"),
        ({"pos-emb": "learned"}, "pos_emb"),
        ({"activation": "geglu"}, "activation"),
        ({"num_kv_heads": 4}, "grouped-query"),
        ({"norm": "rmsnorm"}, "norm"),
        ({"attention-config": [[["local"], 24]]}, "attention_config"),
        ({"use_bias_in_attn_linear": False}, "use_bias_in_attn_linear"),
        ({"mlp_type": "llama"}, "mlp_type"),
    ],
)
def test_neox_yaml_unsupported_math_is_an_error(tmp_path, extra, match):
    p = tmp_path / "bad.yml"
    p.write_text(json.dumps({**yaml.safe_load(PYTHIA_410M_YML), **extra}))
    with pytest.raises(ConfigError, match=match):
        from_neox_yaml(p)


def test_neox_yaml_without_pos_emb_is_an_error(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text('{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4}')
    with pytest.raises(ConfigError, match="pos_emb"):
        from_neox_yaml(p)


def test_malformed_yaml_is_one_line_error(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text('{"num-layers": 2,, }')
    with pytest.raises(ConfigError) as e:
        from_neox_yaml(p)
    assert "\n" not in str(e.value) and "line 1" in str(e.value)


# ------------------------------------------------------------------ LayerNorm eps through every reader


@pytest.mark.parametrize("eps", [1e-6, 3e-3])
def test_layer_norm_eps_is_read_from_hf_config(tmp_path, eps):
    """transformers writes the eps; our reader must take it (not assume 1e-5), and our writer must give it
    back to transformers."""
    hf = GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       layer_norm_eps=eps).to_dict()
    assert hf["layer_norm_eps"] == eps
    cfg = from_hf_config(hf)
    assert cfg.layer_norm_eps == eps
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    assert GPTNeoXConfig.from_pretrained(tmp_path).layer_norm_eps == eps
    # the transformers-4.24-era spelling (old keys, no rope_parameters)
    old = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": eps}
    assert from_hf_config(old).layer_norm_eps == eps


@pytest.mark.parametrize("key", ["layernorm-epsilon", "layernorm_epsilon"])
def test_layer_norm_eps_is_read_from_neox_yaml(tmp_path, key):
    """GPT-NeoX's key is layernorm-epsilon (neox_args.py `layernorm_epsilon`, default 1e-5)."""
    raw = {**yaml.safe_load(PYTHIA_410M_YML), key: 1e-6}
    p = tmp_path / "c.yml"
    p.write_text(json.dumps(raw))
    assert from_neox_yaml(p).layer_norm_eps == 1e-6
    assert from_neox_yaml(raw).layer_norm_eps == 1e-6
    # not set: GPT-NeoX's default
    del raw[key]
    assert from_neox_yaml(raw).layer_norm_eps == 1e-5
    # our GPT-NeoX YAML writer spells it the way GPT-NeoX reads it
    cfg = from_neox_yaml({**raw, key: 2e-4})
    written = neox_yaml(cfg, 1, "float16", None)
    assert written["layernorm-epsilon"] == 2e-4
    assert from_neox_yaml(written).layer_norm_eps == 2e-4


def test_modelconfig_roundtrip_dict():
    cfg = load_config("pythia-160m")
    assert ModelConfig(**cfg.to_dict()) == cfg


def test_yaml_keys_given_twice_are_refused_and_merge_keys_still_override():
    """PyYAML's safe_load keeps the last of two equal keys; the project's loader refuses them, naming
    the key and both lines, in nested mappings too, while a YAML merge (`<<: *base`) may still be
    overridden by a key of the mapping itself (what the merge key means)."""
    import yaml

    from neox_jax.config import load_yaml

    assert yaml.safe_load("a: 1\na: 2\n") == {"a": 2}  # the behaviour being refused
    with pytest.raises(yaml.YAMLError, match=r"key 'a' given twice \(first on line 1\)"):
        load_yaml("a: 1\na: 2\n")
    with pytest.raises(yaml.YAMLError, match=r"key 'lr' given twice \(first on line 2\)") as e:
        load_yaml("optimizer:\n  lr: 1.0\n  wd: 0\n  lr: 2.0\n")
    assert e.value.problem_mark.line == 3
    with pytest.raises(yaml.YAMLError, match="key 1 given twice"):
        load_yaml("{1: a, 1: b}")
    assert load_yaml("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  y: 3\n") == {"base": {"x": 1, "y": 2},
                                                                          "run": {"x": 1, "y": 3}}
    assert load_yaml("a: 1\nb: 1\nc: {a: 2}\n") == {"a": 1, "b": 1, "c": {"a": 2}}  # equal keys in other maps


def test_tiny_yaml_documents_every_model_key():
    """configs/tiny.yaml says it holds every model key, commented (the README points there)."""
    import dataclasses
    from pathlib import Path

    from neox_jax.config import ModelConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    lines = path.read_text().splitlines()
    keys = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(yaml.safe_load(path.read_text())["model"]) == keys
    for k in keys:
        line = next(ln for ln in lines if ln.strip().startswith(f"{k}:"))
        assert "#" in line, line
