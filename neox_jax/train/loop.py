"""The training loop: config -> mesh -> sharded state -> loader -> jitted step -> metrics -> weights.

    run = load_run_config("configs/train/tinyshakespeare.yaml")
    summary = train(run, Path("runs/shakespeare"))

One step as data flows: the loader computes this process's rows of global batch `step` (a pure
function of the step, `neox_jax.data.loader`), `global_batch_arrays` assembles the sharded global
batch, the compiled step (state donated) returns the next state and the step's metrics.  Metrics
are read one step late, so the host never waits for the device between steps; a non-finite loss
without loss scaling stops the run naming its step.  SIGINT / SIGTERM finish the current step and
stop cleanly after writing a checkpoint; with several processes all of them stop after the same
step even when only one was signalled (`distributed.Vote`).  Checkpoints (`checkpoints.py`) are written on the
schedule of `RunConfig.checkpoint` and at the end under `RUN_DIR/checkpoints/STEP` (what `score`,
`convert`, `inspect` and `generate` read); a run directory with checkpoints is resumed from the
newest complete one, data position included.  `--overwrite` moves an existing run directory aside
until the new run has a complete checkpoint (`run_dir.py`), so a run that fails early loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .. import atomic
from .. import checkpoint as ckpt
from .. import flops
from ..data.loader import Loader, global_batch_arrays
from ..distributed import Vote, barrier, lead_decides
from ..errors import CheckpointError, TrainingError, UserError
from ..sharding import by_slice_index, dcn_factors, make_mesh, node_count
from . import checkpoints as tc
from . import neox_state
from .config import RunConfig
from .metrics import Metrics, peak_flops
from .run_dir import Overwrite, RunLock, prepare_run_dir, undo_on_error, will_resume
from .state import abstract_state, init_state, make_optimizer, param_shardings, state_shardings
from .step import batch_sharding, make_eval_step, make_train_step, use_vocab_parallel

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def build_datasets(run: RunConfig) -> tuple[Any, Any | None]:
    """(train dataset, validation dataset or None) exactly as GPT-NeoX builds them for this run.

    Train: `neox_jax.data.order.build_train_dataset` (Pythia's blend route or 20B's split route) with
    num_samples from steps x batch.  Validation: the first `eval_steps` global batches of the valid
    split (split route: documents of the second split range, index maps named "valid") or of the
    `valid_paths` blend (names "valid_K"), the same batches at every evaluation."""
    from ..data.indexed import IndexedDataset
    from ..data.order import BlendedDataset, GPT2Dataset, build_train_dataset, train_valid_test_split

    d, t = run.data, run.train
    seq, save = d.seq_length, d.save_index_maps
    if d.path:
        train_ds = build_train_dataset([d.path], seq, d.seed, train_iters=t.steps, batch=t.batch_size,
                                       split=d.split, save_cache=save)
    else:
        train_ds = build_train_dataset(list(d.train_paths), seq, d.seed, train_iters=t.steps,
                                       batch=t.batch_size, weights=list(d.train_weights) or None,
                                       save_cache=save, limit=t.steps * t.batch_size)
    n_valid = t.eval_steps * t.batch_size
    valid_ds = None
    if n_valid and d.path:
        bounds = train_valid_test_split(d.split, len(IndexedDataset(d.path)))
        if bounds[2] > bounds[1]:
            valid_ds = GPT2Dataset.build(d.path, n_valid, seq, d.seed, name="valid",
                                         documents=np.arange(bounds[1], bounds[2], dtype=np.int32),
                                         save_cache=save)
    elif n_valid and d.valid_paths:
        weights = list(d.valid_weights) or [1.0] * len(d.valid_paths)
        total = sum(weights)
        parts = [GPT2Dataset.build(p, int(np.ceil(n_valid * w / total * 1.005)), seq, d.seed,
                                   name=f"valid_{k}", save_cache=save)
                 for k, (p, w) in enumerate(zip(d.valid_paths, weights))]
        valid_ds = BlendedDataset(parts, weights, limit=n_valid)
    return train_ds, valid_ds


def data_source(run: RunConfig, valid: bool = False) -> str:
    """How errors name the training (or validation) data: the prefix, or the blend's key and prefixes."""
    d = run.data
    if d.path:
        return d.path
    key, paths = ("data.valid_paths", d.valid_paths) if valid else ("data.train_paths", d.train_paths)
    return f"{key} ({', '.join(paths)})"


