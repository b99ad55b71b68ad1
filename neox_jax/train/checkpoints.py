"""Training checkpoints: Orbax `CheckpointManager` step directories under `RUN_DIR/checkpoints/`.

    RUN_DIR/checkpoints/STEP/         one directory per save, STEP = steps run (the data position)
      params/                         Orbax PyTree of the float32 parameters, chunked as a params
                                      checkpoint's (`neox_jax.checkpoint`), so `score`, `generate`,
                                      `convert` and `inspect` read a step directory as it is
      train_state/                    Orbax PyTree: step, updates, opt_state (Adam count, mu, nu),
                                      loss_scale (DeepSpeed's scaler state)
      loader/loader.json              {"step", "global_batch", "dataset_len"} (`Loader.state()`)
      run/run.json                    the resolved run config (`RunConfig.to_dict()`)
      config/config.json              the ModelConfig (what a params checkpoint's config.json holds)
      neox_jax/neox_jax.json          the marker: format, version, kind "train", step
      _CHECKPOINT_METADATA            Orbax's: item handlers, commit time

There is no RNG item: training has no dropout or other randomness after initialisation (the
parameters come from `train.seed`, the data order from `data.seed`), so the state above is all of it.

Writing (`TrainCheckpoints.save`): the steps dispatched so far finish (the state is their result),
the previous save finishes, Orbax copies the state to host memory, then writes in a background
thread while training continues (`checkpoint.async_save`); each wait is timed apart
(`last_save`).  Each process writes only the shards it owns, and the step appears under its final
name only after every item (and every process) has finished: Orbax writes
`STEP.orbax-checkpoint-tmp-*` and renames it on commit (on object stores, where renames are not
atomic, it writes a commit file instead).  A process killed
mid-save therefore leaves only a temporary directory, which the next run reports and removes.  A
background write that fails (full disk, permissions) stops the run before its next step: the loop
checks the save in flight before every step, without waiting (`in_flight`: a flag Orbax clears when
the write has ended; agreed over the processes by the loop's `distributed.Vote`), and collects it
once it has ended (`collect`), raising a CheckpointError that names that step's
directory and the cause (`wait`); `save` and `close` collect it too.  It leaves only a temporary
directory, and the checkpoints before it stay.  An existing step is never written again.  Which steps are written: `RunConfig.checkpoint` (every N
steps, every T minutes, listed steps, the Pythia preset, at the end and on SIGINT/SIGTERM); which
are kept: the newest `keep_last` plus every multiple of `keep_every`.

Reading (`TrainCheckpoints.restore`): every array is read straight into the sharding of the mesh
asking for it, which may differ from the mesh that saved it (Orbax reads only the slices each
device owns).  A damaged step (a truncated or unreadable array file) is a CheckpointError naming
the file; with `--resume-fallback` the resume takes the newest older step that restores, and the
damaged newer steps are moved aside (`set_aside`: one rename each, to `STEP.damaged`, which no
reader takes for a step) so that the retrained steps are saved in their place; nothing is deleted:
a checkpoint that failed to restore for a passing reason (a file system hiccup) is still there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .. import atomic
from .. import checkpoint as ckpt
from ..checkpoint import CheckpointError
from ..errors import UserError
from .config import CheckpointConfig, ConfigError, RunConfig, from_sections
from .state import TrainState

log = logging.getLogger("neox_jax")

KIND = "train"
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# run-config keys a resume may change: where and how the run executes, not what it computes
_MAY_DIFFER = {"mesh", "checkpoint", "train.grad_accum", "train.log_every", "train.eval_every",
               "train.eval_steps", "train.init_from", "train.peak_tflops", "train.tensorboard",
               "train.loss_chunk", "data.prefetch", "data.save_index_maps", "model.attention", "model.remat"}


def _ocp():
    import orbax.checkpoint as ocp  # lazily: slow to import

    return ocp


# ----------------------------------------------------------------------------- state <-> nested dicts


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def to_nested(tree: Any) -> dict:
    """A pytree (dataclasses, optax named tuples) as nested dicts of its leaves, keyed by path
    (e.g. opt_state/0/mu/layers/...): a plain structure every Orbax version stores the same way."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        d = out
        for k in path[:-1]:
            d = d.setdefault(_key(k), {})
        d[_key(path[-1])] = leaf
    return out


