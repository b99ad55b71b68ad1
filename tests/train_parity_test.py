"""Cross-framework parity: our jitted train step against a PyTorch training loop written here.

Same initial weights (a random HF `GPTNeoXForCausalLM`, converted with our converter), same batches,
fp32 everywhere.  The PyTorch side is plain torch: `torch.optim.AdamW` with GPT-NeoX's two parameter
groups (weight decay on weight matrices and embeddings, none on biases and LayerNorms),
`clip_grad_norm_`, and the Pythia-era AnnealingLR computed here in Python; mean next-token
cross-entropy over every position.  50 steps: per-step losses must agree within 1e-4 relative and
the final parameters within rtol 1e-4 / atol 2e-5 (the key bias within steps x lr:
`train_step_test.assert_params_close` says why; measured differences are printed).
"""

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_reference import hf_model, ours_from_hf, state_dict_numpy
from neox_jax.convert.mapping import params_from_hf
from neox_jax.sharding import make_mesh
from neox_jax.train import state as S
from neox_jax.train import step as T
from neox_jax.train.config import from_sections
from train_step_test import assert_params_close

STEPS, B, SEQ = 50, 4, 32
LR, MIN_LR, WARMUP, WD, CLIP, BETAS, EPS = 1e-3, 1e-4, 0.1, 0.1, 1.0, (0.9, 0.95), 1e-8


def annealing_lr(n: int) -> float:
    """GPT-NeoX (Pythia era) AnnealingLR, cosine, T = STEPS."""
    T_, W = STEPS, WARMUP * STEPS
    n_ = min(n, T_ - W)
    if n <= W:
        return LR * n_ / W
    return max(LR / 2.0 * (math.cos(math.pi * (n_ - W) / T_) + 1), MIN_LR)


def torch_train(model, batches):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "layernorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    model.train()
    return torch_steps(model, opt, batches)


def torch_steps(model, opt, batches, first: int = 0) -> list[float]:
    """Train steps first, first + 1, ... on `batches`: AnnealingLR, mean cross-entropy, clipping."""
    losses = []
    for n, toks in enumerate(batches, start=first):
        for g in opt.param_groups:
            g["lr"] = annealing_lr(n)
        t = torch.tensor(toks, dtype=torch.long)
        logits = model(t[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential"])
def test_fifty_steps_match_pytorch(parallel, record_property):
    torch.manual_seed(0)
    model = hf_model(seed=5, vocab=211, hidden=64, layers=2, heads=4, parallel=parallel, act="gelu")
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    run = from_sections({
        "model": cfg.to_dict(),
        "data": {"path": "unused", "seq_length": SEQ},
        "optimizer": {"lr": LR, "min_lr": MIN_LR, "schedule": "neox_2022", "decay_style": "cosine",
                      "warmup": WARMUP, "b1": BETAS[0], "b2": BETAS[1], "eps": EPS, "weight_decay": WD,
                      "clip": CLIP},
        "train": {"steps": STEPS, "batch_size": B},
    })
    rs = np.random.RandomState(0)
    pool = [rs.randint(0, cfg.vocab_size, (B, SEQ + 1)).astype(np.int32) for _ in range(5)]
    batches = [pool[i % len(pool)] for i in range(STEPS)]  # repeated batches: the loss must fall

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    ours = []
    with jax.set_mesh(mesh):
        state = S.init_state(run, mesh, opt, params=jax.device_put(params, sh.params), shardings=sh)
        step = T.make_train_step(run, mesh, opt, sh)
        for b in batches:
            state, m = step(state, {"tokens": jax.device_put(b, T.batch_sharding(mesh))})
            ours.append(float(m["loss"]))
    theirs = torch_train(model, batches)

    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    assert theirs[-1] < theirs[0] - 0.5  # the runs really trained
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    final = params_from_hf(cfg, state_dict_numpy(model))
    worst = assert_params_close(jax.device_get(state.params), final, lr=LR, steps=STEPS, rtol=1e-4, atol=2e-5)
    record_property("measured", f"{'parallel' if parallel else 'sequential'}: 50 fp32 steps vs torch, max rel "
                                f"loss diff {rel:.1e}; loss {theirs[0]:.4f} -> {theirs[-1]:.4f}; max |dparam| "
                                f"{worst:.1e} (key bias excluded)")
