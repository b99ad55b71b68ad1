"""KV-cached generation: prefill, then a jitted `lax.while_loop` that appends one token per step.

The KV cache is an explicit pytree (`KVCache`): k, v [L, B, N, T, H] in the compute dtype, holding
each layer's rotated keys and values, plus per-row `lengths` (real tokens held) and one shared
`index` (the next slot to write).  Heads come before positions so that each (row, head) attends
over one contiguous [T, H] matrix: with [L, B, T, N, H] XLA transposes the cache every step (on
CPU, pythia-70m at batch 32, a decode step took 2.4x longer).  Prompts of different lengths are
**left-padded** to one length P, so every row writes the same slot each step; row b's real tokens
sit in slots [index - lengths[b], index), which is the attention mask over the cache, and its next
position (rotary) is lengths[b], as in HF `generate`.  T = P + max_new_tokens is fixed per call.

One function, `extend`, runs S new tokens against the cache (S = P for prefill, 1 per decode step):
every layer attends to the cached keys plus the new ones (`model.attention(..., past=...)`, a
softmax over both without concatenating the cache), the new keys and values come out of the layer
scan as [L, B, N, S, H] and are written into the cache with one `dynamic_update_slice` (in place
inside the loop), and the logits of the last position are returned.  With `ModelConfig.scan_layers`
false the layers run as straight-line code instead of a `lax.scan` (as in `model.forward`): longer
compiles, no loop inside each decode step.

Sampling (`Sampling`): temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k,
then top-p (the smallest set of most likely tokens whose probability reaches p), then a categorical
draw.  Ids at or above the tokenizer's vocabulary (`ModelConfig.real_vocab_size`; the embedding is
padded to a multiple of 128) are never chosen.  Each prompt draws from its own key,
`fold_in(fold_in(key(seed), prompt index), step)`, so a seed gives the same completion for a prompt
whatever the batch size or the other prompts.

Stopping: a row is done when it produces a stop token (the token is not part of the completion)
or, checked on the host between chunks of steps, when its decoded completion contains a stop
string (the text is cut before it); the loop ends when every row is done or max_new_tokens is
reached.  Streaming (`on_token`) uses an ordered `jax.debug.callback` from inside the loop, so the
device path never returns to Python per token.

Sharding: with a mesh, parameters are placed by `sharding.DECODE_RULES` (tensor parallelism only:
no FSDP all-gather per token) and the cache is split by heads over `tensor`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import RUN_DTYPES, ModelConfig
from .errors import UserError
from .model import (_numerics, abstract_params, attention_mask, block, layer_norm, logits_from_hidden, param_axes,
                    rotary_tables)
from .sharding import DECODE_RULES, constrain, make_mesh, tree_shardings

log = logging.getLogger(__name__)

CACHE_AXES = ("layers", "batch", "act_heads", "seq", "head_dim")
PAD_ID = 1  # <|padding|> in the GPT-NeoX tokenizer; only ever in masked slots


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.  temperature 0 = greedy; top_k 0 and top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, sampling: Sampling, real_vocab: int) -> jax.Array:
    """float32 logits [..., V] with every token that may not be drawn set to -inf: ids >= real_vocab,
    then (after / temperature) those outside the top-k, then those outside the top-p nucleus."""
    V = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if real_vocab < V:
        logits = jnp.where(jnp.arange(V) < real_vocab, logits, -jnp.inf)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < real_vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        keep = before < sampling.top_p  # the first token is always kept
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, sampling: Sampling, real_vocab: int) -> jax.Array:
    """One token per row of logits [B, V]; keys [B] (one PRNG key per row)."""
    logits = filter_logits(logits, sampling, real_vocab)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, N, T, H] rotated keys, compute dtype (heads before positions: see below)
    v: jax.Array  # [L, B, N, T, H]
    lengths: jax.Array  # [B] int32: real tokens held by each row
    index: jax.Array  # [] int32: next slot to write (shared: prompts are left-padded)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def valid(self) -> jax.Array:
        """[B, T] true for the slots holding a row's real tokens: index - lengths[b] <= t < index."""
        t = jnp.arange(self.max_len)[None, :]
        return (t >= (self.index - self.lengths)[:, None]) & (t < self.index)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    dtype, _ = _numerics(cfg)
    shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
    zeros = constrain(jnp.zeros(shape, dtype), CACHE_AXES, DECODE_RULES)
    return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32))


