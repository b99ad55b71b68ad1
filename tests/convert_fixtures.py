"""Fixtures for the conversion tests: tiny random HF models and native GPT-NeoX checkpoints written
here, independently of neox_jax.convert, following the published layout (reference 2.1-2.4).

Nothing is downloaded.  The NeoX writer below is deliberately separate from neox_jax/convert/neox.py
(hand-written split, its own file naming and YAML) so that it can serve as the reference."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def tiny_hf(seed: int = 0, *, vocab=256, hidden=64, layers=2, heads=4, ffn=None, parallel=True, tied=False,
            act="gelu", max_pos=128, rotary_pct=0.25, fp16_values=False, eps=1e-5, base=10000.0) -> GPTNeoXForCausalLM:
    """A random fp32 GPTNeoXForCausalLM with non-trivial biases and LayerNorms (eager attention).

    fp16_values: round every weight to float16 (still stored as fp32) and make every bias a multiple
    of 2**-12 in (-0.25, 0.25), so fp16 files and TP bias splits below are exact."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn or 4 * hidden, rotary_pct=rotary_pct, rotary_emb_base=base,
        max_position_embeddings=max_pos, hidden_act=act, use_parallel_residual=parallel,
        tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=0, eos_token_id=0, layer_norm_eps=eps,
    )
    cfg._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
                if fp16_values:
                    p.copy_(torch.round(p.clamp(-0.2, 0.2) * 4096) / 4096)
            elif "layernorm" in name or "layer_norm" in name:
                p.normal_(1.0, 0.1)
            if fp16_values:
                p.copy_(p.half().float())
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    """HF on-disk names (embed_out.weight, not transformers 5's lm_head.weight), fp32 numpy."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if model.config.tie_word_embeddings:
                continue
            k = "embed_out.weight"
        sd[k] = v.detach().float().numpy().copy()
    return sd


def save_hf(model, path: Path, *, dtype=torch.float16, max_shard_size=None, old_style=False, bin=False) -> Path:
    """save_pretrained in `dtype`; old_style adds the buffers 2022-era checkpoints carry."""
    path = Path(path)
    m = model.to(dtype)
    if bin:
        path.mkdir(parents=True, exist_ok=True)
        m.config.save_pretrained(path)
        torch.save({k: v.clone() for k, v in _disk_sd(m).items()}, path / "pytorch_model.bin")
    elif old_style:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.clone().contiguous() for k, v in _disk_sd(m).items()}
        cfg = m.config
        r = int((cfg.hidden_size // cfg.num_attention_heads) * 0.25)
        for i in range(cfg.num_hidden_layers):
            sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
            sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = (
                1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)).half()
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        # a transformers-4.24-era config.json
        old = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0,
               "eos_token_id": 0, "hidden_act": cfg.hidden_act, "hidden_size": cfg.hidden_size,
               "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size, "layer_norm_eps": cfg.layer_norm_eps,
               "max_position_embeddings": cfg.max_position_embeddings, "num_attention_heads": cfg.num_attention_heads,
               "num_hidden_layers": cfg.num_hidden_layers, "rotary_emb_base": 10000, "rotary_pct": 0.25,
               "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0",
               "use_cache": True, "use_parallel_residual": True, "vocab_size": cfg.vocab_size}
        (path / "config.json").write_text(json.dumps(old, indent=2))
    else:
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        m.save_pretrained(path, **kw)
    model.float()
    return path


def _disk_sd(m) -> dict:
    sd = dict(m.state_dict())
    if "lm_head.weight" in sd:
        sd["embed_out.weight"] = sd.pop("lm_head.weight")
    return sd


def logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def load_hf(path, dtype=torch.float32):
    return GPTNeoXForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


# ----------------------------------------------------------------------------- native GPT-NeoX

COLUMN = ("attention.query_key_value.weight", "attention.query_key_value.bias",
          "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
ROW = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
ROW_BIAS = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")
NORMS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
         "post_attention_layernorm.bias")


def split_row_bias(b: np.ndarray, tp: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random per-rank biases (multiples of 2**-12) whose exact sum is b (b itself such a multiple)."""
    parts = [np.round(rng.uniform(-0.06, 0.06, b.shape) * 4096) / 4096 for _ in range(tp - 1)]
    last = b.astype(np.float64) - np.sum(parts, axis=0) if parts else b.astype(np.float64)
    out = parts + [last]
    assert np.array_equal(np.sum(out, axis=0), b.astype(np.float64))
    return out


