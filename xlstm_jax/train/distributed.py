"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``).

A multi-process run is several copies of the same program, one per host or per GPU, joined by
``jax.distributed.initialize``: process 0 hosts the coordination service at
``coordinator_address``; every process connects to it, and from then on ``jax.devices()`` lists the
devices of all processes, a ``Mesh`` may span them, and XLA's collectives (NCCL on GPUs, Gloo on
CPUs) move data between processes. This module holds the few pieces the training job needs on top:

- ``plan_join`` decides from the options and the environment whether and how to join a run, and
  validates the options (``ValueError`` naming the option) before anything starts;
- ``initialize`` joins (CPU processes use the Gloo collectives, so the same run works on a laptop);
- ``failed_processes``, ``any_process``, ``same_on_all_processes``, ``barrier``: agreements between the
  processes (host-side flags all-gathered over the devices of all processes);
- ``process_rows``: the rows of a batch that this process feeds, from the batch's sharding;
- ``exit_at_once_on_failure``: a process that fails leaves at once (``os._exit``), so that the
  others fail fast in their next collective or, at the latest, when the coordination service misses
  its heartbeats (``heartbeat_timeout_seconds``), instead of all of them waiting for each other.

Everything here is a no-op (or the trivial answer) in a one-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import os
import socket
import sys
import time
import traceback
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

JOIN_MODES = ("auto", "on", "off")

# The variables by which JAX recognises a launch it can configure itself (jax.distributed.initialize
# with no arguments): a SLURM job step (srun) and Open MPI's mpirun / mpiexec.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OPEN_MPI_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")

DEFAULT_INITIALIZATION_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100