def unstack_layers(params, *, delete_stacked: bool = False):
    """The same parameters with `layers` as a list of per-layer trees instead of stacked [L, ...] arrays.

    For `scan_layers` false: `extend` then reads each layer's weights where they lie, instead of
    slicing them out of the stacked arrays inside the program (on CPU, pythia-70m at batch 1, the
    slicing made a decode step 1.5x slower).  Costs a copy of the layer weights while both exist;
    `delete_stacked` (for a caller that owns `params`) frees each stacked array as soon as its
    slices exist, so the extra memory is one stacked tensor at a time."""
    leaves, treedef = jax.tree.flatten(params["layers"])
    n = leaves[0].shape[0]
    per_leaf = []
    for a in leaves:
        per_leaf.append([a[i] for i in range(n)])
        if delete_stacked and sum(b is a for b in leaves) == 1:  # not a tensor that also sits elsewhere
            a.delete()
    layers = [jax.tree.unflatten(treedef, [sl[i] for sl in per_leaf]) for i in range(n)]
    return dict(params, layers=layers)


def extend(cfg: ModelConfig, params, cache: KVCache, tokens: jax.Array, new_mask: jax.Array, *,
           fresh: bool = False):
    """Run tokens [B, S] (new_mask [B, S]: false for left padding) after the cached ones.

    Returns (float32 logits [B, V] of the last position, the updated cache).  The caller makes
    sure index + S <= T.  With `cfg.scan_layers` false, params["layers"] may also be a list of
    per-layer trees (`unstack_layers`).  `fresh` (static): the cache is known to be empty (a prefill
    into `init_cache`), so the tokens attend only to each other and not to T empty slots."""
    dtype, _ = _numerics(cfg)
    B, S = tokens.shape
    new_mask = new_mask.astype(bool)
    positions = cache.lengths[:, None] + jnp.cumsum(new_mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
    cos, sin = rotary_tables(positions, cfg)
    mask = attention_mask(S, S, padding_mask=new_mask)
    past_mask = cache.valid()
    k_cache, v_cache = cache.k, cache.v
    if fresh:  # nothing cached: a zero-length past (no scores over empty slots, nothing constant to fold)
        k_cache, v_cache, past_mask = k_cache[..., :0, :], v_cache[..., :0, :], past_mask[:, :0]

    x = jnp.take(params["embed_in"]["embedding"], tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", "seq", "act_embed"), DECODE_RULES)

    def body(x, layer):
        p, k_past, v_past = layer
        x, (k, v) = block(cfg, p, x, cos, sin, mask, False, past=(k_past, v_past, past_mask))
        return x, (k.swapaxes(1, 2).astype(cache.k.dtype), v.swapaxes(1, 2).astype(cache.v.dtype))

    if cfg.scan_layers:
        x, (k_new, v_new) = jax.lax.scan(body, x, (params["layers"], k_cache, v_cache))
    else:  # straight-line layers (no loop inside the step)
        layers, new = params["layers"], []
        for i in range(cfg.num_layers):
            p = layers[i] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a, i=i: a[i], layers)
            x, kv = body(x, (p, k_cache[i], v_cache[i]))
            new.append(kv)
        k_new, v_new = (jnp.stack(t) for t in zip(*new))
    at = (0, 0, 0, cache.index, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_new, at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_new, at)
    cache = KVCache(
        k=constrain(k_all, CACHE_AXES, DECODE_RULES),
        v=constrain(v_all, CACHE_AXES, DECODE_RULES),
        lengths=cache.lengths + jnp.sum(new_mask, axis=1, dtype=jnp.int32),
        index=cache.index + S,
    )
    h = layer_norm(x[:, -1:], params["final_ln"], cfg.layer_norm_eps, dtype)
    return logits_from_hidden(cfg, params, h)[:, 0], cache


# ----------------------------------------------------------------------------- decode loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B, max_new] int32 generated tokens (PAD_ID after a row is done)
    step: jax.Array  # [] int32: tokens generated so far
    done: jax.Array  # [B] bool
    logits: jax.Array | None = None  # [B, max_new, V] float32, only with keep_logits (tests, tools)


def _row_keys(seed_key, row_ids, step):
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(seed_key, r), step))(row_ids)


