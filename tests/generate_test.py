"""KV-cached generation against HF `generate`, a full forward recomputation, and sampling statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from hf_reference import hf_model, ours_from_hf
from neox_jax import model as M
from neox_jax.errors import UserError
from neox_jax.generate import (Generator, Sampling, decode_mesh, decode_shardings, extend, filter_logits, generate,
                               init_cache, sample_tokens)

# prompt lengths: 16 and 32 fill their length bucket exactly (no padding when alone)
LENGTHS = (1, 5, 16, 12, 32, 7)
MAX_NEW = 12
B = 6  # most tests run one batch of 6 left-padded to 32, so they share compiled functions (CPU compiles are slow)

CONFIGS = {
    "parallel-untied-erf-pct0.25": dict(vocab=211, hidden=64, heads=4, parallel=True, tied=False, act="gelu"),
    "sequential-tied-tanh-pct1.0": dict(vocab=211, hidden=64, heads=2, rotary_pct=1.0, parallel=False, tied=True,
                                        act="gelu_fast"),
}


def _prompts(vocab, lengths=LENGTHS, seed=0):
    rs = np.random.RandomState(seed)
    return [[int(t) for t in rs.randint(2, vocab, n)] for n in lengths]


def hf_greedy(model, prompts, max_new, eos=None):
    """HF generate(do_sample=False): each prompt alone, and all together left-padded."""
    alone = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=1)
        alone.append(out[0, len(p):].tolist())
    S = max(map(len, prompts))
    ids = torch.tensor([[1] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=1)
    return alone, [row[S:].tolist() for row in out]


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def hf_and_ours(request):
    model = hf_model(seed=1, **CONFIGS[request.param])
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    return model, cfg, params


def test_greedy_equals_hf_generate(hf_and_ours, record_property):
    model, cfg, params = hf_and_ours
    prompts = _prompts(cfg.vocab_size)
    alone, padded = hf_greedy(model, prompts, MAX_NEW)
    assert alone == padded  # HF itself: left padding changes nothing
    batched = generate(cfg, params, prompts, max_new_tokens=MAX_NEW, batch_size=B)  # one left-padded batch
    single = generate(cfg, params, [prompts[2]], max_new_tokens=MAX_NEW, batch_size=1)  # 16 tokens: no padding
    assert single[0].completion_tokens == alone[2]
    for i, (b, ref) in enumerate(zip(batched, alone)):
        assert b.completion_tokens == ref, (i, b.completion_tokens, ref)
        assert b.prompt_tokens == prompts[i] and b.stop_reason == "length"
    distinct = len({t for r in alone for t in r})
    record_property("measured", f"greedy == HF generate on {len(prompts)} prompts x {MAX_NEW} tokens "
                                f"({distinct} distinct tokens)")


def test_stop_token_matches_hf_eos(hf_and_ours):
    model, cfg, params = hf_and_ours
    prompts = _prompts(cfg.vocab_size, (9, 3, 20, 1, 6, 25))
    alone, _ = hf_greedy(model, prompts, MAX_NEW)
    # a token that some completion first produces at a step j >= 1 becomes the stop token
    row, j = next((r, j) for r in range(len(prompts)) for j in range(1, MAX_NEW) if alone[r][j] not in alone[r][:j])
    eos = alone[row][j]
    ref, _ = hf_greedy(model, prompts, MAX_NEW, eos=eos)
    ours = generate(cfg, params, prompts, max_new_tokens=MAX_NEW, stop_tokens=[eos], batch_size=B)
    for r, h in zip(ours, ref):
        if eos in h:  # HF keeps the eos token; ours ends before it
            assert r.stop_reason == "stop_token" and r.completion_tokens == h[: h.index(eos)]
        else:
            assert r.stop_reason == "length" and r.completion_tokens == h
    assert ours[row].completion_tokens == alone[row][:j]


def test_unrolled_layers_equal_hf_generate(hf_and_ours):
    """scan_layers false: the layers of each decode step as straight-line code (no loop), same tokens."""
    model, cfg, params = hf_and_ours
    prompts = _prompts(cfg.vocab_size, seed=2)
    alone, _ = hf_greedy(model, prompts, MAX_NEW)
    unrolled = cfg.replace(scan_layers=False)
    ours = generate(unrolled, params, prompts, max_new_tokens=MAX_NEW, batch_size=B)
    assert [r.completion_tokens for r in ours] == alone
    cache = init_cache(cfg, 2, 8)
    tokens = jnp.ones((2, 1), jnp.int32)
    loops = {c.scan_layers: jax.jit(extend, static_argnums=0).lower(c, params, cache, tokens, tokens > 0).as_text()
             .count("stablehlo.while") for c in (cfg, unrolled)}
    assert loops == {True: 1, False: 0}


@pytest.fixture(scope="module")
def base():
    """The first CONFIGS model again: same config, so the tests below reuse compiled functions."""
    return ours_from_hf(hf_model(seed=1, **CONFIGS["parallel-untied-erf-pct0.25"]), compute_dtype="float32")


@pytest.mark.parametrize("rotary_dtype", ["float32", "float16"])
def test_cached_logits_equal_full_forward(rotary_dtype, base, record_property):
    """Every step's logits from the cache equal forward() over prompt + generated tokens."""
    cfg, params = base
    cfg = cfg.replace(rotary_dtype=rotary_dtype)
    prompts = _prompts(cfg.vocab_size, (3, 17, 8, 30, 1, 12), seed=1)
    res = generate(cfg, params, prompts, max_new_tokens=MAX_NEW, batch_size=B, keep_logits=True,
                   sampling=Sampling(temperature=1.0), seed=3)
    fwd = jax.jit(lambda p, t: M.forward(cfg, p, t))
    worst = 0.0
    for p, r in zip(prompts, res):
        seq = np.zeros((1, 48), np.int32)  # one compiled forward for every row
        seq[0, : len(p) + len(r.completion_tokens)] = p + r.completion_tokens
        full = np.asarray(fwd(params, jnp.asarray(seq)))[0]
        ref = full[len(p) - 1 : len(p) - 1 + len(r.completion_tokens)]
        assert r.logits.shape == ref.shape == (MAX_NEW, cfg.vocab_size)
        err = np.max(np.abs(r.logits - ref)) / np.max(np.abs(ref))
        worst = max(worst, float(err))
    record_property("measured", f"cached vs full forward ({rotary_dtype} rotary): max|dlogit|/max|logit| {worst:.2e}")
    assert worst <= 1e-5