def from_nested(nested: dict, like: Any) -> Any:
    """The inverse of `to_nested`, with the structure of `like`."""
    leaves = []
    for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        d = nested
        for k in path:
            d = d[_key(k)]
        leaves.append(d)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _train_part(state: TrainState) -> dict:
    """The state but the params, as a pytree (dataclasses and optax tuples kept)."""
    return {"step": state.step, "updates": state.updates, "opt_state": state.opt_state,
            "loss_scale": state.loss_scale}


# ----------------------------------------------------------------------------- the manager


@contextlib.contextmanager
def _damaged():
    """A ConfigError from a step's own files (its marker, its run.json) means a damaged step: a
    CheckpointError, which a resume with --resume-fallback passes over."""
    try:
        yield
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


class TrainCheckpoints:
    """The step directories of one run (`RUN_DIR/checkpoints`), written and read with Orbax."""

    def __init__(self, directory: str | Path, run: RunConfig | None = None, *, read_only: bool = False):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.run = run
        c = run.checkpoint if run is not None else None
        self.timeout_s = c.write_timeout_s if c is not None else CheckpointConfig.write_timeout_s
        policy = None
        if c is not None and c.keep_last:
            from orbax.checkpoint import checkpoint_managers as cm

            parts = [cm.LatestN(n=c.keep_last)]
            if c.keep_every:
                parts.append(cm.EveryNSteps(interval_steps=c.keep_every))
            policy = cm.AnyPreservationPolicy(parts) if len(parts) > 1 else parts[0]
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(c is None or c.async_save), preservation_policy=policy,
            create=not read_only, read_only=read_only, save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
            async_options=ocp.AsyncOptions(timeout_secs=self.timeout_s),
            save_root_metadata=False)
        json_item = ocp.handlers.JsonCheckpointHandler
        handlers = {"params": ocp.handlers.StandardCheckpointHandler(),
                    "train_state": ocp.handlers.StandardCheckpointHandler(),
                    "loader": json_item(filename="loader.json"), "run": json_item(filename="run.json"),
                    "config": json_item(filename="config.json"), "neox_jax": json_item(filename=ckpt.MARKER)}
        self.incomplete = sorted(p.name for p in self.directory.iterdir() if _TMP.match(p.name)) \
            if self.directory.is_dir() else []
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise CheckpointError(f"{self.directory}: cannot create the checkpoint directory "
                                  f"({e.strerror or e})") from None
        # time each save() held the training loop (waiting for the previous save, then Orbax's copy
        # of the state to host memory); `last_save` splits the latest, with the wait for the steps
        # in flight before it, which is computing time the loop waits for anyway (one step later)
        self.save_s: list[float] = []
        self.last_save: dict[str, float] = {}
        self.writing: int | None = None  # the step being written in the background
        self.started = 0.0  # when its write started (time.monotonic)
        self.closed = False
        # from `save` until `wait` has collected that save: Orbax's error records of a failed write
        # are one line, the first (`checkpoint.quiet_orbax_errors`)
        self._quiet = contextlib.ExitStack()
        self.quiet: ckpt.OrbaxErrorRecords | None = None

    # -- listing

    def steps(self) -> list[int]:
        """Steps with a complete (committed) checkpoint, oldest first."""
        self.manager.reload()
        return sorted(int(s) for s in self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def set_aside(self, step: int) -> Path:
        """Move the step directory of a checkpoint that cannot be restored out of the way (one
        atomic rename to `STEP.damaged`, or `STEP.damaged-K` if that exists, fsynced), so that the
        step can be saved again; returns where it went.  Process 0 only (the caller)."""
        src = self.step_dir(step)
        dst, k = self.directory / f"{step}.damaged", 1
        while dst.exists() or dst.is_symlink():
            dst, k = self.directory / f"{step}.damaged-{k}", k + 1
        try:
            with atomic.HeldSignals():
                src.rename(dst)
                atomic.fsync_path(self.directory)
        except OSError as e:
            raise CheckpointError(f"{src}: cannot move the damaged checkpoint aside to {dst} "
                                  f"({e.strerror or e}); move or delete it, then resume again") from None
        return dst

    # -- writing

    def save(self, step: int, state: TrainState, loader_state: dict) -> bool:
        """Start writing the state after `step` steps (returns once the arrays are on the host;
        the files are written in the background).  A step that exists is left alone."""
        ocp = _ocp()
        if step in self.manager.all_steps():
            log.info("checkpoint of step %d exists; not written again", step)
            return False
        run = self.run
        marker = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "kind": KIND, "step": step,
                  "num_params": run.model.num_params()}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params, save_args=ckpt.save_args(state.params)),
            train_state=ocp.args.StandardSave(to_nested(_train_part(state))),
            loader=ocp.args.JsonSave(dict(loader_state)), run=ocp.args.JsonSave(run.to_dict()),
            config=ocp.args.JsonSave(run.model.to_dict()), neox_jax=ocp.args.JsonSave(marker))
        t0 = time.perf_counter()
        jax.block_until_ready(state)  # the steps dispatched so far: Orbax would wait for them too
        t1 = time.perf_counter()
        self.wait()  # the previous save, if it is still writing; its failure surfaces here
        t2 = time.perf_counter()
        self.quiet = self._quiet.enter_context(ckpt.quiet_orbax_errors())  # until `wait` collects this save
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # e.g. the step's temporary directory cannot be created
            self._quiet.close()
            raise CheckpointError(self._failed(step, e)) from None
        self.writing, self.started = step, time.monotonic()
        t3 = time.perf_counter()
        self.save_s.append(t3 - t1)
        self.last_save = {"steps_in_flight_s": t1 - t0, "previous_save_s": t2 - t1, "copy_s": t3 - t2}
        return True

    def in_flight(self) -> tuple[int, int]:
        """(step + 1 of the save in flight, 0 for none; 1 while it is still being written, else 0):
        what the loop casts into its per-step `Vote`.  Cheap and non-blocking: Orbax's public
        `is_saving_in_progress()` is a flag (a lock and a read) that its finalize thread clears when
        the write has ended, committed or failed.  (`check_for_errors()` is no use here: the
        finalize thread itself takes the write's error from the checkpointer, so from the loop it
        almost never sees one.)  With several processes Orbax clears that flag at a barrier, which a
        process whose write failed may reach while the others still wait at the write's own barrier
        until `checkpoint.write_timeout_s`: the two time out and the flag stays set; so a save in
        flight for longer than that timeout counts as ended (Orbax has failed it by then) and the
        failure is collected, at the latest twice that timeout after the save, in every process."""
        if self.writing is None:
            return 0, 0
        busy = self.manager.is_saving_in_progress() and time.monotonic() - self.started < self.timeout_s
        return self.writing + 1, int(busy)

    def collect(self, writing: int, busy: int) -> None:
        """Collect the save that `in_flight` (agreed over the processes) reported as ended in every
        process: `wait`, which joins a thread that has ended and raises a failed write's error
        (so a failed background write stops the run before its next step rather than at the next
        save).  Nothing when that save was collected since (by `save`) or is still being written."""
        if writing and not busy and self.writing is not None and self.writing + 1 == writing:
            step = self.writing
            self.wait()
            log.info("checkpoint of step %d committed", step)

    def wait(self) -> None:
        """Block until the save in flight has committed; a failed background write (full disk,
        permissions, an I/O error) is a CheckpointError naming its step directory and the cause."""
        step, self.writing = self.writing, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            _drain()
            if self.quiet is not None:
                self.quiet.quiesce()  # the writes tensorstore still had in flight
            raise CheckpointError(self._failed(step, e)) from None
        finally:
            self._quiet.close()  # Orbax's error records as they come again
            self.quiet = None

    def _failed(self, step: int | None, e: BaseException) -> str:
        where = self.step_dir(step) if step is not None else self.directory
        what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        cause = _first(e)
        if isinstance(e, TimeoutError) or "DEADLINE_EXCEEDED" in str(e):  # one of Orbax's barriers
            cause = (f"not written and committed within checkpoint.write_timeout_s = {self.timeout_s} s: "
                     "a write failed or stalled in some process; each process logged its first error")
        return (f"{where}: writing {what} failed ({cause}); it is not a checkpoint (its temporary "
                "directory is removed by the next run), the checkpoints before it are intact")

    def close(self) -> None:
        if self.closed:  # a second close (an --overwrite undone after an error) would upset Orbax's threads
            return
        try:
            self.wait()
        finally:  # also after a failed write: Orbax's threads end before the interpreter does
            self.manager.close()
            self.closed = True

    # -- reading

    def read_json(self, step: int, item: str) -> dict:
        names = {"loader": "loader.json", "run": "run.json", "config": "config.json", "neox_jax": ckpt.MARKER}
        f = self.step_dir(step) / item / names[item]
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: unreadable ({e.__class__.__name__})") from None

    def check_marker(self, step: int) -> None:
        """`step`'s marker (`neox_jax/neox_jax.json`) is a training step's, of this step: what
        `generate` and `convert` check before they read a step, checked before a resume too."""
        d = self.step_dir(step)
        with _damaged():  # a marker of the wrong shape (`{}`, a list)
            meta = ckpt.read_marker(d)
        f = d / "neox_jax" / ckpt.MARKER
        if meta.get("kind") != KIND or meta.get("step") != step:
            raise CheckpointError(f"{f}: kind {meta.get('kind')!r} and step {meta.get('step')!r}; a training "
                                  f"checkpoint of step {step} has kind {KIND!r} and step {step}")

    def saved_run(self, step: int) -> RunConfig:
        with _damaged():  # a damaged run.json (a run config that would not load)
            return from_sections(self.read_json(step, "run"), where=str(self.step_dir(step) / "run" / "run.json"))

    def restore(self, step: int, abstract: TrainState, *, params_only: bool = False) -> tuple[Any, dict]:
        """(state placed as `abstract`'s shardings say, loader state) of `step`; with params_only
        the params alone (the state's other leaves are not read)."""
        ocp = _ocp()
        items = {"params": ocp.args.StandardRestore(abstract.params)}
        if not params_only:
            items["train_state"] = ocp.args.StandardRestore(to_nested(_train_part(abstract)))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # tensorstore / orbax raise many types for damaged files
            raise CheckpointError(_restore_error(self.step_dir(step), step, e)) from None
        if params_only:
            return out["params"], {}
        part = from_nested(out["train_state"], _train_part(abstract))
        state = TrainState(step=part["step"], updates=part["updates"], params=out["params"],
                           opt_state=part["opt_state"], loss_scale=part["loss_scale"])
        return state, self.read_json(step, "loader")


