"""The jitted train step on 8 simulated CPU devices: every mesh gives the single-device result, the
compiled HLO has the collectives it should (and none it should not), gradient accumulation equals
one large batch, the vocabulary-parallel cross-entropy equals the plain one, and an overflowing
fp16 step changes nothing but the counters and the loss scale."""

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import model as M
from neox_jax.sharding import make_mesh
from neox_jax.train import state as S
from neox_jax.train import step as T
from neox_jax.train.config import from_sections

B, SEQ, V = 8, 32, 512
# fp32 tolerance of a sharded computation against the single-device one (reduction order only)
RTOL, ATOL = 2e-5, 2e-6


def run_config(optimizer=None, **model):
    m = {"preset": "tiny", "vocab_size": V, "tokenizer_vocab_size": 0, "max_position_embeddings": 1024,
         "compute_dtype": "float32", **model}
    return from_sections({"model": m, "data": {"path": "unused", "seq_length": SEQ},
                          "optimizer": {"lr": 1e-3, "warmup": 0.0, "weight_decay": 0.1, "clip": 1.0, **(optimizer or {})},
                          "train": {"steps": 10, "batch_size": B}})


def mesh_of(shape):
    return make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


def tokens(seed=0, batch=B, seq=SEQ):
    return np.random.RandomState(seed).randint(0, V, (batch, seq + 1)).astype(np.int32)


def put(mesh, toks):
    return {"tokens": jax.device_put(toks, T.batch_sharding(mesh))}


def steps_on(run, shape, batches):
    """(params after len(batches) steps, per-step metrics) on a mesh."""
    mesh = mesh_of(shape)
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    out = []
    with jax.set_mesh(mesh):
        state = S.init_state(run, mesh, opt, shardings=sh)
        step = T.make_train_step(run, mesh, opt, sh)
        for b in batches:
            state, m = step(state, put(mesh, b))
            out.append(jax.device_get(m))
    return jax.device_get(state), out


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope="module")
def reference():
    run = run_config()
    mesh = mesh_of((1, 1, 1))
    params = M.init_params(run.model, run.train.seed)
    with jax.set_mesh(mesh):
        loss, grads = T.loss_and_grads(run, mesh, S.param_shardings(run, mesh))(params, put(mesh, tokens()))
    state, metrics = steps_on(run, (1, 1, 1), [tokens(s) for s in range(3)])
    return jax.device_get((loss, grads)), state, metrics


@pytest.mark.parametrize("shape", MESHES[1:], ids=[f"mesh{m}" for m in MESHES[1:]])
def test_loss_grads_and_three_steps_match_single_device(shape, reference, record_property):
    (ref_loss, ref_grads), ref_state, ref_metrics = reference
    run = run_config()
    mesh = mesh_of(shape)
    psh = S.param_shardings(run, mesh)
    params = M.init_params(run.model, run.train.seed, mesh=mesh)
    with jax.set_mesh(mesh):
        loss, grads = T.loss_and_grads(run, mesh, psh)(params, put(mesh, tokens()))
    assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
    worst = 0.0
    for (name, g), r in zip(M.flatten(jax.device_get(grads)).items(), M.flatten(ref_grads).values()):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL * float(np.abs(r).max() + 1e-30), err_msg=name)
        worst = max(worst, float(np.abs(g - r).max() / (np.abs(r).max() + 1e-30)))
    state, metrics = steps_on(run, shape, [tokens(s) for s in range(3)])
    for m, r in zip(metrics, ref_metrics):
        assert float(m["loss"]) == pytest.approx(float(r["loss"]), rel=RTOL)
        assert float(m["grad_norm"]) == pytest.approx(float(r["grad_norm"]), rel=1e-4)
    assert_params_close(state.params, ref_state.params, lr=run.optimizer.lr, steps=3)
    record_property("measured", f"mesh {shape}: max |dgrad| / max |grad| {worst:.1e} vs 1 device")


def assert_params_close(params, ref, *, lr, steps, rtol=1e-4, atol=None):
    """Parameters after a few AdamW steps.  Adam divides by sqrt(v): where an element's gradient is
    tiny, a rounding difference in it moves the update by a visible fraction of lr, so elements may
    differ by 1% of lr per step (the gradients themselves are compared strictly elsewhere).  The key
    bias is the extreme case: its true gradient is zero (softmax is invariant to adding q.b_k to every
    score of a row), so its gradient is rounding noise that Adam turns into steps of up to lr."""
    atol = 1e-2 * lr * steps if atol is None else atol
    ref = M.flatten(ref)
    worst = 0.0
    for name, p in M.flatten(params).items():
        r = ref[name]
        if name == "layers/attn/qkv/bias":
            np.testing.assert_allclose(p[:, 1], r[:, 1], atol=steps * lr, err_msg=name + " (keys)")
            p, r = p[:, ::2], r[:, ::2]  # queries and values
        np.testing.assert_allclose(p, r, rtol=rtol, atol=atol, err_msg=name)
        worst = max(worst, float(np.abs(np.asarray(p) - np.asarray(r)).max()))
    return worst