def _emit(state: DecodeState, logits, key, row_ids, stop_ids, sampling, real_vocab, stream):
    """Choose the token of step `state.step` for every row and record it."""
    tok = sample_tokens(logits, _row_keys(key, row_ids, state.step), sampling, real_vocab)
    tok = jnp.where(state.done, PAD_ID, tok)
    stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=1) & ~state.done
    tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, state.step))
    kept = state.logits
    if kept is not None:
        kept = jax.lax.dynamic_update_slice(kept, logits[:, None], (0, state.step, 0))
    if stream is not None:
        jax.debug.callback(stream, state.step, tok, state.done | stopped, ordered=True)
    return DecodeState(state.cache, tokens, state.step + 1, state.done | stopped, kept)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new", "keep_logits", "stream"))
def prefill(cfg, sampling, params, tokens, mask, active, row_ids, key, stop_ids, *, max_new: int,
            keep_logits: bool = False, stream=None) -> DecodeState:
    """Fill a fresh cache (T = P + max_new) with the left-padded prompts and draw the first token."""
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + max_new)
    logits, cache = extend(cfg, params, cache, tokens, mask, fresh=True)
    kept = jnp.zeros((B, max_new, cfg.vocab_size), jnp.float32) if keep_logits else None
    state = DecodeState(cache, jnp.full((B, max_new), PAD_ID, jnp.int32), jnp.zeros((), jnp.int32), ~active, kept)
    return _emit(state, logits, key, row_ids, stop_ids, sampling, cfg.real_vocab_size, stream)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stream"), donate_argnames=("state",))
def decode(cfg, sampling, params, state: DecodeState, row_ids, key, stop_ids, limit, *, stream=None) -> DecodeState:
    """Generate until every row is done or `limit` tokens exist (limit <= max_new): one
    `lax.while_loop`, one new token per iteration, the cache updated in place."""

    def cond(s):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s):
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
        logits, cache = extend(cfg, params, s.cache, last, jnp.ones_like(last, bool))
        s = DecodeState(cache, s.tokens, s.step, s.done, s.logits)
        return _emit(s, logits, key, row_ids, stop_ids, sampling, cfg.real_vocab_size, stream)

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Completion:
    prompt_tokens: list[int]
    completion_tokens: list[int]  # without the stop token
    stop_reason: str  # "stop_token", "stop_string" or "length"
    text: str | None = None  # with a tokenizer: the decoded completion, cut before a stop string
    logits: np.ndarray | None = None  # [completion steps, V] with keep_logits


def decode_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, shapes=None):
    """NamedShardings for the parameters under DECODE_RULES (tensor parallelism, no FSDP)."""
    return tree_shardings(param_axes(cfg), mesh, shapes or abstract_params(cfg), rules=DECODE_RULES)