def _drain(timeout_s: float = 300.0) -> None:
    """After a failed write, let Orbax's other writer threads of that save end (they may still be
    writing other items into its temporary directory), so closing the manager or exiting the
    interpreter does not pull their executors and event loops from under them
    (`checkpoint.settle_orbax_threads`; an Orbax thread's join() re-raises the thread's error, which
    used to escape from here: a full disk ended `train` with a traceback and exit status 1)."""
    ckpt.settle_orbax_threads(set(), timeout_s)


def _first(e: BaseException) -> str:
    what, where = atomic.io_error(e)  # an OSError, or tensorstore's text for one: "No space left on device"
    if what is not None:
        return f"{what}: {where}" if where else what
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{e.__class__.__name__}: {lines[0][:200]}" if lines else e.__class__.__name__


def _restore_error(step_dir: Path, step: int, e: BaseException) -> str:
    """One line naming what is damaged (`checkpoint.damaged_array`), or the error's first line."""
    hit = ckpt.damaged_array(e)
    if hit:
        where, tensor, what = hit
        return f"{where}: checkpoint of step {step} cannot be restored: tensor {tensor} unreadable ({what})"
    last = ckpt.error_chain(e)[-1]
    first = next((ln for ln in last.strip().splitlines() if ln.strip()), e.__class__.__name__)
    return f"{step_dir}: checkpoint of step {step} cannot be restored ({first[:300]})"