def _allowed(logits, sampling):
    """NumPy re-derivation of the tokens a sampler may draw: top-k, then the top-p nucleus."""
    z = logits.astype(np.float64) / sampling.temperature
    keep = np.ones(len(z), bool)
    order = np.argsort(-z, kind="stable")
    if sampling.top_k:
        keep[order[sampling.top_k:]] = False
    if sampling.top_p < 1.0:
        p = np.where(keep, np.exp(z - z.max()), 0.0)
        ps = p[order] / p.sum()
        before = np.cumsum(ps) - ps
        keep[order[before >= sampling.top_p]] = False
    return keep


def test_sampling_reproducible_batch_independent_and_filtered(base):
    """A seed fixes the completions (whatever the batching); every drawn token lies in the top-k /
    top-p set of that step's logits; another seed gives other completions."""
    cfg, params = base
    prompts = _prompts(cfg.vocab_size, (4, 9, 2, 14, 6, 20))
    sampling = Sampling(temperature=3.0, top_k=8, top_p=0.5)
    kw = dict(max_new_tokens=MAX_NEW, sampling=sampling, keep_logits=True)
    a = generate(cfg, params, prompts, seed=7, batch_size=B, **kw)
    b = generate(cfg, params, prompts, seed=7, batch_size=1, **kw)
    c = generate(cfg, params, prompts, seed=8, batch_size=B, **kw)
    assert [r.completion_tokens for r in a] == [r.completion_tokens for r in b]  # each prompt has its own key
    assert [r.completion_tokens for r in a] != [r.completion_tokens for r in c]
    assert len({tuple(r.completion_tokens) for r in a}) == len(prompts)
    sizes = []
    for r in a + c:
        for tok, logits in zip(r.completion_tokens, r.logits):
            keep = _allowed(logits, sampling)
            sizes.append(int(keep.sum()))
            assert keep[tok]
    assert min(sizes) < 8 and max(sizes) > 1  # both filters were active on some steps


SAMPLING_CASES = [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=4), Sampling(temperature=1.3, top_p=0.8),
                  Sampling(temperature=1.0, top_k=6, top_p=0.7)]


@pytest.mark.parametrize("sampling", SAMPLING_CASES, ids=str)
def test_sampling_distribution(sampling, record_property):
    """20,000 draws from fixed logits follow the filtered, renormalised softmax (NumPy derivation).

    Chi-square goodness of fit at significance 1e-6: a correct sampler fails with probability 1e-6
    per case for a random seed (the seed is fixed, so the outcome is deterministic)."""
    V, real, n = 12, 10, 20000
    logits = np.array([2.0, 1.5, 1.4, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, 9.0, 9.0], np.float32)  # 10, 11: padding
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, V)), keys, sampling, real))
    keep = _allowed(logits[:real], sampling)
    z = logits[:real].astype(np.float64) / sampling.temperature
    expect = np.where(keep, np.exp(z - z.max()), 0.0)
    expect /= expect.sum()
    counts = np.bincount(draws, minlength=V)
    assert counts[real:].sum() == 0 and counts[:real][~keep].sum() == 0  # never outside the allowed set
    stat, pvalue = scipy.stats.chisquare(counts[:real][keep], n * expect[keep])
    record_property("measured", f"{sampling}: kept {int(keep.sum())} tokens, chi2 p-value {pvalue:.3g}")
    assert pvalue > 1e-6