def check_data(run: RunConfig, train_ds, valid_ds, first_step: int = 0) -> None:
    """Before anything is compiled or written: each split holds the samples the run reads (train:
    train.steps x train.batch_size; validation: train.eval_steps x train.batch_size), naming the
    split and the keys that size it; and the first global batch of each holds only token ids below
    model.vocab_size (every later batch is checked as the loader reads it)."""
    from ..data.indexed import IndexedDataset
    from ..data.order import train_valid_test_split

    d, t = run.data, run.train
    B, tokens = t.batch_size, d.seq_length + 1

    def where(valid: bool) -> str:
        if not d.path:
            return f"{data_source(run, valid)}: the {'validation' if valid else 'training'} blend"
        bounds = train_valid_test_split(d.split, len(IndexedDataset(d.path)))
        a, b = (bounds[1], bounds[2]) if valid else (bounds[0], bounds[1])
        return (f"{d.path}: the {'validation' if valid else 'training'} split (data.split {d.split!r}: "
                f"documents [{a}, {b}))")

    for ds, steps, key, valid in ((train_ds, t.steps, "train.steps", False),
                                  (valid_ds, t.eval_steps, "train.eval_steps", True)):
        if ds is None or len(ds) >= steps * B:
            continue
        change = "data.split, " if d.path else ""
        raise UserError(f"{where(valid)} has {len(ds)} samples of {tokens} tokens; {key} {steps} x train.batch_size "
                        f"{B} need {steps * B} (change {change}{key} or train.batch_size"
                        + ("; train.eval_steps 0 turns validation off)" if valid else ")"))
    for ds, step, valid in ((train_ds, first_step, False), (valid_ds, 0, True)):
        if ds is not None and step * B + B <= len(ds):
            with Loader(ds, B, num_steps=step + 1, process_index=0, process_count=1, num_threads=1,
                        vocab_size=run.model.vocab_size, source=data_source(run, valid)) as probe:
                probe.batch(step)


# ----------------------------------------------------------------------------- setup


def _check_backend(run: RunConfig) -> None:
    if run.model.attention == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(f"model.attention is cudnn, which needs an NVIDIA GPU; this process runs on "
                        f"{jax.default_backend()!r} (set model.attention=xla)")


def _mesh(run: RunConfig):
    m = run.mesh
    try:
        devices = jax.devices()
        dcn = dcn_factors(m.dcn_data, m.dcn_fsdp, m.dcn_tensor, node_count(devices))
        mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=devices, dcn=dcn)
        nodes = int(np.prod(dcn))
        if nodes > 1:
            by = "slice_index" if by_slice_index(devices, nodes) else "blocks of consecutive processes"
            log.info("hybrid mesh: %d nodes/slices (%s), across-node factors %s%s", nodes, by,
                     dict(zip(("data", "fsdp", "tensor"), dcn)), "" if m.dcn_data else " (dcn_data 0: one per node)")
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    check_micro_batch(run, mesh)
    return mesh


