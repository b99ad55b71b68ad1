"""`convert --verify`: transformers (PyTorch, fp32, eager attention) against our JAX forward pass.

Which side runs what:
  * PyTorch runs an HF checkpoint: SRC when SRC is HF, else DST when DST is HF; when neither is,
    a `GPTNeoXForCausalLM` is built in memory from SRC's tensors (HF names via mapping.py).
  * JAX (`model.forward`, compute float32) runs the other side: DST, or SRC when DST is the HF one.
So every conversion is checked against an independent implementation of the forward pass.

Batch: 2 x 64 token ids drawn with a fixed seed from the tokenizer's range (shorter if the
context is).  Reported: max |delta logit| and the mean over positions of KL(p_torch || p_jax).
Tolerance on max |delta logit|, relative to max |logit|:
    1e-4   when the values were not rounded (same dtype, or widened)
    1e-2   after rounding to float16, 5e-2 after rounding to bfloat16 (the reference then runs
           the unrounded source weights; measured values are in docs/convert.md)
The whole model is held twice in float32 (once per framework): budget memory for that.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from .dispatch import open_reader


TOLERANCE = {None: 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
BATCH, SEQ, SEED = 2, 64, 1234


def batch_ids(cfg: ModelConfig) -> np.ndarray:
    S = min(SEQ, cfg.max_position_embeddings)
    return np.random.default_rng(SEED).integers(0, cfg.real_vocab_size, size=(BATCH, S), dtype=np.int64)


def torch_model_from_reader(reader):
    """A float32 GPTNeoXForCausalLM holding `reader`'s tensors (for sources that are not HF)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .formats import numpy_to_torch
    from .hf import hf_config_dict
    from .mapping import hf_name

    cfg = reader.config
    hf = hf_config_dict(cfg, "float32")
    for k in ("architectures", "model_type", "transformers_version"):
        hf.pop(k, None)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf, attn_implementation="eager")).eval()
    sd = {}
    for e in reader.entries():
        sd[hf_name(e.name, e.layer)] = numpy_to_torch(reader.read_torch(e).astype(np.float32))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if "lm_head.weight" in missing and "embed_out.weight" in sd:  # transformers 5 names the head lm_head
        with torch.no_grad():
            model.get_output_embeddings().weight.copy_(sd["embed_out.weight"])
        missing.remove("lm_head.weight")
        unexpected = [k for k in unexpected if k != "embed_out.weight"]
    if missing or unexpected:
        raise RuntimeError(f"verify: building the PyTorch model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def jax_params(path, fmt: str, neox_config=None):
    """(config, float32 params) of a checkpoint, for our forward pass."""
    from ..tree import unflatten

    if fmt == "orbax":
        from ..checkpoint import load_params

        return load_params(path, dtype="float32")
    reader = open_reader(path, fmt, neox_config=neox_config)
    try:
        L = reader.config.num_layers
        flat: dict[str, np.ndarray] = {}
        for e in reader.entries():
            a = reader.read(e).astype(np.float32)
            if e.layer is None:
                flat[e.name] = a
            else:
                flat.setdefault(e.name, np.zeros((L,) + a.shape, np.float32))[e.layer] = a
        return reader.config, unflatten(flat)
    finally:
        reader.close()


def verify_conversion(src, src_fmt: str, dst, dst_fmt: str, *, neox_config=None, narrowed_to: str | None = None,
                      dst_label: str | None = None) -> dict:
    """Compare SRC and DST (which may still be the temporary directory; dst_label names it)."""
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import GPTNeoXForCausalLM

    from ..model import forward

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    labels = {str(src): str(src), str(dst): dst_label or str(dst)}

    if src_fmt == "hf" or dst_fmt != "hf":
        ref_path, ref_fmt, cand_path, cand_fmt = src, src_fmt, dst, dst_fmt
    else:
        ref_path, ref_fmt, cand_path, cand_fmt = dst, dst_fmt, src, src_fmt
    cand_neox_cfg = neox_config if cand_path == src else None
    if ref_fmt == "hf":
        model = GPTNeoXForCausalLM.from_pretrained(str(ref_path), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    else:
        reader = open_reader(ref_path, ref_fmt, neox_config=neox_config)
        try:
            model = torch_model_from_reader(reader)
        finally:
            reader.close()
    cfg, params = jax_params(cand_path, cand_fmt, cand_neox_cfg)
    cfg = cfg.replace(compute_dtype="float32", param_dtype="float32", attention="xla", remat="none")
    ids = batch_ids(cfg)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.float().numpy()
    del model
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    got = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, jnp.asarray(ids, jnp.int32)))
    del params
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    max_abs = float(diff.max())
    scale = float(np.abs(ref).max())
    lp = _log_softmax(ref.astype(np.float64))
    lq = _log_softmax(got.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    factor = TOLERANCE[narrowed_to]
    tol = factor * max(scale, 1e-6)
    return {
        "reference": f"transformers on {ref_fmt} {labels[str(ref_path)]}",
        "candidate": f"jax on {cand_fmt} {labels[str(cand_path)]}",
        "batch": list(ids.shape), "max_abs_diff": max_abs, "max_abs_logit": scale, "mean_kl": kl,
        "tolerance": tol, "tolerance_factor": factor, "ok": bool(max_abs <= tol and np.isfinite(got).all()),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