def at_step(state: TrainState, step: int, shardings: TrainState) -> TrainState:
    """`state` moved to `step` (`--start-step`): the data position and the LR schedule's count
    (`updates`) of that step; the optimizer moments and the loss scale stay as given (fresh)."""
    put = lambda s: jax.device_put(np.int32(step), s)  # noqa: E731
    return TrainState(step=put(shardings.step), updates=put(shardings.updates), params=state.params,
                      opt_state=state.opt_state, loss_scale=state.loss_scale)


# ----------------------------------------------------------------------------- schedules


class Schedule:
    """Decides after which steps the loop saves (`RunConfig.checkpoint`); the minutes rule is
    decided by process 0 and broadcast, so every process saves the same steps."""

    def __init__(self, run: RunConfig):
        self.cfg = run.checkpoint
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.cfg.due(step):
            return True
        if not self.cfg.every_minutes:
            return False
        late = time.monotonic() - self.last >= 60.0 * self.cfg.every_minutes
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
        return late

    def saved(self) -> None:
        self.last = time.monotonic()


# ----------------------------------------------------------------------------- resuming


def check_resumable(saved: RunConfig, run: RunConfig, where: str) -> None:
    """Refuse a resume whose config would compute something else (naming the first differing key);
    mesh, checkpoint schedule, logging cadence and the like may change."""
    a, b = saved.to_dict(), run.to_dict()
    for section in b:
        for key in sorted(set(a.get(section, {})) | set(b[section])):
            if section in _MAY_DIFFER or f"{section}.{key}" in _MAY_DIFFER:
                continue
            va, vb = a.get(section, {}).get(key), b[section].get(key)
            if va != vb:
                raise UserError(f"{where}: the run's {section}.{key} is {va!r}, the config now says {vb!r}; "
                                "a resume continues the same run (start another run directory, or pass "
                                "--overwrite to start over)")


