"""Multi-process start-up: when to call `jax.distributed.initialize`, with what, and process-0 guards.

JAX's multi-controller runtime runs one Python process per host (or per GPU); every process runs the
same program, feeds its own rows of the global batch, and XLA's collectives join them.  This module
decides, before anything touches a JAX backend, whether this process is one of several and how to
reach the others.  The first source that applies wins:

  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` on the command line, or
     the same keys in the run config's `mesh:` section (`mesh.coordinator`, `mesh.num_processes`,
     `mesh.process_id`); command-line values override the config's
  2. environment: NEOX_JAX_COORDINATOR, NEOX_JAX_NUM_PROCESSES, NEOX_JAX_PROCESS_ID (what
     `launch/local.sh` and the Kubernetes manifest set)
  3. SLURM: `srun` with more than one task (SLURM_NTASKS > 1, SLURM_PROCID, SLURM_STEP_NODELIST); the
     coordinator is the first node of the step, port from the job id (JAX's own SLURM detection)
  4. NEOX_JAX_DISTRIBUTED=auto: `jax.distributed.initialize()` with no arguments, letting JAX detect the
     cluster (Cloud TPU pods and multislice, GKE, Open MPI); what `launch/tpu_pod.sh` sets

NEOX_JAX_INIT_TIMEOUT (seconds, default 300) bounds the wait for all processes to reach the coordinator.
JAX reports an unreachable coordinator or a taken port by aborting inside its C++ runtime, so with an
explicit coordinator both are checked first, in Python, and reported as one line: process 0 checks
that it can listen on the coordinator's port, every other process waits (up to that timeout) until
the port accepts connections.  Past that point (a process that never arrives) JAX still aborts the
process with its own message.

With none of these the process runs alone and nothing is initialised.  On CPU the cross-process
collectives are gloo (set explicitly, so the choice is logged and does not depend on JAX's default).

After start-up only process 0 logs at INFO (the other processes log warnings and errors only, each
line prefixed with its process id), shows progress bars and writes metrics and config files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Mapping

from .errors import UserError

log = logging.getLogger("neox_jax")

ENV_COORDINATOR = "NEOX_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "NEOX_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "NEOX_JAX_PROCESS_ID"
ENV_AUTO = "NEOX_JAX_DISTRIBUTED"
ENV_TIMEOUT = "NEOX_JAX_INIT_TIMEOUT"


class DistributedError(UserError):
    """Inconsistent or incomplete multi-process settings."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the others.  `coordinator` is None when JAX detects the cluster itself
    (`source` 'slurm' or 'auto'); then the process count and id are known only after start-up."""

    source: str  # explicit | environment | slurm | auto
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def describe(self) -> str:
        if self.coordinator is None:
            return f"{self.source} (cluster detected by jax.distributed)"
        return (f"{self.source}: process {self.process_id} of {self.num_processes}, "
                f"coordinator {self.coordinator}")


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _check_coordinator(addr: str, name: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{name} must be HOST:PORT, got {addr!r}")
    return addr


def _explicit(coordinator: str | None, num_processes: int | None, process_id: int | None,
              names: tuple[str, str, str], source: str) -> Plan | None:
    given = [v not in (None, "") for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return None
    if not all(given):
        missing = [n for n, g in zip(names, given) if not g]
        raise DistributedError(f"multi-process settings incomplete: {', '.join(missing)} not given "
                               f"(give all of {', '.join(names)})")
    n, i = _int(num_processes, names[1]), _int(process_id, names[2])
    if n < 1:
        raise DistributedError(f"{names[1]} must be >= 1, got {n}")
    if not 0 <= i < n:
        raise DistributedError(f"{names[2]} {i} outside [0, {n}) ({names[1]} is {n})")
    return Plan(source, _check_coordinator(str(coordinator), names[0]), n, i)


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] | None = None) -> Plan | None:
    """The plan for this process (None: run alone).  Pure: reads only its arguments and `env`."""
    env = os.environ if env is None else env
    plan = _explicit(coordinator, num_processes, process_id,
                     ("--coordinator / mesh.coordinator", "--num-processes / mesh.num_processes",
                      "--process-id / mesh.process_id"), "explicit")
    if plan is None:
        plan = _explicit(env.get(ENV_COORDINATOR), env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID),
                         (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), "environment")
    if plan is not None:
        return plan if plan.num_processes > 1 else None
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks is not None and "SLURM_PROCID" in env:
        if _int(tasks, "SLURM_NTASKS") > 1:
            return Plan("slurm")
        return None
    auto = env.get(ENV_AUTO, "")
    if auto:
        if auto != "auto":
            raise DistributedError(f"{ENV_AUTO} must be 'auto' (or unset), got {auto!r}")
        return Plan("auto")
    return None


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def check_coordinator(plan: Plan, timeout: float, *, poll: float = 1.0) -> None:
    """Before JAX's runtime starts: process 0 must be able to listen on the coordinator's port; every
    other process waits until that port accepts a TCP connection.  Raises DistributedError naming the
    address (JAX itself would abort in C++ after its own timeout)."""
    import errno
    import socket
    import time

    host, port = _host_port(plan.coordinator)
    if plan.process_id == 0:
        for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((addr, port))
                return
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise DistributedError(f"coordinator {plan.coordinator}: port {port} is already in use on this "
                                           "host (another run?); choose another --coordinator port") from None
                if family == socket.AF_INET6:
                    continue  # no IPv6 here: try IPv4
                raise DistributedError(f"coordinator {plan.coordinator}: process 0 cannot listen on port {port} "
                                       f"({e.strerror or e})") from None
        return
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(poll, 5.0)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            why = last.strerror if isinstance(last, OSError) and last.strerror else last
            raise DistributedError(f"coordinator {plan.coordinator} unreachable for {timeout:g} s from process "
                                   f"{plan.process_id} of {plan.num_processes} ({why}): is process 0 running, "
                                   f"and is the port open? ({ENV_TIMEOUT} sets the wait)")
        time.sleep(poll)


_started: Plan | None = None


def initialize(plan: Plan | None) -> None:
    """Start JAX's distributed runtime for `plan` (must run before any JAX backend is used);
    then quiet the INFO log of every process but 0.  No-op for None or when already started."""
    global _started
    if plan is None or _started is not None:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service installs its own SIGTERM handler, which only records a notice for
    # `reached_preemption_sync_point` (not used here): a SIGTERM during setup or compilation was then
    # swallowed and the run trained to its end (exit 0).  Off: SIGTERM stays ours in every phase (the
    # CLI's Terminated, exit 143; the loop's stop flag and per-step vote during the steps).
    jax.config.update("jax_enable_preemption_service", False)
    sigterm = signal.getsignal(signal.SIGTERM)
    # seconds to wait for every process to reach the coordinator (JAX's default: 300)
    timeout = _int(os.environ.get(ENV_TIMEOUT, "300"), ENV_TIMEOUT)
    log.log(logging.INFO if plan.process_id in (None, 0) else logging.DEBUG,
            "jax.distributed: joining (%s); waiting up to %d s for every process", plan.describe(), timeout)
    if plan.coordinator is not None:
        check_coordinator(plan, timeout)
    try:
        if plan.coordinator is None:
            jax.distributed.initialize(initialization_timeout=timeout)
        else:
            jax.distributed.initialize(coordinator_address=plan.coordinator, num_processes=plan.num_processes,
                                       process_id=plan.process_id, initialization_timeout=timeout)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DistributedError(f"jax.distributed.initialize ({plan.describe()}) failed: {first}") from None
    _started = plan
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ours again at the C level, whatever the runtime installed
    pid, n = jax.process_index(), jax.process_count()
    if pid != 0:
        logging.getLogger("neox_jax").setLevel(logging.WARNING)
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(f"[process {pid}] %(asctime)s %(levelname)s %(message)s",
                                             datefmt="%H:%M:%S"))
    log.info("jax.distributed: %s; %d processes, %d local / %d global devices", plan.describe(), n,
             jax.local_device_count(), jax.device_count())


def is_lead() -> bool:
    """True in process 0 (the one that logs, shows progress and writes run files)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_bytes(data: bytes, size: int) -> bytes:
    """Process 0's `data` (cut or zero-padded to `size` bytes) in every process; the others' `data` is
    ignored.  Every process must call it (a collective)."""
    import numpy as np
    from jax.experimental import multihost_utils

    buf = np.zeros(size, np.uint8)
    data = data[:size]
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8))