def test_padded_vocabulary_never_chosen(base):
    cfg, params = base
    real = 150
    cfg = cfg.replace(tokenizer_vocab_size=real)
    kernel = np.array(params["embed_out"]["kernel"])
    kernel[:, real:] = 50.0 * np.sign(kernel[:, real:])  # padded ids would win almost every step
    params = {**params, "embed_out": {"kernel": jnp.asarray(kernel)}}
    prompts = _prompts(real, (3, 8, 17, 1, 4, 9))
    last = M.forward(cfg, params, jnp.asarray([prompts[0]]))[0, -1]
    assert int(jnp.argmax(last)) >= real  # the setup has teeth: a padded id is the most likely token
    for sampling in (Sampling(), Sampling(temperature=5.0)):
        res = generate(cfg, params, prompts, max_new_tokens=MAX_NEW, sampling=sampling, batch_size=B)
        assert all(t < real for r in res for t in r.completion_tokens)
    assert np.all(np.isneginf(np.asarray(filter_logits(jnp.zeros((2, 256)), Sampling(), 200))[:, 200:]))


def test_stop_strings_and_streaming(base, neox_tokenizer_path):
    from neox_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(neox_tokenizer_path)
    cfg, params = base
    prompts = _prompts(cfg.vocab_size, (5, 9, 20, 2, 3, 4))
    gen = Generator(cfg, params, tokenizer=tok)
    full = gen.generate(prompts, max_new_tokens=24, batch_size=B)
    text = full[0].text
    assert text == tok.decode(full[0].completion_tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    cut = gen.generate(prompts, max_new_tokens=24, stop_strings=[stop], chunk=4, batch_size=B,
                       on_token=lambda i, t: streamed[i].append(t))
    assert cut[0].stop_reason == "stop_string"
    assert cut[0].text == text[: text.find(stop)]
    toks = cut[0].completion_tokens
    assert toks == full[0].completion_tokens[: len(toks)]
    assert stop in tok.decode(toks) and stop not in tok.decode(toks[:-1])
    # streaming saw each token of the (uncut) run as it was produced, in order; rows stop early
    for i in range(len(prompts)):
        assert streamed[i] == full[i].completion_tokens[: len(streamed[i])]
        assert len(streamed[i]) >= len(cut[i].completion_tokens)


def test_bad_arguments_are_user_errors():
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=32)
    params = M.init_params(cfg, 0)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(cfg, params, [[1], []], max_new_tokens=4)
    with pytest.raises(UserError, match="prompt 0: token id 64 outside"):
        generate(cfg, params, [[64]], max_new_tokens=4)
    with pytest.raises(UserError, match="exceed the model's context of 32"):
        generate(cfg, params, [[1] * 30], max_new_tokens=3)
    with pytest.raises(UserError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(UserError, match="attention=xla"):
        Generator(cfg.replace(attention="cudnn"), params)


needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def eight_head_model():
    model = hf_model(seed=7, vocab=256, hidden=64, heads=8, layers=2)
    return ours_from_hf(model, compute_dtype="float32")


@needs8
@pytest.mark.parametrize("tensor", [4, 8])
def test_sharded_decode_equals_single_device(tensor, eight_head_model, record_property):
    cfg, params = eight_head_model
    prompts = _prompts(cfg.vocab_size, (7, 3, 12, 5))
    kw = dict(max_new_tokens=10, batch_size=4, keep_logits=True)
    ref_greedy = generate(cfg, params, prompts, **kw)
    ref_sampled = generate(cfg, params, prompts, sampling=Sampling(temperature=1.0, top_k=20), seed=5, **kw)

    mesh = decode_mesh(tensor)
    assert dict(mesh.shape) == {"data": 8 // tensor, "fsdp": 1, "tensor": tensor}
    shardings = decode_shardings(cfg, mesh)
    sharded = jax.device_put(params, shardings)
    for name, x in M.flatten(sharded).items():
        assert "fsdp" not in str(x.sharding.spec), name
    qkv = sharded["layers"]["attn"]["qkv"]["kernel"]
    assert qkv.addressable_shards[0].data.shape == (2, 64, 3, 8 // tensor, 8)  # heads split, nothing else
    gen = Generator(cfg, sharded, mesh=mesh)
    greedy = gen.generate(prompts, **kw)
    sampled = gen.generate(prompts, sampling=Sampling(temperature=1.0, top_k=20), seed=5, **kw)
    worst = 0.0
    for a, b in zip(greedy + sampled, ref_greedy + ref_sampled):
        assert a.completion_tokens == b.completion_tokens
        worst = max(worst, float(np.max(np.abs(a.logits - b.logits)) / np.max(np.abs(b.logits))))
    record_property("measured", f"tensor={tensor} vs 1 device: tokens equal, max|dlogit|/max|logit| {worst:.1e}")
    assert worst <= 1e-5
    if tensor == 4:  # the lm-eval backend's scoring runs on the same decode-sharded parameters
        from neox_jax.evaluate import score_continuations

        reqs = [(p[:-2], p[-2:]) for p in prompts]
        with jax.set_mesh(mesh):
            a = score_continuations(cfg, sharded, reqs, batch_size=4)
        b = score_continuations(cfg, params, reqs, batch_size=4)
        assert [g for _, g in a] == [g for _, g in b]
        np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5)
