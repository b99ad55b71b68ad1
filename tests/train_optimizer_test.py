"""LR schedules, loss scaling, weight-decay mask and clipping against re-derivations of GPT-NeoX's
and DeepSpeed's formulas written here in plain Python (float64), never against our own output."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.train.config import OptimizerConfig
from neox_jax.train.optimizer import (LossScale, clip_by_global_norm, decay_mask, init_loss_scale, lr_at,
                                      update_loss_scale)


class AnnealingLR2022:
    """GPT-NeoX `megatron/learning_rates.py` as of the Pythia runs (before gpt-neox #1008)."""

    def __init__(self, start_lr, warmup_iter, total_iters, decay_style, min_lr):
        self.start_lr, self.warmup_iter, self.end_iter = start_lr, warmup_iter, total_iters
        self.decay_style, self.min_lr = decay_style, min_lr

    def get_lr(self, num_iters):
        num_iters_ = min(num_iters, self.end_iter - self.warmup_iter)
        if self.warmup_iter > 0 and num_iters <= self.warmup_iter:
            return float(self.start_lr) * num_iters_ / self.warmup_iter
        num_iters_ = num_iters_ - self.warmup_iter
        if self.decay_style == "linear":
            lr = self.start_lr * (self.end_iter - num_iters_) / self.end_iter
        elif self.decay_style == "cosine":
            lr = self.start_lr / 2.0 * (math.cos(math.pi * num_iters_ / self.end_iter) + 1)
        elif self.decay_style == "exponential":
            lr = self.start_lr * math.exp(-0.693 * num_iters_ / self.end_iter)
        else:
            lr = self.start_lr
        return max(lr, self.min_lr)


class AnnealingLR2023(AnnealingLR2022):
    """GPT-NeoX's AnnealingLR since August 2023."""

    def get_lr(self, num_iters):
        if self.warmup_iter > 0 and num_iters <= self.warmup_iter:
            return float(self.start_lr) * max(1, num_iters) / self.warmup_iter
        n = num_iters - self.warmup_iter
        end = self.end_iter - self.warmup_iter
        if self.decay_style == "linear":
            lr = self.start_lr * (end - n) / end
        elif self.decay_style == "cosine":
            lr = self.min_lr + (self.start_lr - self.min_lr) / 2.0 * (math.cos(math.pi * n / end) + 1)
        elif self.decay_style == "exponential":
            lr = self.start_lr * math.exp(-0.693 * n / end)
        else:
            lr = self.start_lr
        return max(lr, self.min_lr)


PYTHIA_STEPS = [0, 1, 2, 715, 1429, 1430, 1431, 5000, 71500, 115138, 115139, 115140, 141569, 141570, 142999, 143000]


@pytest.mark.parametrize("schedule,ref_cls", [("neox_2022", AnnealingLR2022), ("neox_2023", AnnealingLR2023)])
@pytest.mark.parametrize("style", ["cosine", "linear", "exponential", "constant"])
def test_schedule_matches_annealing_lr(schedule, ref_cls, style):
    T, lr, min_lr = 143000, 2.0e-4, 2.0e-5
    cfg = OptimizerConfig(lr=lr, min_lr=min_lr, schedule=schedule, decay_style=style, warmup=0.01)
    ref = ref_cls(lr, 0.01 * T, T, style, min_lr)
    steps = jnp.asarray(PYTHIA_STEPS)
    ours = np.asarray(jax.vmap(lambda s: lr_at(s, cfg, T))(steps))
    want = np.array([ref.get_lr(s) for s in PYTHIA_STEPS])
    np.testing.assert_allclose(ours, want, rtol=2e-6, atol=1e-12)


def test_pythia_and_20b_floor_steps():
    """Pythia (T 143000) reaches min_lr at step 115,139; 20B (T 150000) at 120,776 (reference 4.1)."""
    for T, lr, floor_step in [(143000, 2.0e-4, 115139), (150000, 0.97e-4, 120776)]:
        cfg = OptimizerConfig(lr=lr, min_lr=lr / 10, schedule="neox_2022", decay_style="cosine", warmup=0.01)
        ref = AnnealingLR2022(lr, 0.01 * T, T, "cosine", lr / 10)
        assert ref.get_lr(floor_step - 1) > lr / 10 and ref.get_lr(floor_step) == lr / 10
        before, at = (float(lr_at(s, cfg, T)) for s in (floor_step - 1, floor_step))
        assert before > np.float32(lr / 10) and at == np.float32(lr / 10)
        assert float(lr_at(0, cfg, T)) == 0.0  # the first update is a no-op (gpt-neox #1373)
        assert float(lr_at(int(0.01 * T), cfg, T)) == pytest.approx(lr, rel=1e-6)


def test_decay_steps_override_and_no_warmup():
    cfg = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup=0.0, decay_steps=100)
    ref = AnnealingLR2022(1e-3, 0.0, 100, "cosine", 0.0)
    for s in [0, 1, 50, 99, 100, 150]:
        assert float(lr_at(s, cfg, total_steps=10_000)) == pytest.approx(ref.get_lr(s), rel=1e-6, abs=1e-6 * 1e-3)