def neox_rank_tensors(sd: dict[str, np.ndarray], L: int, tp: int, seed: int = 0,
                      parallel: bool = True) -> dict[int, list[dict]]:
    """pipeline index -> per-rank {param: fp32 numpy}, split by the published TP rules.

    Row-parallel biases: with parallel residual every rank adds its own copy before the all-reduce,
    so the model's bias is the SUM of the per-rank ones (random parts here); otherwise identical copies."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[dict]] = {}
    emb = np.split(sd["gpt_neox.embed_in.weight"], tp, axis=0)
    out[0] = [{"word_embeddings.weight": e} for e in emb]
    for i in range(L):
        ranks = [dict() for _ in range(tp)]
        for p in COLUMN:
            for r, part in enumerate(np.split(sd[f"gpt_neox.layers.{i}.{p}"], tp, axis=0)):
                ranks[r][p] = part
        for p in ROW:
            for r, part in enumerate(np.split(sd[f"gpt_neox.layers.{i}.{p}"], tp, axis=1)):
                ranks[r][p] = part
        for p in ROW_BIAS:
            b = sd[f"gpt_neox.layers.{i}.{p}"]
            for r, part in enumerate(split_row_bias(b, tp, rng) if parallel else [b] * tp):
                ranks[r][p] = part
        for p in NORMS:
            for r in range(tp):
                ranks[r][p] = sd[f"gpt_neox.layers.{i}.{p}"]
        out[i + 2] = ranks
    out[L + 3] = [{"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                   "norm.bias": sd["gpt_neox.final_layer_norm.bias"]} for _ in range(tp)]
    if "embed_out.weight" in sd:
        out[L + 4] = [{"final_linear.weight": e} for e in np.split(sd["embed_out.weight"], tp, axis=0)]
    return out


def write_neox(model, root: Path, *, tp: int, layout: str = "pipeline", step: int = 1000,
               dtype=torch.float16, padded_vocab_in_yaml: bool = True, seed: int = 0, new_names: bool = False) -> Path:
    """A native GPT-NeoX save directory for `model` (fp16 like the released ones).

    new_names: the MLP names GPT-NeoX uses since 2024 (mlp.linear1 / mlp.linear2)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    sd = hf_state_numpy(model)
    per_ll = neox_rank_tensors(sd, L, tp, seed, parallel=cfg.use_parallel_residual)
    root = Path(root)
    step_dir = root / f"global_step{step}"
    (step_dir / "configs").mkdir(parents=True)
    (root / "latest").write_text(f"global_step{step}")
    hn = cfg.hidden_size // cfg.num_attention_heads
    r = int(hn * 0.25)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)).to(dtype)

    def tens(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype).clone()

    module = collections.OrderedDict()
    for ll, ranks in sorted(per_ll.items()):
        for rank, params in enumerate(ranks):
            d = collections.OrderedDict((k, tens(v)) for k, v in params.items())
            if new_names:
                d = collections.OrderedDict((k.replace("dense_h_to_4h", "linear1").replace("dense_4h_to_h", "linear2"), v)
                                            for k, v in d.items())
            if 2 <= ll <= L + 1:
                d["attention.rotary_emb.inv_freq"] = inv_freq.clone()
            if layout == "pipeline":
                torch.save(d, step_dir / f"layer_{ll:02d}-model_{rank:02d}-model_states.pt")
            else:
                for k, v in d.items():
                    module.setdefault(rank, collections.OrderedDict())[f"sequential.{ll}.{k}"] = v
    for rank in range(tp):
        state = {
            "iteration": step,
            "args": {"num_layers": L, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                     "max_position_embeddings": cfg.max_position_embeddings, "make_vocab_size_divisible_by": 128,
                     "padded_vocab_size": cfg.vocab_size, "tokenizer_type": "HFTokenizer", "model_parallel_size": tp},
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
            "module": module.get(rank) if layout == "sequential" else None,
            "mp_world_size": tp, "dp_world_size": 1, "global_steps": step, "skipped_steps": 0,
        }
        torch.save(state, step_dir / f"mp_rank_{rank:02d}_model_states.pt")
    yml = {
        "pipe-parallel-size": 1 if layout == "pipeline" else 0,
        "model-parallel-size": tp,
        "num-layers": L, "hidden-size": cfg.hidden_size, "num-attention-heads": cfg.num_attention_heads,
        "seq-length": cfg.max_position_embeddings, "max-position-embeddings": cfg.max_position_embeddings,
        "norm": "layernorm", "pos-emb": "rotary", "rotary-pct": 0.25, "no-weight-tying": not cfg.tie_word_embeddings,
        "gpt-j-residual": cfg.use_parallel_residual, "output-layer-parallelism": "column",
        "attention-config": [[["flash"], L]], "layernorm-epsilon": cfg.layer_norm_eps,
        "bias-gelu-fusion": cfg.hidden_act != "gelu", "activation": "gelu",
        "scaled-upper-triang-masked-softmax-fusion": False, "fp16": {"enabled": True, "loss_scale": 0},
        "hidden-dropout": 0, "attention-dropout": 0, "tokenizer-type": "HFTokenizer",
    }
    if padded_vocab_in_yaml:
        yml["padded-vocab-size"] = cfg.vocab_size
    (step_dir / "configs" / "model.yml").write_text(yaml.safe_dump(yml))
    return root


