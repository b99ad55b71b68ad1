"""`neox-jax export`: a checkpoint as a TensorFlow SavedModel (jax2tf), for TF Serving, TF.js
converters or any TensorFlow program.

    neox-jax export ckpt/pythia-160m exported/pythia-160m [--dtype bfloat16] [--cache-len 512]

The SavedModel holds the parameters as TF variables (no 2 GiB graph-constant limit) and the model as
the StableHLO that `jax2tf` serializes (native serialization: TF runs XLA's program for our forward
pass, so the exported numbers are ours, not a re-implementation).  Batch and sequence length are
symbolic (any `[b, s]` with 1 <= s <= max_position_embeddings).  Signatures (V: the padded
vocabulary; T: the cache length, `--cache-len`, fixed at export, default max_position_embeddings):

    logits(tokens int32 [b, s])          -> logits float32 [b, s, V]
    token_log_probs(tokens int32 [b, s]) -> token_log_probs float32 [b, s-1]
                                            log p(tokens[:, t+1] | tokens[:, :t+1]), s >= 2
    prefill(tokens int32 [b, s], lengths int32 [b])          s <= T, 1 <= lengths[i] <= s
        -> logits float32 [b, V] (of the last position), k, v [L, b, N, T, H] (compute dtype),
           lengths int32 [b], index int32 []
    decode(token int32 [b], k, v, lengths, index)            index < T
        -> logits [b, V], k, v, lengths, index               (the same names: feed them back)

prefill/decode are generate.py's KV cache (`init_cache`, `extend`) as they are: prompts of different
lengths are left-padded to one length s, row i's prompt being its last lengths[i] tokens; every row
writes cache slot `index` each step and its next rotary position is lengths[i] (as HF `generate`
with an attention mask).  decode runs the caller's chosen token of each row and returns the logits
of the next one; it fails (InvalidArgumentError) once the cache is full instead of overwriting it.

The variables hold the weights as the forward reads them (`model.inference_params`): in the compute
dtype (a float32 checkpoint exported for bf16 compute stores bf16 matmul weights and embedding,
float32 LayerNorms), so a call, and above all a decode step, does not re-cast the float32 weights.
Attention is XLA's (portable; a cuDNN-only program would not run on CPU or TPU).  `neox_jax.json`
beside the SavedModel files holds the model config.  Tested against HF transformers' logits and
greedy `generate` on the same weights (tests/export_test.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import atomic
from .config import RUN_DTYPES
from .errors import UserError

log = logging.getLogger(__name__)

SIGNATURES = ("logits", "token_log_probs", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class _Signature:
    """One exported function: fn(params, *inputs) -> dict of outputs, its inputs as
    (name, dtype, shape with None for the batch/sequence dims, jax2tf polymorphic shape), the shape
    constraints of the symbolic dims, and TF-side checks of input values (inputs -> assert ops)."""

    fn: Callable
    inputs: tuple[tuple[str, Any, tuple, str], ...]
    constraints: tuple[str, ...] = ()
    checks: Callable | None = None


def export_saved_model(ckpt: str, out: str, *, dtype: str | None = None, cache_len: int | None = None,
                       overwrite: bool = False) -> Path:
    """Write CKPT as a SavedModel directory OUT (atomically: OUT appears complete or not at all)."""
    import jax
    import jax.numpy as jnp

    from . import checkpoint
    from .generate import KVCache, extend, init_cache
    from .model import _numerics, forward, inference_params

    if cache_len is not None and cache_len < 1:
        raise UserError(f"--cache-len must be >= 1, got {cache_len}")
    atomic.check_not_input(out, [("CKPT", ckpt)])
    rep = atomic.Replacement([out], overwrite=overwrite, directory=True)  # refuses a bad OUT before any work
    with rep:
        cfg = checkpoint.read_config(ckpt)
        T = cache_len or cfg.max_position_embeddings
        if T > cfg.max_position_embeddings:
            raise UserError(f"--cache-len {T} exceeds the context of {checkpoint.resolve(ckpt)} "
                            f"(max_position_embeddings {cfg.max_position_embeddings})")
        check_tensorflow_runs_jax2tf()  # before the checkpoint is read: a SavedModel nothing could run
        cfg, params = checkpoint.load_params(ckpt, dtype=dtype)
        cfg = cfg.replace(attention="xla", compute_dtype=dtype or cfg.compute_dtype)
        params = inference_params(cfg, params)  # stored as the forward reads them: no cast per call
        log.info("exporting %s (%s parameters, compute and weights %s, LayerNorms %s, attention xla, cache length "
                 "%d) to %s", checkpoint.resolve(ckpt), f"{cfg.num_params():,}", cfg.compute_dtype,
                 params["final_ln"]["scale"].dtype, T, out)

        def logits(p, tokens):
            return forward(cfg, p, tokens).astype(jnp.float32)

        def token_log_probs(p, tokens):
            lp = jax.nn.log_softmax(logits(p, tokens)[:, :-1], axis=-1)
            return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]

        def cache_out(last, cache: KVCache):
            return {"logits": last.astype(jnp.float32), "k": cache.k, "v": cache.v, "lengths": cache.lengths,
                    "index": cache.index}

        def prefill(p, tokens, lengths):
            B, S = tokens.shape
            mask = jnp.arange(S)[None, :] >= S - lengths[:, None]  # left padding, as generate builds it
            return cache_out(*extend(cfg, p, init_cache(cfg, B, T), tokens, mask, fresh=True))

        def decode(p, token, k, v, lengths, index):
            step = token[:, None]
            return cache_out(*extend(cfg, p, KVCache(k, v, lengths, index), step, jnp.ones_like(step, bool)))

        cache_dtype = _numerics(cfg)[0].name
        kv = (cfg.num_layers, None, cfg.num_heads, T, cfg.head_dim)
        tokens = ("tokens", "int32", (None, None), "(b, s)")
        context = f"s <= {cfg.max_position_embeddings}"  # no input longer than the model was trained on
        sigs = {
            "logits": _Signature(lambda p, t: {"logits": logits(p, t)}, (tokens,), (context,)),
            "token_log_probs": _Signature(lambda p, t: {"token_log_probs": token_log_probs(p, t)}, (tokens,),
                                          (context, "s >= 2")),
            "prefill": _Signature(prefill, (tokens, ("lengths", "int32", (None,), "(b,)")), (f"s <= {T}",),
                                  lambda tokens, lengths: _prefill_checks(tokens, lengths, T)),
            "decode": _Signature(decode, (("token", "int32", (None,), "(b,)"),
                                          ("k", cache_dtype, kv, "(_, b, _, _, _)"),
                                          ("v", cache_dtype, kv, "(_, b, _, _, _)"),
                                          ("lengths", "int32", (None,), "(b,)"),
                                          ("index", "int32", (), "()")),
                                 checks=lambda token, k, v, lengths, index: _decode_checks(index, T)),
        }
        t0 = time.perf_counter()
        _save(rep.path, params, sigs)
        (rep.path / "neox_jax.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        rep.commit()
    log.info("SavedModel written in %.1f s: %s (signatures %s; cache length %d)", time.perf_counter() - t0, out,
             ", ".join(SIGNATURES), T)
    return Path(out)


def _prefill_checks(tokens, lengths, T: int):
    import tensorflow as tf

    s = tf.shape(tokens)[1]
    return [tf.debugging.assert_less_equal(s, T, message=f"prefill: the prompts are longer than the cache length "
                                                         f"{T}"),
            tf.debugging.assert_greater_equal(lengths, 1, message="prefill: every lengths[i] must be >= 1"),
            tf.debugging.assert_less_equal(lengths, s, message="prefill: lengths[i] must be <= the tokens' "
                                                               "length")]


def _decode_checks(index, T: int):
    import tensorflow as tf

    return [tf.debugging.assert_less(index, T, message=f"decode: the cache is full (index must be < cache "
                                                       f"length {T})")]


def check_tensorflow_runs_jax2tf() -> None:
    """Run a one-line shape-polymorphic jax2tf function in TensorFlow; refuse (one line) when TF
    cannot.  jax2tf serializes StableHLO of a version about four weeks older than the running jax,
    and TensorFlow's bundled XLA reads only versions up to its own: jax 0.11.2's artifacts (StableHLO
    1.18) fail to load in TensorFlow 2.21 (1.13.7) at the first call, after the export had written a
    SavedModel that nothing can run.  (jax 0.10.2 with TensorFlow 2.21, and jax 0.11.2 with tf-nightly
    2.23, work.)"""
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    f = tf.function(jax2tf.convert(lambda x: x + 1, polymorphic_shapes=["(b,)"], with_gradient=False),
                    autograph=False, input_signature=[tf.TensorSpec([None], tf.int32)])
    try:
        f(tf.constant([1], tf.int32))
    except tf.errors.OpError as e:
        lines = [ln.strip() for ln in str(e.message).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "deserialize" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise UserError(f"TensorFlow {tf.__version__} cannot run what jax {jax.__version__}'s jax2tf writes "
                        f"({why[:200]}): use a TensorFlow whose XLA is as new as this jax's (jax 0.11 needs "
                        "TensorFlow newer than 2.21) or an older jax") from None


def _save(path: Path, params, sigs: dict[str, _Signature]) -> None:
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    leaves, treedef = jax.tree.flatten(params)
    module.params = [tf.Variable(np.asarray(x), trainable=False, name=f"p{i}") for i, x in enumerate(leaves)]
    signatures = {}
    for name, sig in sigs.items():
        converted = jax2tf.convert(sig.fn, polymorphic_shapes=[None] + [i[3] for i in sig.inputs],
                                   polymorphic_constraints=list(sig.constraints), with_gradient=False)
        specs = [tf.TensorSpec(shape, tf.dtypes.as_dtype(dt), name=n) for n, dt, shape, _ in sig.inputs]
        f = tf.function(_bound(converted, treedef, module, sig.checks), autograph=False, input_signature=specs)
        setattr(module, name, f)
        signatures[name] = f.get_concrete_function()
    tf.saved_model.save(module, str(path), signatures=signatures)


def _bound(converted, treedef, module, checks):
    """inputs -> converted(params, *inputs) (a dict: the signature's named outputs), the parameters
    read from the module's variables, after the signature's value checks."""
    import jax
    import tensorflow as tf

    def call(*inputs):
        with tf.control_dependencies(checks(*inputs) if checks else []):
            inputs = [tf.identity(x) for x in inputs]
        return converted(jax.tree.unflatten(treedef, module.params), *inputs)

    return call


# ----------------------------------------------------------------------------- command line


def register(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint as a TensorFlow SavedModel (jax2tf)",
                       description="Write CKPT as a TensorFlow SavedModel: parameters as variables, the forward "
                                   "pass as jax2tf's serialized StableHLO, signatures logits(tokens) and "
                                   "token_log_probs(tokens) for any batch and sequence length, and prefill(tokens, "
                                   "lengths) / decode(token, k, v, lengths, index) for KV-cached generation "
                                   "(docs/convert.md has a TensorFlow decoding loop).")
    p.add_argument("ckpt", help="neox-jax checkpoint (neox-jax convert makes one from HF or GPT-NeoX)")
    p.add_argument("out", help="SavedModel directory to create")
    p.add_argument("--dtype", choices=RUN_DTYPES,
                   help="parameter and compute dtype (default: the checkpoint's compute dtype; its weights are "
                        "then stored in that dtype, LayerNorms as they are). To serve on a CPU use float32: "
                        "CPUs emulate bf16 matmuls")
    p.add_argument("--cache-len", type=int, metavar="T",
                   help="KV-cache slots of prefill/decode: prompt plus generated tokens per row, fixed in the "
                        "SavedModel (default: the model's max_position_embeddings; smaller is less memory and "
                        "less work per decode step)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(run=_run)


def _run(args) -> None:
    import importlib.util

    # looked up, not imported: importing TensorFlow prints C++ log lines on stderr, so it waits until
    # every option, the checkpoint and OUT have been checked (an error is then one line)
    if importlib.util.find_spec("tensorflow") is None:
        raise UserError("export needs TensorFlow (pip install tensorflow)")
    export_saved_model(args.ckpt, args.out, dtype=args.dtype, cache_len=args.cache_len, overwrite=args.overwrite)
    print(json.dumps({"saved_model": str(args.out), "signatures": list(SIGNATURES)}))