def decode_mesh(tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data = the rest, fsdp = 1, tensor) mesh for decoding."""
    devices = list(devices if devices is not None else jax.devices())
    if tensor < 1 or len(devices) % tensor:
        raise UserError(f"--tensor {tensor} does not divide the {len(devices)} available devices")
    return make_mesh(data=len(devices) // tensor, fsdp=1, tensor=tensor, devices=devices)


def _bucket(n: int, multiple: int = 16) -> int:
    """Prompt lengths padded to 16, 32, 64, ... so compiled shapes are reused."""
    b = multiple
    while b < n:
        b *= 2
    return b


def _check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty (generation needs at least one prompt token)")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new > cfg.max_position_embeddings:
            raise UserError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new} exceed the model's context "
                            f"of {cfg.max_position_embeddings} (max_position_embeddings)")


class Generator:
    """Jitted generation for one model (params already placed, optionally on a decode mesh).

    With `cfg.scan_layers` false the layer weights are held per layer (`unstack_layers`, once, here)
    and each decode step runs the layers as straight-line code."""

    def __init__(self, cfg: ModelConfig, params, *, mesh: jax.sharding.Mesh | None = None, tokenizer=None):
        if cfg.attention != "xla":
            raise UserError(f"generation uses the xla attention (cached single-token steps); the config asks "
                            f"for attention={cfg.attention!r}: set attention=xla")
        if not cfg.scan_layers and not isinstance(params["layers"], (list, tuple)):
            params = unstack_layers(params)
        log.info("decode: %s", "layers in a lax.scan (model.scan_layers)" if cfg.scan_layers else
                 "layers unrolled, weights held per layer (model.scan_layers false)")
        self.cfg, self.params, self.mesh, self.tokenizer = cfg, params, mesh, tokenizer
        self._on_token, self._stream_rows = None, []

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        batch_size: int = 8,
        keep_logits: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        progress: bool = False,
        chunk: int = 32,
    ) -> list[Completion]:
        """Complete every prompt (token id lists).  Prompts are sorted by length and run
        `batch_size` at a time; results come back in input order.  `on_token(prompt index, token)`
        is called from inside the decode loop as tokens are produced (streaming)."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if stop_strings and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer")
        _check_prompts(self.cfg, prompts, max_new_tokens)
        batch_size = min(batch_size, len(prompts))  # no idle rows for a lone prompt
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[Completion | None] = [None] * len(prompts)
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), disable=not progress, desc="generate", unit="prompt", dynamic_ncols=True)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            for i, c in zip(idx, self._batch([prompts[i] for i in idx], idx, max_new_tokens, sampling, seed,
                                             stop_tokens, stop_strings, batch_size, keep_logits, on_token, chunk)):
                out[i] = c
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _batch(self, prompts, ids, max_new, sampling, seed, stop_tokens, stop_strings, B, keep_logits, on_token,
               chunk):
        n = len(prompts)
        P = min(_bucket(max(len(p) for p in prompts)), self.cfg.max_position_embeddings - max_new)
        tokens = np.full((B, P), PAD_ID, np.int32)
        mask = np.zeros((B, P), bool)
        for r, p in enumerate(prompts):
            tokens[r, P - len(p):] = p
            mask[r, P - len(p):] = True
        active = np.arange(B) < n
        row_ids = np.array(list(ids) + [0] * (B - n), np.int32)
        stop_ids = np.array(sorted(set(int(t) for t in stop_tokens)) or [-1], np.int32)
        key = jax.random.key(seed)
        stream = self._stream if on_token is not None else None
        self._on_token, self._stream_rows = on_token, list(ids)
        args = [jnp.asarray(a) for a in (tokens, mask, active, row_ids)]
        with mesh_context(self.mesh):
            state = prefill(self.cfg, sampling, self.params, *args, key, jnp.asarray(stop_ids), max_new=max_new,
                            keep_logits=keep_logits, stream=stream)
            step = 1
            host_done = np.zeros(B, bool)
            while True:
                limit = max_new if not stop_strings else min(max_new, step + chunk)
                if step < limit:
                    state = decode(self.cfg, sampling, self.params, state, args[3], key, jnp.asarray(stop_ids),
                                   jnp.int32(limit), stream=stream)
                step = int(state.step)
                done = np.asarray(state.done)
                if stop_strings:
                    gen = np.asarray(state.tokens)
                    for r in range(n):
                        if not done[r] and self._find_stop(gen[r, :step], stop_strings) is not None:
                            host_done[r] = True
                    if host_done[:n].any() and not (done | host_done)[:n].all():
                        state = dataclasses.replace(state, done=state.done | jnp.asarray(host_done))
                if step >= max_new or (done | host_done)[:n].all():
                    break
        gen = np.asarray(state.tokens)
        logits = np.asarray(state.logits) if keep_logits else None
        results = []
        stop_set = set(int(t) for t in stop_tokens)
        for r, p in enumerate(prompts):
            toks = [int(t) for t in gen[r, :step]]
            reason = "length"
            for j, t in enumerate(toks):
                if t in stop_set:
                    toks, reason = toks[:j], "stop_token"
                    break
            text = None
            if stop_strings:
                cut = self._find_stop(toks, stop_strings)
                if cut is not None:
                    toks, text, reason = cut[0], cut[1], "stop_string"
            if text is None and self.tokenizer is not None:
                text = self.tokenizer.decode(toks)
            results.append(Completion([int(t) for t in p], toks, reason, text,
                                      None if logits is None else logits[r, : len(toks) + (reason == "stop_token")]))
        return results

    def _find_stop(self, toks, stop_strings):
        """(the shortest token prefix whose text contains a stop string, that text cut before the
        first stop string) or None."""
        dec = lambda ts: self.tokenizer.decode([int(t) for t in ts])  # noqa: E731
        if not any(s and s in dec(toks) for s in stop_strings):
            return None
        for j in range(1, len(toks) + 1):
            text = dec(toks[:j])
            hits = [text.find(s) for s in stop_strings if s and s in text]
            if hits:
                return list(toks[:j]), text[: min(hits)]
        raise AssertionError("unreachable")

    def _stream(self, step, tok, done):
        """Host side of the in-loop `jax.debug.callback` (one compiled callback per Generator)."""
        if self._on_token is None:
            return
        for r, i in enumerate(self._stream_rows):
            if not done[r]:
                self._on_token(int(i), int(tok[r]))