def restore_latest(ckpts: TrainCheckpoints, run: RunConfig, abstract: TrainState, *,
                   fallback: bool = False) -> tuple[int, TrainState, dict]:
    """(step, state, loader state) of the newest complete checkpoint that restores; a damaged
    newest one is an error unless `fallback`, which then takes the next older one (logged) and
    moves the damaged newer ones aside (`TrainCheckpoints.set_aside`; logged), so that the steps
    trained again are saved in their place rather than skipped as existing."""
    if ckpts.incomplete:
        log.warning("%s: ignoring incomplete checkpoint(s) %s (a save was interrupted); removed",
                    ckpts.directory, ", ".join(ckpts.incomplete))
    steps = ckpts.steps()
    if not steps:
        raise UserError(f"{ckpts.directory}: no complete checkpoint to resume from")
    damaged: list[int] = []
    for i, step in enumerate(reversed(steps)):
        where = str(ckpts.step_dir(step))
        try:  # a damaged marker or run.json is a damaged step, as a damaged array is
            ckpts.check_marker(step)
            check_resumable(ckpts.saved_run(step), run, where)  # a UserError: another run, not damage
            state, loader_state = ckpts.restore(step, abstract)
        except CheckpointError as e:
            if not fallback or i == len(steps) - 1:
                hint = " (pass --resume-fallback to resume from the previous step)" if not fallback and \
                    len(steps) > 1 else ""
                raise CheckpointError(f"{e}{hint}") from None
            log.warning("%s; falling back to the previous checkpoint", e)
            damaged.append(step)
            continue
        if int(loader_state.get("step", -1)) != step or int(jax.device_get(state.step)) != step:
            raise CheckpointError(f"{where}: data position {loader_state.get('step')} and state step "
                                  f"{int(jax.device_get(state.step))} do not match the step directory")
        if damaged:
            _set_aside_damaged(ckpts, damaged, step)
        return step, state, loader_state
    raise AssertionError("unreachable")


def _set_aside_damaged(ckpts: TrainCheckpoints, damaged: list[int], resumed: int) -> None:
    """After a fallback to `resumed`: the damaged newer steps leave their step names (process 0
    renames, every process then rereads the steps), so the retrained steps are saved anew."""
    from ..distributed import barrier

    if jax.process_index() == 0:
        for step in sorted(damaged):
            dst = ckpts.set_aside(step)
            log.warning("%s: checkpoint of step %d cannot be restored; moved aside to %s (kept, not deleted: "
                        "delete it once it is not needed), so that the step is trained again from step %d "
                        "and its checkpoint written anew", ckpts.step_dir(step), step, dst, resumed)
    barrier("neox_jax.train.damaged_set_aside")
    if ckpts.steps()[-1] != resumed:
        raise CheckpointError(f"{ckpts.step_dir(max(damaged))}: still a step directory after it was moved aside "
                              "(another process writing here?)")


def has_checkpoints(run_dir: Path) -> bool:
    d = Path(run_dir) / "checkpoints"
    return d.is_dir() and any(c.name.isdigit() and ckpt.is_checkpoint(c) for c in d.iterdir())


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines the resumed run will write again (train steps >= step, validations
    after step), so the file reads as one uninterrupted run."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return
    keep = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if ("valid_loss" in rec and rec["step"] <= step) or ("valid_loss" not in rec and rec["step"] < step):
            keep.append(line)
    f.write_text("".join(x + "\n" for x in keep))


__all__ = ["TrainCheckpoints", "Schedule", "restore_latest", "at_step", "check_resumable", "has_checkpoints",
           "truncate_metrics", "to_nested", "from_nested", "KIND"]