def _collectives(hlo: str) -> list[tuple[str, str]]:
    """(op kind, result type) of every collective in a compiled HLO module."""
    pat = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
    return [(m.group(2), m.group(1)) for m in map(pat.search, hlo.splitlines()) if m]


def _lowered_step(run, shape):
    """The train step lowered (not compiled) for abstract state and batch on a mesh."""
    mesh = mesh_of(shape)
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    with jax.set_mesh(mesh):
        batch = {"tokens": jax.ShapeDtypeStruct((B, SEQ + 1), np.int32, sharding=T.batch_sharding(mesh))}
        return T.make_train_step(run, mesh, opt, sh).lower(S.abstract_state(run, opt, sh), batch)


def _compiled_step(run, shape):
    return _lowered_step(run, shape).compile().as_text()


def test_single_device_step_has_no_collectives():
    assert _collectives(_compiled_step(run_config(), (1, 1, 1))) == []


def test_sharded_step_never_gathers_the_vocabulary(record_property):
    """On (1, 2, 4) the vocabulary is split 4 ways.  No collective may carry a whole-vocabulary
    dimension (V = 512 appears in no other shape): the logits are never gathered, nor the embedding or
    head tables over `tensor`.  Data parallelism over fsdp shows up as all-gathers of weights and a
    reduction of the gradients; tensor parallelism as all-reduces."""
    colls = _collectives(_compiled_step(run_config(), (1, 2, 4)))
    kinds = collections.Counter(k for k, _ in colls)
    record_property("measured", f"train step on mesh (1,2,4): {dict(kinds)}")
    assert kinds["all-reduce"] > 0 and kinds["all-gather"] > 0
    for kind, shape in colls:
        assert not re.search(rf"[\[,]{V}[\],]", shape), (kind, shape)


def test_tensor_parallel_forward_reductions():
    """Pure tensor parallelism (1, 1, 4), forward loss, 2 unrolled layers.  What we count, and why:
    * [B, S, D] activations are all-reduced once per layer for the parallel residual (the row-parallel
      attention-out and MLP-out partial sums travel in one collective), twice for the sequential form,
      plus once for the vocabulary-parallel embedding lookup;
    * the cross-entropy over the split vocabulary reduces [B, S] values only (max, sum of exponentials,
      target logit);
    * nothing is all-gathered (every weight is already local)."""
    for parallel, per_layer in ((True, 1), (False, 2)):
        run = run_config(scan_layers=False, use_parallel_residual=parallel)
        mesh = mesh_of((1, 1, 4))

        def loss(p, b):
            return T.loss_sums(run, p, b, mesh)[0]

        f = jax.jit(loss, in_shardings=(S.param_shardings(run, mesh), T.batch_sharding(mesh)))
        with jax.set_mesh(mesh):
            ab = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), M.abstract_params(run.model))
            hlo = f.lower(ab, {"tokens": jax.ShapeDtypeStruct((B, SEQ + 1), np.int32)}).compile().as_text()
        colls = _collectives(hlo)
        D = run.model.hidden_size
        acts = [s for k, s in colls if k == "all-reduce" and f"f32[{B},{SEQ},{D}]" in s]
        positions = [s for k, s in colls if k == "all-reduce" and f"f32[{B},{SEQ},{D}]" not in s]
        assert len(acts) == per_layer * run.model.num_layers + 1, (parallel, colls)
        assert positions and all(re.fullmatch(rf"\(?(f32\[{B},{SEQ}(,1)?\]\{{[\d,]+\}}(, )?)+\)?", s)
                                 for s in positions), positions
        assert not [k for k, _ in colls if k != "all-reduce"], colls


