"""`neox-jax export`: a checkpoint as a TensorFlow SavedModel (jax2tf), for TF Serving, TF.js
converters or any TensorFlow program.

    neox-jax export ckpt/pythia-160m exported/pythia-160m [--dtype bfloat16]

The SavedModel holds the parameters as TF variables (no 2 GiB graph-constant limit) and the model as
the StableHLO that `jax2tf` serializes (native serialization: TF runs XLA's program for our forward
pass, so the exported numbers are ours, not a re-implementation).  Batch and sequence length are
symbolic (any `[b, s]` with 1 <= s <= max_position_embeddings).  Signatures:

    logits(tokens int32 [b, s])          -> float32 [b, s, V]   V: the padded vocabulary
    token_log_probs(tokens int32 [b, s]) -> float32 [b, s-1]    log p(tokens[:, t+1] | tokens[:, :t+1]),
                                                                s >= 2

Attention is XLA's (portable; a cuDNN-only program would not run on CPU or TPU).  `neox_jax.json`
beside the SavedModel files holds the model config.  Tested against HF transformers' logits on the
same weights (tests/export_test.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import atomic
from .config import RUN_DTYPES
from .errors import UserError

log = logging.getLogger(__name__)


def export_saved_model(ckpt: str, out: str, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write CKPT as a SavedModel directory OUT (atomically: OUT appears complete or not at all)."""
    import jax
    import jax.numpy as jnp

    from . import checkpoint
    from .model import forward

    rep = atomic.Replacement([out], overwrite=overwrite, directory=True)  # refuses a bad OUT before any work
    with rep:
        cfg, params = checkpoint.load_params(ckpt, dtype=dtype)
        cfg = cfg.replace(attention="xla", compute_dtype=dtype or cfg.compute_dtype)
        log.info("exporting %s (%s parameters, %s, attention xla) to %s", checkpoint.resolve(ckpt),
                 f"{cfg.num_params():,}", cfg.compute_dtype, out)

        def logits(p, tokens):
            return forward(cfg, p, tokens).astype(jnp.float32)

        def token_log_probs(p, tokens):
            lp = jax.nn.log_softmax(logits(p, tokens)[:, :-1], axis=-1)
            return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]

        t0 = time.perf_counter()
        _save(rep.path, params, {"logits": (logits, 1), "token_log_probs": (token_log_probs, 2)},
              cfg.max_position_embeddings)
        (rep.path / "neox_jax.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        rep.commit()
    log.info("SavedModel written in %.1f s: %s (signatures logits, token_log_probs)", time.perf_counter() - t0, out)
    return Path(out)


def _save(path: Path, params, fns: dict, max_len: int) -> None:
    """fns: signature name -> (fn(params, tokens), the shortest sequence it takes)."""
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    leaves, treedef = jax.tree.flatten(params)
    module.params = [tf.Variable(np.asarray(x), trainable=False, name=f"p{i}") for i, x in enumerate(leaves)]
    spec = tf.TensorSpec([None, None], tf.int32, name="tokens")
    signatures = {}
    for name, (fn, min_len) in fns.items():
        # the rotary table is built for positions below max_len
        constraints = [f"s <= {max_len}"] + ([f"s >= {min_len}"] if min_len > 1 else [])
        converted = jax2tf.convert(fn, polymorphic_shapes=[None, "(b, s)"], polymorphic_constraints=constraints,
                                   with_gradient=False)

        f = tf.function(_bound(converted, treedef, module, name), autograph=False, input_signature=[spec])
        setattr(module, name, f)
        signatures[name] = f.get_concrete_function()
    tf.saved_model.save(module, str(path), signatures=signatures)


def _bound(converted, treedef, module, name: str):
    """tokens -> {name: converted(params, tokens)}, the parameters read from the module's variables
    (the dict names the signature's output)."""
    import jax

    def call(tokens):
        return {name: converted(jax.tree.unflatten(treedef, module.params), tokens)}

    return call


# ----------------------------------------------------------------------------- command line


def register(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint as a TensorFlow SavedModel (jax2tf)",
                       description="Write CKPT as a TensorFlow SavedModel: parameters as variables, the forward "
                                   "pass as jax2tf's serialized StableHLO, signatures logits(tokens) and "
                                   "token_log_probs(tokens) for any batch and sequence length.")
    p.add_argument("ckpt", help="neox-jax checkpoint (neox-jax convert makes one from HF or GPT-NeoX)")
    p.add_argument("out", help="SavedModel directory to create")
    p.add_argument("--dtype", choices=RUN_DTYPES, help="parameter and compute dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(run=_run)


def _run(args) -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise UserError("export needs TensorFlow (pip install tensorflow)") from None
    export_saved_model(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps({"saved_model": str(args.out), "signatures": ["logits", "token_log_probs"]}))