def check_micro_batch(run: RunConfig, mesh) -> None:
    """Each micro-batch splits evenly over the data-parallel devices (mesh data x fsdp)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if run.micro_batch % dp:
        raise UserError(f"micro-batch {run.micro_batch} (train.batch_size {run.train.batch_size} / grad_accum "
                        f"{run.train.grad_accum}) is not divisible by the {dp} data-parallel devices (mesh "
                        f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); set train.batch_size")


def _check_arch(run: RunConfig, cfg, label: str) -> None:
    """Refuse a starting checkpoint (config `cfg`) whose architecture differs from the run's model
    (before anything is written)."""
    diff = {k: (v, getattr(run.model, k)) for k, v in cfg.arch_dict().items() if getattr(run.model, k) != v}
    if diff:
        k, (have, want) = next(iter(diff.items()))
        raise TrainingError(f"{label}: architecture differs from the run's model: {k} is {have!r} "
                            f"in the checkpoint, {want!r} in the config" +
                            (f" (and {sorted(diff)[1:]})" if len(diff) > 1 else ""))


def _load_init(run: RunConfig, path: str, mesh) -> Any:
    _, params = ckpt.load_params(path, dtype="float32", shardings=param_shardings(run, mesh))
    log.info("initial parameters from %s", ckpt.resolve(path))
    return params


class _StopFlag:
    """SIGINT / SIGTERM set a flag (the signal's number); the loop stops after the step in flight
    (several processes: after the same step, `distributed.Vote`)."""

    def __init__(self):
        self.signal = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the loop


def train(run: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = False,
          resume: str = "auto", resume_fallback: bool = False) -> dict:
    """Train `run`, writing into `run_dir`; returns a summary dict (also the last metrics line).
    A run directory with checkpoints is continued (`will_resume`)."""
    run_dir = Path(run_dir)
    atomic.check_name(run_dir)  # a name tensorstore cannot take failed at the first checkpoint, after training
    _check_backend(run)
    lead = jax.process_index() == 0
    lock = RunLock(run_dir)
    lead_decides(lock.acquire)  # one train per run directory (process 0 holds the lock; all refuse alike)
    try:
        if lead:  # an --overwrite of this run directory that was killed is undone first (logged)
            atomic.recover(run_dir.parent)
        barrier("neox_jax.train.recovered")
        resuming = will_resume(run_dir, overwrite, resume)
        if resuming and run.train.start_step:
            raise UserError(f"{run_dir}: train.start_step {run.train.start_step} with a run directory to resume; "
                            "a resume starts at its newest checkpoint's step")
        if run.train.init_from and not resuming:
            _check_arch(run, ckpt.read_config(run.train.init_from), f"--init-from {run.train.init_from}")
        if run.train.init_from_neox and not resuming:
            _check_arch(run, neox_state.read_config(run.train.init_from_neox),
                        f"train.init_from_neox {run.train.init_from_neox}")
        train_ds, valid_ds = build_datasets(run)
        check_data(run, train_ds, valid_ds, 0 if resuming else run.train.start_step)
        mesh = _mesh(run)
        if not resuming:
            prepare_run_dir(run_dir, overwrite, create=False)
        barrier("neox_jax.train.run_dir_checked")  # every process checked before process 0 changes anything
        ow = Overwrite(run_dir, None)
        if lead and not resuming:
            ow = prepare_run_dir(run_dir, overwrite)
            with undo_on_error(ow):
                run.save(run_dir / "config.yaml")
        barrier("neox_jax.train.run_dir_ready")  # no process opens the checkpoints before the directory exists
        with undo_on_error(ow), contextlib.ExitStack() as on_exit:  # closes what _train opened, on any error too
            return _train(run, run_dir, ow, progress=progress, resuming=resuming, resume_fallback=resume_fallback,
                          mesh=mesh, datasets=(train_ds, valid_ds), on_exit=on_exit)
    finally:
        lock.release()


def _train(run: RunConfig, run_dir: Path, ow: Overwrite, *, progress: bool, resuming: bool,
           resume_fallback: bool, mesh, datasets, on_exit: contextlib.ExitStack) -> dict:
    train_ds, valid_ds = datasets
    lead = jax.process_index() == 0
    cfg, t = run.model, run.train
    S, B = run.data.seq_length, t.batch_size
    log.info("mesh %s over %d %s device(s) (%s); %d process(es)", dict(mesh.shape), mesh.size,
             jax.default_backend(), jax.devices()[0].device_kind, jax.process_count())
    log.info("model %s parameters; compute %s, params/moments float32, attention %s, remat %s, "
             "vocab-parallel cross-entropy %s, weight gradients reduced in %s", f"{cfg.num_params():,}",
             cfg.compute_dtype, cfg.attention, cfg.remat, "on" if use_vocab_parallel(run, mesh) else "off",
             "float32" if cfg.fp32_allreduce or cfg.compute_dtype == "float32" else cfg.compute_dtype)
    log.info("batch %d x %d tokens = %d per step (%d micro-batch(es) of %d), %d steps; lr %g -> %g "
             "(%s %s, warmup %g), loss scaling %s", B, S, B * S, t.grad_accum, run.micro_batch, t.steps,
             run.optimizer.lr, run.optimizer.min_lr, run.optimizer.schedule, run.optimizer.decay_style,
             run.optimizer.warmup, run.optimizer.loss_scale)

    opt = make_optimizer(run)
    shardings = state_shardings(run, mesh, opt)
    ckpts = ow.ckpts = tc.TrainCheckpoints(run_dir / "checkpoints", run)
    start = 0
    with jax.set_mesh(mesh):
        if resuming:
            abstract = abstract_state(run, opt, shardings)
            t0 = time.perf_counter()
            start, state, _ = tc.restore_latest(ckpts, run, abstract, fallback=resume_fallback)
            log.info("resumed from %s: step %d, data position %d (%.1f s)", ckpts.step_dir(start), start,
                     start, time.perf_counter() - t0)
            if lead:
                tc.truncate_metrics(run_dir, start)
                run.save(run_dir / "config.yaml")  # the mesh or the schedule may have changed
        elif t.init_from_neox:
            state = neox_state.load(run, t.init_from_neox, opt, shardings)
            start = int(jax.device_get(state.step))
        else:
            params = _load_init(run, t.init_from, mesh) if t.init_from else None
            state = init_state(run, mesh, opt, params=params, shardings=shardings)
            if t.start_step:
                start = t.start_step
                state = tc.at_step(state, start, shardings)
                log.info("starting at step %d: data position and learning-rate schedule of step %d, fresh "
                         "optimizer moments (Adam's bias correction restarts), fresh loss scale", start, start)
        step_fn = make_train_step(run, mesh, opt, shardings)
        eval_fn = make_eval_step(run, mesh, shardings.params) if valid_ds is not None else None
        bsh = batch_sharding(mesh)
        abstract_batch = {"tokens": jax.ShapeDtypeStruct((B, S + 1), np.int32, sharding=bsh)}
        if run.data.segment_ids:
            abstract_batch["segment_ids"] = abstract_batch["tokens"]
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, abstract_batch).compile()
        compile_s = time.perf_counter() - t0
    log.info("train step compiled in %.1f s", compile_s)

    flops_per_token = flops.train_flops_per_token(cfg, S)
    peak = peak_flops(jax.devices()[0].device_kind, t.peak_tflops)
    metrics = on_exit.enter_context(contextlib.closing(Metrics(run_dir, enabled=lead, tensorboard=t.tensorboard)))
    loader = Loader(train_ds, B, start_step=start, num_steps=t.steps, segment_ids=run.data.segment_ids,
                    eod_id=run.data.eod_id, prefetch=run.data.prefetch, vocab_size=cfg.vocab_size,
                    source=data_source(run))
    bar = None
    if progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def evaluate(step: int) -> float:
        t0 = time.perf_counter()
        with Loader(valid_ds, B, num_steps=t.eval_steps, segment_ids=run.data.segment_ids,
                    eod_id=run.data.eod_id, vocab_size=cfg.vocab_size,
                    source=data_source(run, valid=True)) as vl, jax.set_mesh(mesh):
            nll = n = 0.0
            for local in vl:
                a, b = jax.device_get(eval_fn(state.params, global_batch_arrays(local, bsh, B)))
                nll, n = nll + float(a), n + float(b)
        loss = nll / max(n, 1.0)
        metrics.write({"step": step, "valid_loss": loss, "valid_ppl": float(np.exp(min(loss, 700.0))),
                       "valid_tokens": int(n)})
        log.info("step %d: validation loss %.4f (%d tokens)", step, loss, int(n))
        held["eval"] += time.perf_counter() - t0
        return loss

    last: dict[str, Any] = {}
    skipped = 0
    t_prev = time.perf_counter()
    t_log, tokens_log = t_prev, 0
    valid_loss = None
    # host time the loop spent saving (held by `ckpts.save`: the previous save, the copy to host
    # memory) and validating since the last record: not part of the step's time (`finish`)
    held = {"checkpoint": 0.0, "eval": 0.0}
    held_log = 0.0

    def finish(step: int, m: dict) -> None:
        nonlocal skipped, t_prev, t_log, tokens_log, last, held_log
        m = {k: (v.item() if hasattr(v, "item") else v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        aside = held["checkpoint"] + held["eval"]
        dt, t_prev = now - t_prev - aside, now
        held_log += aside
        skipped += int(m["skipped"])
        if run.optimizer.loss_scale == "none" and (m["skipped"] or not np.isfinite(m["loss"])):
            raise TrainingError(f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']} is not finite "
                                f"({cfg.compute_dtype} compute, no loss scaling): stopping; the update of this "
                                "step was not applied")
        tokens_log += B * S
        tps = B * S / max(dt, 1e-9)
        rec = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "loss_scale": m["loss_scale"], "skipped": bool(m["skipped"]), "skipped_total": skipped,
               "step_time": dt, "tokens_per_s": tps,
               "tflops_per_device": flops_per_token * tps / mesh.size / 1e12,
               "mfu": flops_per_token * tps / (mesh.size * peak) if peak else None,
               "data_step": step + 1}
        for k, v in held.items():
            if v:
                rec[f"{k}_time"] = v
                held[k] = 0.0
        if run.optimizer.z_loss:
            rec["z_loss"] = m["z_loss"]
        log_now = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        metrics.write(rec, scalars=log_now)
        if log_now:
            interval_tps = tokens_log / max(now - t_log - held_log, 1e-9)
            aside_note = f" (not counting {held_log:.2f} s saving/validating)" if held_log else ""
            t_log, tokens_log, held_log = now, 0, 0.0
            log.info("step %d/%d: loss %.4f lr %.3g grad-norm %.3f%s %.0f tokens/s%s", step + 1, t.steps, m["loss"],
                     m["lr"], m["grad_norm"], f" loss-scale {m['loss_scale']:g}" if run.optimizer.loss_scale != "none"
                     else "", interval_tps, aside_note)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:.0f}", refresh=False)
            bar.update(1)
        last = rec

    pending = None
    stopped = None
    schedule = tc.Schedule(run)

    def save(done: int) -> None:
        if ckpts.save(done, state, loader.state()):
            schedule.saved()
            held["checkpoint"] += ckpts.save_s[-1]
            w = ckpts.last_save
            log.info("checkpoint of step %d: saving to %s (training held %.2f s: %.2f s waiting for the "
                     "previous save, %.2f s copying the state to host memory; before that %.2f s waiting for "
                     "the steps in flight to finish computing)", done, ckpts.step_dir(done), ckpts.save_s[-1],
                     w["previous_save_s"], w["copy_s"], w["steps_in_flight_s"])

    try:
        with _StopFlag() as stop, jax.set_mesh(mesh):
            vote = Vote(mesh, 3)  # (signal, save in flight, still writing): all processes act at one step
            if not resuming and schedule.due(start):
                save(start)
            for step in range(start, t.steps):
                vote.cast(stop.signal, *ckpts.in_flight())
                signum, writing, busy = vote.agreed()
                if signum:
                    stopped = signal.Signals(signum).name
                    break
                ckpts.collect(writing, busy)  # a failed background write stops the run here, not at the next save
                batch = global_batch_arrays(next(loader), bsh, B)
                state, m = compiled(state, batch)
                if step + 1 < t.steps and schedule.due(step + 1):
                    save(step + 1)
                if ow.pending and ckpts.save_s:
                    ow.poll()  # the old run directory is deleted once a checkpoint of the new run commits
                atomic.test_pause("train-step")
                if pending is not None:
                    finish(*pending)
                pending = (step, m)
                if t.eval_every and eval_fn is not None and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                    finish(*pending)
                    pending = None
                    valid_loss = evaluate(step + 1)
            if pending is not None:
                finish(*pending)
    except CheckpointError:  # a failed save: Orbax's threads end before the error is reported
        with contextlib.suppress(Exception):
            ckpts.close()
        raise
    except UserError:  # TrainingError, or bad data met by the loader (a token id past the vocabulary)
        ckpts.close()  # a save in flight still commits
        raise
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    done = int(jax.device_get(state.step))
    if eval_fn is not None:
        try:
            valid_loss = evaluate(done)
        except UserError:
            ckpts.close()
            raise
    path = None
    if run.checkpoint.at_end or stopped or schedule.due(done):
        save(done)
        path = ckpts.step_dir(done)
    t0 = time.perf_counter()
    ckpts.close()  # waits for the last save to commit
    barrier("neox_jax.train.closed")  # no process leaves before process 0 has committed it (a launcher that
    # stops every process when one exits non-zero, srun --kill-on-bad-exit, then interrupts nothing)
    if path is not None:
        log.info("checkpoint of step %d committed (waited %.2f s for the write)", done, time.perf_counter() - t0)
    ow.confirm("finished")
    metrics.close()
    summary = {"steps": done, "loss": last.get("loss"), "valid_loss": valid_loss, "skipped_steps": skipped,
               "compile_s": compile_s, "tokens_per_s": last.get("tokens_per_s"),
               "checkpoint": str(path) if path else None, "started_at": start,
               "stopped_by": stopped}
    if stopped:
        log.warning("stopped by %s after step %d, its checkpoint committed: the same command resumes from it "
                    "(exit status %d)", stopped, done, 128 + signal.Signals[stopped].value)
    return summary