def test_gradient_accumulation_equals_one_batch():
    """4 micro-batches of 2 rows, accumulated in the step, equal one batch of 8 (fp32)."""
    batches = [tokens(s) for s in range(2)]
    one, m1 = steps_on(run_config(), (2, 1, 1), batches)
    acc_run = from_sections({**run_config().to_dict(), "train": {**run_config().to_dict()["train"], "grad_accum": 4}})
    four, m4 = steps_on(acc_run, (2, 1, 1), batches)
    for a, b in zip(m1, m4):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert_params_close(four.params, one.params, lr=1e-3, steps=2, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_parallel_cross_entropy_equals_plain(tied):
    """shard_map cross-entropy on (1, 2, 4), with 2 chunks of 256 positions, against the unsharded
    reference computed with a NumPy log-softmax of the full logits."""
    run = run_config(tie_word_embeddings=tied)
    seq = 512
    params = M.init_params(run.model, 1)
    toks = tokens(3, batch=4, seq=seq)
    inputs, targets = toks[:, :-1], toks[:, 1:]
    logits = np.asarray(jax.jit(lambda p, t: M.forward(run.model, p, t))(params, inputs), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse

    mesh = mesh_of((1, 2, 4))
    assert T.use_vocab_parallel(run, mesh)
    sharded = M.init_params(run.model, 1, mesh=mesh)
    with jax.set_mesh(mesh):
        f = jax.jit(lambda p, a, b: T.token_scores(run, p, a, b, mesh=mesh))
        tgt, l = f(sharded, jnp.asarray(inputs), jnp.asarray(targets))
        grad = jax.jit(jax.grad(lambda p: jnp.mean(jnp.subtract(*T.token_scores(run, p, inputs, targets, mesh=mesh)))))(sharded)
    np.testing.assert_allclose(np.asarray(tgt) - np.asarray(l), want, rtol=1e-5, atol=1e-5)
    ref_grad = jax.jit(jax.grad(lambda p: jnp.mean(jnp.subtract(*T.token_scores(run, p, inputs, targets)))))(params)
    for name, g in M.flatten(jax.device_get(grad)).items():
        r = M.flatten(jax.device_get(ref_grad))[name]
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(np.abs(r).max() + 1e-30), err_msg=name)


def test_overflowing_fp16_step_is_skipped():
    """fp16 compute with a loss scale of 2^127: the scaled loss overflows, so the step applies nothing
    (parameters, Adam moments and the LR-schedule count stay bit-identical), the step counter and data
    position advance, and the scale halves (hysteresis 1); DeepSpeed's rule."""
    run = run_config(compute_dtype="float16",
                     optimizer={"loss_scale": "dynamic", "initial_scale_power": 127, "hysteresis": 1})
    mesh = mesh_of((1, 1, 1))
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    with jax.set_mesh(mesh):
        state = S.init_state(run, mesh, opt, shardings=sh)
        before = jax.device_get(state)
        state, m = T.make_train_step(run, mesh, opt, sh)(state, put(mesh, tokens()))
        after = jax.device_get(state)
    assert bool(m["skipped"]) and float(m["loss_scale"]) == 2.0 ** 127
    assert int(after.step) == 1 and int(after.updates) == 0
    assert float(after.loss_scale.scale) == 2.0 ** 126
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss_chunk", [256, 0])
def test_training_never_holds_the_whole_logits(loss_chunk, record_property):
    """Gradient of the loss at S 2048, V 50304: the compiled temporary memory stays below the size of
    the float32 [B, S, V] logits, because each 256-position chunk (train.loss_chunk) is recomputed in
    the backward pass (without the rematerialisation it measured 1.2 GB against 786 MB of logits);
    `loss_chunk: 0` (the whole sequence at once, a throughput lever) does hold them."""
    run = from_sections({"model": {"preset": "tiny", "max_position_embeddings": 2048, "num_heads": 1},
                         "data": {"path": "unused", "seq_length": 2048},
                         "train": {"steps": 1, "batch_size": 2, "loss_chunk": loss_chunk}})
    mesh = mesh_of((1, 1, 1))
    f = T.loss_and_grads(run, mesh, S.param_shardings(run, mesh))
    with jax.set_mesh(mesh):
        ab = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), M.abstract_params(run.model))
        mem = f.lower(ab, {"tokens": jax.ShapeDtypeStruct((2, 2049), np.int32)}).compile().memory_analysis()
    logits = 2 * 2048 * run.model.vocab_size * 4
    record_property("measured", f"S 2048 B 2 loss_chunk {loss_chunk}: temp {mem.temp_size_in_bytes / 2**20:.0f} MiB "
                    f"vs logits {logits / 2**20:.0f} MiB")
    if loss_chunk:
        assert mem.temp_size_in_bytes < 0.75 * logits
    else:
        assert mem.temp_size_in_bytes > logits