class DynamicLossScaler:
    """DeepSpeed `runtime/fp16/loss_scaler.py: DynamicLossScaler.update_scale` (consecutive_hysteresis
    False, raise_error_at_min_scale False)."""

    def __init__(self, init_scale, scale_window, delayed_shift, min_scale):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = 2.0, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


@pytest.mark.parametrize("window,hysteresis", [(1000, 2), (7, 2), (5, 1), (3, 3)])
def test_dynamic_loss_scale_follows_deepspeed(window, hysteresis):
    cfg = OptimizerConfig(loss_scale="dynamic", initial_scale_power=12, scale_window=window,
                          hysteresis=hysteresis, min_scale=1.0)
    ref = DynamicLossScaler(2.0 ** 12, window, hysteresis, 1.0)
    rs = np.random.RandomState(window)
    # bursts of overflows (down to the minimum scale) and long clean stretches
    overflows = np.concatenate([rs.rand(300) < 0.5, np.ones(20, bool), np.zeros(min(2100, 20 * window), bool),
                                rs.rand(200) < 0.4])
    step = jax.jit(lambda ls, o: update_loss_scale(ls, o, cfg))
    ls = init_loss_scale(cfg)
    seen = []
    for i, o in enumerate(overflows):
        ls = step(ls, jnp.bool_(o))
        ref.update_scale(bool(o))
        assert float(ls.scale) == ref.cur_scale, (i, float(ls.scale), ref.cur_scale)
        assert int(ls.hysteresis) == ref.cur_hysteresis, i
        seen.append(ref.cur_scale)
    # the sequence exercised the floor and at least one doubling after it
    first_min = seen.index(1.0)
    assert max(seen[first_min:]) > 1.0


def test_dynamic_scale_stops_doubling_at_2_64():
    cfg = OptimizerConfig(loss_scale="dynamic", initial_scale_power=60, scale_window=1)
    ls = init_loss_scale(cfg)
    for _ in range(10):
        ls = update_loss_scale(ls, jnp.bool_(False), cfg)
    assert float(ls.scale) == 2.0 ** 64
    ls = update_loss_scale(dataclasses.replace(ls, hysteresis=jnp.int32(1)), jnp.bool_(True), cfg)
    assert float(ls.scale) == 2.0 ** 63


def test_static_and_disabled_scales_never_change():
    for cfg, want in [(OptimizerConfig(loss_scale="static", static_scale=128.0), 128.0),
                      (OptimizerConfig(loss_scale="none"), 1.0)]:
        ls = init_loss_scale(cfg)
        for o in (True, False, True):
            ls = update_loss_scale(ls, jnp.bool_(o), cfg)
        assert isinstance(ls, LossScale) and float(ls.scale) == want and int(ls.iter) == 3


def test_decay_mask_is_kernels_and_embeddings():
    params = {"embed_in": {"embedding": 0}, "embed_out": {"kernel": 0}, "final_ln": {"scale": 0, "bias": 0},
              "layers": {"attn": {"qkv": {"kernel": 0, "bias": 0}}, "ln_mlp": {"scale": 0, "bias": 0}}}
    m = decay_mask(params)
    assert m == {"embed_in": {"embedding": True}, "embed_out": {"kernel": True},
                 "final_ln": {"scale": False, "bias": False},
                 "layers": {"attn": {"qkv": {"kernel": True, "bias": False}}, "ln_mlp": {"scale": False, "bias": False}}}


def test_clipping_is_torch_clip_grad_norm():
    import torch

    rs = np.random.RandomState(0)
    grads = {"a": rs.randn(5, 3).astype(np.float32), "b": rs.randn(7).astype(np.float32)}
    for max_norm in (0.5, 100.0):
        t = [torch.tensor(grads["a"], requires_grad=True), torch.tensor(grads["b"], requires_grad=True)]
        for p, g in zip(t, (grads["a"], grads["b"])):
            p.grad = torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_(t, max_norm)
        ours, our_norm = clip_by_global_norm(jax.tree.map(jnp.asarray, grads), max_norm)
        assert float(our_norm) == pytest.approx(float(norm), rel=1e-6)
        np.testing.assert_allclose(np.asarray(ours["a"]), t[0].grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ours["b"]), t[1].grad.numpy(), rtol=1e-6)