def lead_decides(action) -> None:
    """Run `action` in process 0 only; a UserError it raises is raised in every process, with its
    message (so all refuse alike and none is left waiting for the others in a collective).  Any other
    error is raised in process 0 as it is, and in the others as a UserError saying so."""
    import jax

    error, failure = "", None
    if jax.process_index() == 0:
        try:
            action()
        except UserError as e:
            error = str(e)
        except Exception as e:
            failure, error = e, f"process 0 failed: {e.__class__.__name__}: {e}"
    if jax.process_count() > 1:
        error = broadcast_bytes(error.encode(), 4096).rstrip(b"\0").decode(errors="replace")
    if failure is not None:
        raise failure
    if error:
        raise UserError(error)


class Vote:
    """Values every process agrees on at the same step, without waiting for the device: each is the
    largest any process cast.  The training loop casts, before each step, the signal that asked this
    process to stop (0: none) and whether its checkpoint save in flight is still being written, so
    that every process stops after the same step (a scheduler may signal one task first; a process
    that left alone would leave the others waiting in the next step's collectives), and collects a
    finished save (raising its error) at the same step.

    One process: `agreed` returns the last cast, at once.  Several: `cast` dispatches a jitted max
    over one row of ints per device (each process filling its own devices), queued behind the step
    before it; `agreed` reads every cast but the newest, which the loop has by then waited for anyway
    (the metrics of the step before): the agreement comes one step later than one process alone
    would act, and every process acts on the same values."""

    def __init__(self, mesh, size: int):
        import collections

        import jax

        self._multi = jax.process_count() > 1
        self._local = (0,) * size
        self._casts: collections.deque = collections.deque()
        if self._multi:
            import jax.numpy as jnp
            from jax.sharding import NamedSharding, PartitionSpec

            self._shape = (mesh.devices.size, size)
            self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
            self._max = jax.jit(lambda v: jnp.max(v, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def cast(self, *values: int) -> None:
        import jax
        import numpy as np

        if not self._multi:
            self._local = tuple(values)
            return
        row = np.asarray(values, np.int32)
        votes = jax.make_array_from_callback(
            self._shape, self._sharding, lambda idx: np.tile(row, (len(range(self._shape[0])[idx[0]]), 1)))
        self._casts.append(self._max(votes))

    def agreed(self) -> tuple[int, ...]:
        """The largest of each value over the processes (one process: its last cast; several: the
        cast before the newest; zeros before there is one)."""
        if not self._multi:
            return self._local
        out = (0,) * self._shape[1]
        while len(self._casts) > 1:
            out = tuple(int(x) for x in self._casts.popleft())
        return out