def test_loss_chunk_does_not_change_the_loss():
    rs = np.random.RandomState(3)
    toks = {"tokens": jnp.asarray(rs.randint(0, V, (B, SEQ + 1)).astype(np.int32))}
    out = []
    for chunk in (0, 8, 16):  # whole, 4 chunks, 2 chunks
        run = run_config()
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, loss_chunk=chunk))
        params = M.init_params(run.model, 0)
        out.append(float(jax.jit(lambda p, b: T.loss_sums(run, p, b)[0])(params, toks)))
    assert out[0] == pytest.approx(out[1], rel=1e-6) and out[0] == pytest.approx(out[2], rel=1e-6), out


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_chunk_does_not_change_the_gradient(z_loss):
    """The chunked cross-entropy (each chunk rematerialised) and the whole-sequence one (logits kept)
    give the same parameter gradients, with and without the z-loss (which flows through the lse)."""
    toks = {"tokens": jnp.asarray(tokens(5))}
    grads = []
    for chunk in (0, 8):  # whole; 4 chunks of 8 positions
        run = run_config(optimizer={"z_loss": z_loss})
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, loss_chunk=chunk))
        mesh = mesh_of((1, 1, 1))
        with jax.set_mesh(mesh):
            _, g = T.loss_and_grads(run, mesh, S.param_shardings(run, mesh))(M.init_params(run.model, 0), toks)
        grads.append(M.flatten(jax.device_get(g)))
    for name, g in grads[0].items():
        r = grads[1][name]
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL * float(np.abs(r).max() + 1e-30), err_msg=name)


def test_per_document_attention_in_the_loss():
    """With segment ids (data.segment_ids), each document in a packed row is scored as if it were
    alone: the per-position log-probabilities inside every document equal a run on that document by
    itself (rotary attention depends only on relative positions, so no position reset is needed)."""
    run = run_config()
    params = M.init_params(run.model, 2)
    rs = np.random.RandomState(4)
    docs = [rs.randint(1, V, n).astype(np.int32) for n in (11, 7, 14)]
    row = np.concatenate([np.append(d, 0) for d in docs])  # each document closed by EOD (id 0)
    from neox_jax.data.loader import segment_ids_from_eod

    seg = segment_ids_from_eod(row, 0)
    tgt, lse = jax.jit(lambda p, a, b, s: T.token_scores(run, p, a, b, s))(
        params, row[None, :-1], row[None, 1:], seg[None, :-1])
    packed = np.asarray(tgt - lse)[0]
    start = 0
    for d in docs:
        alone = np.append(d, 0)
        t, l = jax.jit(lambda p, a, b: T.token_scores(run, p, a, b))(params, alone[None, :-1], alone[None, 1:])
        n = len(alone) - 1  # predictions inside the document (its last target is its EOD)
        np.testing.assert_allclose(packed[start:start + n], np.asarray(t - l)[0], rtol=1e-5, atol=1e-5)
        start += len(alone)


@pytest.mark.parametrize("attention", ["xla", "none"])
def test_bf16_step_has_no_float32_matmuls(attention):
    """With bf16 compute every matmul of the train step, backward included, takes bf16 operands (the
    optimizer and the loss reductions are not matmuls).  A float32 x float32 dot_general in the lowered
    program is a float32/TF32 GEMM on a GPU: the H200 profile found two per step (the vocab head's
    backward), 7% of the step, before `einsum_f32_out`.  `none` = the tied-embedding head."""
    model = {"compute_dtype": "bfloat16"} | ({"tie_word_embeddings": True} if attention == "none" else {})
    text = _lowered_step(run_config(**model), (1, 1, 1)).as_text()
    dots = [ln for ln in text.splitlines() if "dot_general" in ln]
    sig = re.compile(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)")
    typed = [sig.search(ln) for ln in dots]
    assert dots and all(typed), dots[:3]
    f32 = [ln.strip()[:160] for ln, m in zip(dots, typed) if m.group(1).endswith("xf32>") and m.group(2).endswith("xf32>")]
    assert not f32, f32
    assert any(m.group(1).endswith("xbf16>") for m in typed)


@pytest.mark.parametrize("wide", [False, True])
def test_fp32_allreduce_reduces_gradients_in_float32(wide, record_property):
    """Data parallelism (8, 1, 1), bf16 compute: in the program as XLA's partitioner writes it (before
    the CPU backend widens bf16 collectives), the gradients' all-reduces are bf16 by default and all
    float32 with `model.fp32_allreduce` (GPT-NeoX's fp32_allreduce)."""
    from neox_jax.train.plan import compile_with_partitioned_module

    run = run_config(compute_dtype="bfloat16", fp32_allreduce=wide)
    _, text = compile_with_partitioned_module(_lowered_step(run, (8, 1, 1)), "jit_step")
    reduced = collections.Counter(t for kind, types in _collectives(text) if kind == "all-reduce"
                                  for t in re.findall(r"\b(bf16|f32)\[", types))
    record_property("measured", f"fp32_allreduce={wide}: all-reduce operands by type {dict(reduced)}")
    assert reduced["f32"] > 0
    assert (reduced["bf16"] == 0) if wide else (reduced["bf16"] >= 4), reduced
