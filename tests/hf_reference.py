"""Tiny random Hugging Face GPT-NeoX models built locally (the PyTorch reference; no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_jax.config import from_hf_config
from neox_jax.convert.mapping import params_from_hf


def hf_model(seed: int = 0, *, vocab=211, hidden=64, layers=2, heads=4, ffn=None, rotary_pct=0.25,
             parallel=True, tied=False, act="gelu", max_pos=2048, base=10000.0, randomize_biases=True):
    """A random GPTNeoXForCausalLM in fp32, eager attention, with non-trivial LayerNorms and biases."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn or 4 * hidden, rotary_pct=rotary_pct, rotary_emb_base=base,
        max_position_embeddings=max_pos, hidden_act=act, use_parallel_residual=parallel,
        tie_word_embeddings=tied, attn_implementation="eager", initializer_range=0.1,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    if randomize_biases:  # HF initialises biases to 0 and LN to 1: randomise so every term is tested
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.05)
                elif "layernorm" in name or "layer_norm" in name:
                    p.normal_(1.0, 0.1)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def ours_from_hf(model, **numerics):
    cfg = from_hf_config(model.config.to_dict(), **numerics)
    return cfg, params_from_hf(cfg, state_dict_numpy(model))


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(attention_mask)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().numpy()