class mesh_context:
    """`with mesh_context(mesh):` is `jax.set_mesh(mesh)`, or nothing when mesh is None."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.ctx = None

    def __enter__(self):
        if self.mesh is not None:
            self.ctx = jax.set_mesh(self.mesh)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def load_generator(ckpt: str, *, dtype: str = "float32", tensor: int = 1, tokenizer=None,
                   overrides: dict[str, Any] | None = None, int8: bool = False) -> Generator:
    """Restore a checkpoint for decoding: parameters cast to `dtype` (also the compute dtype), with
    tensor > 1 placed directly on a decode mesh (each device reads only its shard).  int8: the
    matmul weights then quantized to int8 with per-channel scales (neox_jax/quant.py)."""
    from . import quant
    from .checkpoint import load_params, read_config

    if dtype not in RUN_DTYPES:
        raise UserError(f"dtype must be one of {RUN_DTYPES}, got {dtype!r}")
    mesh = decode_mesh(tensor) if tensor > 1 else None
    cfg = read_config(ckpt)
    shardings = decode_shardings(cfg, mesh) if mesh is not None else None
    cfg, params = load_params(ckpt, dtype=dtype, shardings=shardings)
    cfg = cfg.replace(compute_dtype=dtype, **(overrides or {}))
    if int8:
        before = quant.nbytes(params)
        out = None if shardings is None else quant.quantized_shardings(shardings, abstract_params(cfg))
        params = jax.jit(quant.quantize_params, out_shardings=out, donate_argnums=0)(params)
        log.info("int8 weights (per-channel scales; embedding, LayerNorms and biases as loaded): parameters "
                 "%.1f MiB -> %.1f MiB", before / 2**20, quant.nbytes(params) / 2**20)
    if not cfg.scan_layers:  # ours alone: free each stacked weight once it is split
        params = unstack_layers(params, delete_stacked=True)
    return Generator(cfg, params, mesh=mesh, tokenizer=tokenizer)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, mesh=None, tokenizer=None,
             **kwargs) -> list[Completion]:
    """Convenience wrapper: `Generator(cfg, params, mesh=..., tokenizer=...).generate(prompts, ...)`."""
    return Generator(cfg, params, mesh=mesh, tokenizer=tokenizer).generate(prompts, **kwargs)