@dataclasses.dataclass(frozen=True)
class JoinSpec:
    """How this process joins a multi-process run (the arguments of ``jax.distributed.initialize``;
    None: JAX takes them from the cluster environment ``source``)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    initialization_timeout: int
    heartbeat_timeout_seconds: int
    source: str
    """``"options"`` (the three options given) or the detected environment (``"SLURM"``, ``"Open MPI"``)."""


def detect_cluster(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(name, number of processes) of a SLURM job step or an Open MPI launch that JAX configures
    itself, or None. Only launches of more than one process count (a lone ``srun python ...`` runs
    as one process)."""
    env = os.environ if environ is None else environ
    for name, variables, count in (
        ("SLURM", SLURM_VARIABLES, "SLURM_NTASKS"),
        ("Open MPI", OPEN_MPI_VARIABLES, "OMPI_COMM_WORLD_SIZE"),
    ):
        if all(v in env for v in variables):
            try:
                n = int(env[count])
            except ValueError:
                continue
            if n > 1:
                return name, n
    return None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets: ``[::1]:PORT``) -> (host, port); ``ValueError`` naming
    the option otherwise."""
    host, sep, port = str(text).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = f"--coordinator-address must be HOST:PORT with a port in 1..65535 (e.g. localhost:12345); got {text!r}"
    if not sep or not host or not port.isdigit() or any(c.isspace() for c in host):
        raise ValueError(bad)
    if not 1 <= int(port) <= 65535:
        raise ValueError(bad)
    return host, int(port)


def plan_join(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> JoinSpec | None:
    """Whether and how this process joins a multi-process run; None: it runs alone.

    ``mode``: ``"auto"`` joins when the three options ``coordinator_address``, ``num_processes``,
    ``process_id`` are given, or else when ``detect_cluster`` finds a SLURM step or an Open MPI launch
    of several processes (then ``jax.distributed.initialize`` reads them from the environment);
    ``"on"`` must join (options or environment); ``"off"`` never joins. The three options go
    together (all or none). Raises ``ValueError`` naming the option for a missing partner option, a
    process id out of range, a bad address, bad timeouts or options given with ``"off"``.
    """
    if mode not in JOIN_MODES:
        raise ValueError(f"--distributed must be one of {', '.join(JOIN_MODES)}; got {mode!r}")
    for name, value in (("--initialization-timeout", initialization_timeout),
                        ("--heartbeat-timeout-seconds", heartbeat_timeout_seconds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1; got {value!r}")
    trio = {"--coordinator-address": coordinator_address, "--num-processes": num_processes, "--process-id": process_id}
    given = [k for k, v in trio.items() if v is not None]
    if local_device_ids is not None:
        local_device_ids = tuple(int(i) for i in local_device_ids)
        if not local_device_ids or min(local_device_ids) < 0 or len(set(local_device_ids)) != len(local_device_ids):
            raise ValueError(f"--local-device-ids must be distinct device numbers >= 0; got {list(local_device_ids)}")
        given_any = given + ["--local-device-ids"]
    else:
        given_any = given
    if mode == "off":
        if given_any:
            raise ValueError(f"--distributed off runs one process; it takes no {', '.join(given_any)}")
        return None
    if given and len(given) < 3:
        missing = [k for k in trio if trio[k] is None]
        raise ValueError(
            f"{', '.join(given)} needs {' and '.join(missing)} too: a process joins a run with all three of "
            "--coordinator-address HOST:PORT, --num-processes N, --process-id I (or none of them under SLURM / Open MPI)"
        )
    if given:
        parse_address(coordinator_address)
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"--num-processes must be an integer >= 1; got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must lie in 0..{num_processes - 1} (--num-processes {num_processes}); got {process_id!r}")
        return JoinSpec(coordinator_address, num_processes, process_id, local_device_ids,
                        initialization_timeout, heartbeat_timeout_seconds, "options")
    cluster = detect_cluster(environ)
    if cluster is not None:
        return JoinSpec(None, None, None, local_device_ids, initialization_timeout, heartbeat_timeout_seconds, cluster[0])
    if mode == "on" or local_device_ids is not None:
        what = "--distributed on" if mode == "on" else "--local-device-ids"
        raise ValueError(
            f"{what} joins a multi-process run, but there is none to join: pass --coordinator-address HOST:PORT, "
            "--num-processes N and --process-id I, or start the processes with srun (SLURM) or mpirun (Open MPI)"
        )
    return None


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Block until something listens at host:port (process 0's coordination service), for at most
    ``timeout`` seconds; ``ValueError`` if nothing does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"no coordinator at --coordinator-address {host}:{port} after {timeout:.0f} s ({err.strerror or err}): "
                    "start process 0 with the same address (or raise --initialization-timeout)"
                ) from None
            time.sleep(0.25)


def _check_port_free(port: int) -> None:
    """``ValueError`` if process 0 cannot bind the coordinator's port because another program holds
    it (other bind errors, e.g. no IPv6 on this machine, are left to JAX)."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # this address family is not available here
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            return
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"--coordinator-address: process 0 cannot open port {port} for the coordinator "
                    f"({err.strerror}); choose another port"
                ) from None
        finally:
            sock.close()