# GPT-NeoX's ParallelMLP parameter names since its #1212 (Sep 2024) -> v1.0/v2.0's (and HF's)
CURRENT_MLP = {"mlp.linear1.weight": "mlp.dense_h_to_4h.weight", "mlp.linear1.bias": "mlp.dense_h_to_4h.bias",
               "mlp.linear2.weight": "mlp.dense_4h_to_h.weight", "mlp.linear2.bias": "mlp.dense_4h_to_h.bias"}


def read_neox_independent(root: Path, tp: int, L: int, parallel: bool = True,
                          names: str = "current") -> dict[str, np.ndarray]:
    """Merge a pipeline-layout NeoX checkpoint into an HF state dict (fp32) by the published rules,
    without neox_jax: the reference for checking our --to neox output.  names: what the layer files
    must hold, "current" (GPT-NeoX HEAD: mlp.linear1/linear2, no rotary inv_freq) or "legacy"
    (v1.0/v2.0: mlp.dense_h_to_4h/dense_4h_to_h and an inv_freq buffer)."""
    step = (root / "latest").read_text().strip()
    d = root / step

    def load(ll):
        out = [torch.load(d / f"layer_{ll:02d}-model_{r:02d}-model_states.pt", weights_only=True)
               for r in range(tp)]
        if 2 <= ll < L + 2:
            for s in out:
                if names == "current":
                    assert set(CURRENT_MLP) <= set(s) and not set(CURRENT_MLP.values()) & set(s), sorted(s)
                    assert "attention.rotary_emb.inv_freq" not in s
                else:
                    assert not set(CURRENT_MLP) & set(s) and "attention.rotary_emb.inv_freq" in s, sorted(s)
        return [{CURRENT_MLP.get(k, k): v for k, v in s.items()} for s in out]

    def f32(t):
        return t.float().numpy()

    sd = {"gpt_neox.embed_in.weight": np.concatenate([f32(s["word_embeddings.weight"]) for s in load(0)], 0)}
    for i in range(L):
        ranks = load(i + 2)
        for p in COLUMN:
            sd[f"gpt_neox.layers.{i}.{p}"] = np.concatenate([f32(s[p]) for s in ranks], 0)
        for p in ROW:
            sd[f"gpt_neox.layers.{i}.{p}"] = np.concatenate([f32(s[p]) for s in ranks], 1)
        for p in ROW_BIAS:
            parts = [s[p].double() for s in ranks]
            sd[f"gpt_neox.layers.{i}.{p}"] = (sum(parts) if parallel else sum(parts) / tp).float().numpy()
        for p in NORMS:
            sd[f"gpt_neox.layers.{i}.{p}"] = (sum(s[p].double() for s in ranks) / tp).float().numpy()
    fin = load(L + 3)
    sd["gpt_neox.final_layer_norm.weight"] = (sum(s["norm.weight"].double() for s in fin) / tp).float().numpy()
    sd["gpt_neox.final_layer_norm.bias"] = (sum(s["norm.bias"].double() for s in fin) / tp).float().numpy()
    if (d / f"layer_{L + 4:02d}-model_00-model_states.pt").exists():
        sd["embed_out.weight"] = np.concatenate([f32(s["final_linear.weight"]) for s in load(L + 4)], 0)
    return sd