def initialize(spec: JoinSpec, notify: Callable[[str], None] | None = None) -> None:
    """Join the run: ``jax.distributed.initialize`` with ``spec`` (before anything else uses JAX).

    CPU processes use JAX's Gloo collectives (``jax_cpu_collectives_implementation``), unless the
    environment variable ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chooses another. With explicit
    options, process 0 first checks that the coordinator's port is free and the others wait (up to
    ``initialization_timeout``) until process 0 listens, so that these mistakes are one clear
    ``ValueError``; JAX itself ends a process that cannot register within the timeout.
    """
    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {
        "initialization_timeout": spec.initialization_timeout,
        "heartbeat_timeout_seconds": spec.heartbeat_timeout_seconds,
    }
    accepted = inspect.signature(jax.distributed.initialize).parameters
    missing = [k for k in kwargs if k not in accepted]
    if missing:
        raise RuntimeError(f"jax.distributed.initialize of JAX {jax.__version__} has no argument(s) {missing}")
    if spec.local_device_ids is not None:
        kwargs["local_device_ids"] = list(spec.local_device_ids)
    start = time.monotonic()
    if spec.source == "options":
        host, port = parse_address(spec.coordinator_address)
        if notify is not None:
            notify(
                f"process {spec.process_id} of {spec.num_processes}: joining the run at {spec.coordinator_address} "
                f"(timeout {spec.initialization_timeout} s)"
            )
        if spec.process_id == 0:
            _check_port_free(port)
        else:
            _wait_for_coordinator(host, port, spec.initialization_timeout)
        kwargs["initialization_timeout"] = max(1, int(spec.initialization_timeout - (time.monotonic() - start)))
        jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id, **kwargs)
    else:
        if notify is not None:
            notify(f"joining the {spec.source} run (timeout {spec.initialization_timeout} s)")
        jax.distributed.initialize(**kwargs)


def process_index() -> int:
    """This process's index (0 in a one-process run)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """The number of processes of the run (1 without ``jax.distributed``)."""
    import jax

    return jax.process_count()


def _allgather_int32(values: Sequence[int]) -> np.ndarray:
    """(processes, len(values)) int32: every process's ``values``, on every process."""
    from jax.experimental import multihost_utils

    local = np.asarray(values, dtype=np.int32).reshape(1, -1)
    if process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True)).reshape(process_count(), -1)


def failed_processes(ok: bool) -> list[int]:
    """The indices of the processes whose ``ok`` is False (every process must call this)."""
    flags = _allgather_int32([0 if ok else 1])[:, 0]
    return [int(i) for i in np.flatnonzero(flags)]


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (every process must call this)."""
    return bool(_allgather_int32([1 if flag else 0]).any())


def same_on_all_processes(text: str) -> bool:
    """Whether every process passed the same ``text`` (compared by CRC-32; every process must call
    this)."""
    crc = zlib.crc32(text.encode("utf-8"))
    gathered = _allgather_int32([crc & 0xFFFF, crc >> 16])  # two 16-bit halves fit int32
    return bool((gathered == gathered[0]).all())


def barrier(name: str) -> None:
    """Wait until every process has reached ``barrier(name)``."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(sharding: Any, shape: tuple[int, ...]) -> slice | np.ndarray:
    """The rows of a global (B, ...) array with ``sharding`` held by this process's devices, in the
    order ``jax.make_array_from_process_local_data`` expects its local rows: the distinct row blocks
    of the addressable shards, ascending. A slice when they are contiguous, else an index array."""
    batch = shape[0]
    blocks = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows = index[0] if index else slice(None)
        blocks.add((rows.start or 0, batch if rows.stop is None else rows.stop))
    ordered = sorted(blocks)
    rows = np.concatenate([np.arange(a, b) for a, b in ordered]) if ordered else np.zeros((0,), np.int64)
    if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        return slice(int(rows[0]), int(rows[0] + rows.size))
    return rows


@contextlib.contextmanager
def exit_at_once_on_failure(passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """In a multi-process run, an exception (other than ``passthrough``, errors every process raises
    together) prints its traceback and ends this process at once with exit status 1 (``os._exit``,
    skipping ``jax.distributed``'s shutdown barrier, which would wait for the other processes while
    they wait for this one in a collective). The others then fail in their next collective, or are
    ended by the coordination service when this process's heartbeats stop. In a one-process run the
    exception propagates."""
    try:
        yield
    except passthrough:
        raise
    except BaseException as err:
        if process_count() == 1:
            raise
        i, n = process_index(), process_count()
        traceback.print_exc()
        what = "interrupted" if isinstance(err, KeyboardInterrupt) else f"failed: {type(err).__name__}: {err}"
        print(
            f"xlstm-jax: error: process {i} of {n} {what}; ending it at once, which stops the other processes",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
