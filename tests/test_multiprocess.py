"""Multi-process training on JAX's distributed runtime, on CPU (Gloo collectives).

The main test starts two processes with two simulated CPU devices each on localhost (subprocesses of
this test, a free port), trains a few steps of the ``tiny`` preset on the meshes (4, 1, 1) and
(2, 2, 1), and compares the per-step losses in metrics.jsonl (and the held-out losses) and the
checkpointed parameters and optimizer state, leaf by leaf, with one process on four devices (this
test's process: tests/conftest.py simulates eight); then it resumes the two-process run from its
checkpoint in one process, whose losses continue exactly as in the uninterrupted one-process run.
Others: Ctrl-C in one process stops both at the same step with a checkpoint, the death of one ends
the other with an error (no hang), option checks before any work, the helpers of
``xlstm_jax.train.distributed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from xlstm_jax import cli
from xlstm_jax.testing import relative_error
from xlstm_jax.tools import train_cmd
from xlstm_jax.train import distributed as dist
from xlstm_jax.train.checkpoint import CheckpointStore, read_json
from xlstm_jax.train.data import HeldoutBatches, heldout_batches
from xlstm_jax.train.run import GracefulStop, train
from xlstm_jax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6  # float32, relative (per value for losses, per leaf in norm for parameters)
# Adam's moments are running means of the raw (clipped) gradients and of their squares: they carry the
# rounding of the gradient's all-reduce, whose order differs between one process and two, undamped
# (measured: 2e-7..9e-7 for the first moment, up to 1.1e-6 for the second, whose relative error is
# twice the gradient's), while the parameters move by lr times their ratio (measured: <= 1.4e-7).
TOL_MOMENTS = 1e-5

# the tiny preset, short sequences; the warm-up is longer than every run here, so the learning rate
# of update n is n / 8 of the peak whatever --steps is: a run of 3 steps extended to 6 is the run of 6
TINY = [
    "train", "--preset", "tiny", "--context-length", "24", "--seq-len", "24", "--batch-size", "4",
    "--backend-option", "chunk_size=16", "--warmup-steps", "8", "--lr", "1e-2", "--log-every", "1",
    "--no-progress",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int, cache: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_"))}
    if cache is not None:  # a later launch of the same programs loads them instead of compiling
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
    )
    return env


class Launch:
    """``n`` processes of one run (``python -m xlstm_jax ARGS --coordinator-address ... --process-id
    i``), stdout and stderr to files; ``wait`` kills them all on a timeout; ``kill_all`` ends those
    still running (each by its own pid)."""

    def __init__(self, registry: list, log_dir: Path, name: str, args: list[str], n: int = 2, devices: int = 2,
                 cache: Path | None = None, ids: list[int] | None = None, per_process: dict[int, list[str]] | None = None,
                 timeout: int = 120):
        ids = list(range(n)) if ids is None else ids
        self.name, self.logs = name, [log_dir / f"{name}.{i}.log" for i in ids]
        address = f"localhost:{_free_port()}"
        self.procs: list[subprocess.Popen] = []
        registry.append(self)  # the fixture ends whatever was started, also if starting fails midway
        for i, log in zip(ids, self.logs):
            cmd = [sys.executable, "-m", "xlstm_jax", *args, *(per_process or {}).get(i, []),
                   "--coordinator-address", address, "--num-processes", str(n), "--process-id", str(i),
                   "--initialization-timeout", str(timeout)]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(devices, cache), cwd=REPO))

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def report(self) -> str:
        parts = []
        for i, p in enumerate(self.procs):
            parts.append(f"----- {self.name} process {i} (exit status {p.poll()}) -----\n{self.output(i)[-6000:]}")
        return "\n".join(parts)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{self.name}: still running after {timeout:.0f} s; killed\n{self.report()}")
        return [p.returncode for p in self.procs]

    def expect_success(self, timeout: float = 300) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"{self.name}: exit statuses {codes}\n{self.report()}"


@pytest.fixture
def launches():
    """Launches made by a test; any process still running at its end is killed."""
    made: list[Launch] = []
    yield made
    for launch in made:
        launch.kill_all()


def _rows(run_dir: Path, kind: str) -> dict[int, float]:
    with open(run_dir / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    steps = [r["step"] for r in rows if r["kind"] == kind]
    assert len(steps) == len(set(steps)), f"{kind} steps logged more than once in {run_dir}: {steps}"
    return {r["step"]: r["loss"] for r in rows if r["kind"] == kind}


def _assert_losses_match(run_dir: Path, ref: dict[str, dict[int, float]], steps: list[int], evals: list[int]):
    for kind, want in (("train", steps), ("eval", evals)):
        got = _rows(run_dir, kind)
        assert sorted(got) == want, f"{kind} steps in {run_dir}: {sorted(got)}, expected {want}"
        for s in want:
            a, b = got[s], ref[kind][s]
            assert abs(a - b) <= TOL * abs(b), f"{kind} loss at step {s}: {a!r} vs one process {b!r}"


def _checkpoint(model_config, tc, run_dir: Path, step: int):
    """(params, train_state, meta) of checkpoint ``step`` of ``run_dir``, on one device."""
    store = CheckpointStore(str(run_dir), read_only=True)
    try:
        assert step in store.all_steps(), f"no checkpoint {step} in {run_dir}: {store.all_steps()}"
        abstract_params, abstract_rest = Trainer(model_config, dataclasses.replace(tc, mesh=None)).abstract_train_state()
        return store.restore(step, abstract_params, abstract_rest)
    finally:
        store.close()


def _assert_states_match(got, want, where: str):
    params, rest, meta = got
    params_ref, rest_ref, meta_ref = want
    assert meta["data_state"] == meta_ref["data_state"] and meta["step"] == meta_ref["step"], (meta, meta_ref)
    assert int(rest["step"]) == int(rest_ref["step"])
    np.testing.assert_array_equal(np.asarray(rest["rng"]), np.asarray(rest_ref["rng"]))
    floats = {"params": (params, params_ref, TOL), "opt_state": (rest["opt_state"], rest_ref["opt_state"], TOL_MOMENTS)}
    for name, (a_tree, b_tree, tol) in floats.items():
        leaves = jax.tree_util.tree_leaves_with_path(a_tree)
        leaves_ref = jax.tree.leaves(b_tree)
        assert len(leaves) == len(leaves_ref)
        for (path, a), b in zip(leaves, leaves_ref):
            key = f"{where} {name}{jax.tree_util.keystr(path)}"
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, key
            if not np.issubdtype(a.dtype, np.floating):
                np.testing.assert_array_equal(a, b, err_msg=key)
                continue
            err = relative_error(a, b)  # NaN if either has a NaN: fails the comparison below
            assert err <= tol, f"{key}: relative error {err} (> {tol})"


def _configs(args: list[str]):
    """The (model, train) configs that `xlstm-jax` ARGS builds in one process."""
    parsed = cli.build_parser().parse_args(args)
    return train_cmd.build_configs(parsed)


def test_two_processes_equal_one_process_and_resume_in_one(tmp_path, launches, capsys):
    """Two processes x two CPU devices, meshes (4,1,1) and (2,2,1): per-step losses, held-out losses,
    parameters and optimizer state equal those of one process on four devices (1e-6 relative); the
    two-process run resumed in one process continues exactly as the uninterrupted run; generation
    from a two-process checkpoint in one process."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices in this process (tests/conftest.py simulates 8 on CPU)")
    t0 = time.monotonic()
    run_a, run_b, run_ref = tmp_path / "two_411", tmp_path / "two_221", tmp_path / "one_411"
    # A: mesh (4,1,1), 3 steps, held-out evaluation at steps 0 and 3 over the global mesh
    args_a = TINY + ["--mesh", "4,1,1", "--steps", "3", "--eval-every", "3", "--eval-batches", "1",
                     "--out-dir", str(run_a)]
    launch_a = Launch(launches, tmp_path, "A", args_a)
    # B: mesh (2,2,1) (FSDP across the two processes), 3 steps, no evaluation; at the same time
    args_b = TINY + ["--mesh", "2,2,1", "--steps", "3", "--eval-batches", "0", "--out-dir", str(run_b)]
    launch_b = Launch(launches, tmp_path, "B", args_b)
    # the one-process reference while A runs: 6 steps without interruption, checkpoints at 3 and 6
    args_ref = TINY + ["--mesh", "4,1,1", "--steps", "6", "--eval-every", "3", "--eval-batches", "1",
                       "--checkpoint-every", "3", "--out-dir", str(run_ref)]
    model_config, tc_ref = _configs(args_ref)
    summary_ref = train(model_config, tc_ref, progress=False, print_fn=lambda s: None)
    assert summary_ref["step"] == 6 and summary_ref["processes"] == 1
    ref = {"train": _rows(run_ref, "train"), "eval": _rows(run_ref, "eval")}
    assert sorted(ref["train"]) == [1, 2, 3, 4, 5, 6] and sorted(ref["eval"]) == [0, 3, 6]
    state_ref_3 = _checkpoint(model_config, tc_ref, run_ref, 3)
    launch_a.expect_success()
    t_a = time.monotonic()

    # A against the reference: process 0 wrote the log, both the checkpoint
    summary_a = read_json(run_a / "summary.json")
    assert summary_a["processes"] == 2 and summary_a["mesh"] == [4, 1, 1] and len(summary_a["devices"]) == 4
    assert "held-out loss" in launch_a.output(0) and "held-out loss" not in launch_a.output(1)
    _assert_losses_match(run_a, ref, [1, 2, 3], [0, 3])
    _assert_states_match(_checkpoint(model_config, tc_ref, run_a, 3), state_ref_3, "two processes (4,1,1), step 3:")

    # resume A in this one process (4 devices) up to step 6: as if never interrupted
    model_resume, tc_resume = _configs(TINY + ["--mesh", "4,1,1", "--steps", "6", "--eval-every", "3",
                                               "--eval-batches", "1", "--out-dir", str(run_a)])
    summary = train(model_resume, tc_resume, progress=False, print_fn=lambda s: None)
    assert summary["step"] == 6 and not summary["interrupted"] and summary["processes"] == 1
    _assert_losses_match(run_a, ref, [1, 2, 3, 4, 5, 6], [0, 3, 6])
    _assert_states_match(_checkpoint(model_config, tc_ref, run_a, 6), _checkpoint(model_config, tc_ref, run_ref, 6),
                         "two processes resumed in one, step 6:")

    launch_b.expect_success()
    _assert_losses_match(run_b, ref, [1, 2, 3], [])
    _assert_states_match(_checkpoint(model_config, tc_ref, run_b, 3), state_ref_3, "two processes (2,2,1), step 3:")
    # generation in one process from the checkpoint that the two processes wrote (FSDP-sharded)
    capsys.readouterr()
    assert cli.main(["generate", "--run-dir", str(run_b), "--prompt", "The ", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"# {run_b} step 3") and text[-1].startswith("The ")
    print(f"\ntwo-process test: A and the reference {t_a - t0:.0f} s, total {time.monotonic() - t0:.0f} s")


def _logged_steps(run_dir: Path) -> list[int]:
    """Training steps in metrics.jsonl so far (a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def _wait_for_step(run_dir: Path, launch: Launch, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _logged_steps(run_dir)):
            return
        if any(p.poll() is not None for p in launch.procs):
            pytest.fail(f"{launch.name}: a process ended before step {step}\n{launch.report()}")
        time.sleep(0.2)
    launch.kill_all()
    pytest.fail(f"{launch.name}: no step {step} after {timeout} s\n{launch.report()}")


def test_interrupt_one_process_stops_both_and_failure_ends_the_other(tmp_path, launches):
    """Ctrl-C (SIGINT) in process 1 only: both processes agree to stop after the same step, save a
    checkpoint there and exit 0. Resumed, then process 1 killed: process 0 ends with an error
    (non-zero status) within the heartbeat timeout instead of waiting for it forever."""
    run = tmp_path / "stop"
    args = TINY + ["--mesh", "4,1,1", "--steps", "100000", "--eval-batches", "0", "--checkpoint-every", "0",
                   "--heartbeat-timeout-seconds", "5", "--out-dir", str(run)]
    t_first = time.monotonic()
    launch = Launch(launches, tmp_path, "stop", args, cache=tmp_path / "jax_cache")
    _wait_for_step(run, launch, 2)
    launch.procs[1].send_signal(signal.SIGINT)
    launch.expect_success(timeout=120)
    summary = read_json(run / "summary.json")
    stopped = summary["step"]
    assert summary["interrupted"] and 2 <= stopped < 100000
    assert CheckpointStore(str(run), read_only=True).all_steps() == [stopped]
    assert max(_rows(run, "train")) == stopped
    assert "interrupt in another process" in launch.output(0)

    t_again = time.monotonic()
    again = Launch(launches, tmp_path, "kill", args, cache=tmp_path / "jax_cache")
    _wait_for_step(run, again, stopped + 1)
    assert f"resumed from {run / 'checkpoints'}/{stopped} " in again.output(0)
    t_kill = time.monotonic()
    print(f"\nresumed run at step {stopped + 1} after {t_kill - t_again:.0f} s (the first launch: {t_again - t_first:.0f} s)")
    again.procs[1].kill()
    codes = again.wait(timeout=90)
    assert codes[0] != 0, f"process 0 ended with status 0 after process 1 died\n{again.report()}"
    assert time.monotonic() - t_kill < 90


def test_join_options_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """Missing partner options, a process id out of range, a bad address, bad device ids and
    options with --distributed off are one-line user errors (exit 2) before JAX joins anything."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    out = str(tmp_path / "never")
    cases = [
        (["--num-processes", "2"], "--num-processes needs --coordinator-address and --process-id too"),
        (["--coordinator-address", "localhost:1234", "--process-id", "0"], "needs --num-processes too"),
        (["--coordinator-address", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
         "--process-id must lie in 0..1 (--num-processes 2); got 2"),
        (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator-address must be HOST:PORT"),
        (["--coordinator-address", "localhost:70000", "--num-processes", "2", "--process-id", "0"],
         "--coordinator-address must be HOST:PORT"),
        (["--coordinator-address", ":1234", "--num-processes", "2", "--process-id", "0"],
         "--coordinator-address must be HOST:PORT"),
        (["--num-processes", "0"], "--num-processes: must be an integer >= 1; got 0"),
        (["--process-id", "-1"], "--process-id: must be an integer >= 0; got -1"),
        (["--local-device-ids", "0,0"], "--local-device-ids: must be distinct integers"),
        (["--local-device-ids", "0"], "--local-device-ids joins a multi-process run, but there is none"),
        (["--distributed", "on"], "--distributed on joins a multi-process run, but there is none"),
        (["--distributed", "off", "--coordinator-address", "localhost:1234", "--num-processes", "2", "--process-id", "0"],
         "--distributed off runs one process; it takes no --coordinator-address, --num-processes, --process-id"),
        (["--initialization-timeout", "0"], "--initialization-timeout: must be an integer >= 1"),
    ]
    for extra, message in cases:
        assert cli.main(["train", "--out-dir", out, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("xlstm-jax: error: ") and message in err and err.count("\n") == 1, (extra, err)
    assert not os.path.exists(out)
    assert not jax.distributed.is_initialized()


def test_join_errors_end_every_process(tmp_path, launches):
    """Processes started with different training options all stop with exit status 2 (no hang); a
    process without its coordinator and a coordinator without its partner end after the timeout."""
    args = TINY + ["--mesh", "4,1,1", "--eval-batches", "0", "--out-dir", str(tmp_path / "never")]
    differ = Launch(launches, tmp_path, "differ", args, per_process={0: ["--steps", "3"], 1: ["--steps", "4"]})
    alone_1 = Launch(launches, tmp_path, "alone1", args, ids=[1], timeout=2)
    alone_0 = Launch(launches, tmp_path, "alone0", args, ids=[0], timeout=3)
    assert differ.wait(120) == [2, 2], differ.report()
    for i in (0, 1):
        assert "xlstm-jax: error: the processes of the run were started with different training options" in differ.output(i)
    assert alone_1.wait(60) == [2], alone_1.report()
    assert "xlstm-jax: error: no coordinator at --coordinator-address localhost:" in alone_1.output(0)
    codes = alone_0.wait(60)
    assert codes[0] != 0 and "Deadline" in alone_0.output(0), alone_0.report()  # JAX ends it after the timeout
    assert not os.path.exists(tmp_path / "never")


def test_port_checks():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ValueError, match=f"process 0 cannot open port {port}"):
            dist._check_port_free(port)
    dist._check_port_free(port)  # free again
    with pytest.raises(ValueError, match=f"no coordinator at --coordinator-address localhost:{port} after 1 s"):
        dist._wait_for_coordinator("localhost", port, 1)


def test_plan_join_and_cluster_detection():
    assert dist.plan_join("auto", environ={}) is None
    spec = dist.plan_join("auto", coordinator_address="[::1]:5000", num_processes=2, process_id=1, environ={})
    assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == ("[::1]:5000", 2, 1, "options")
    assert dist.parse_address("[::1]:5000") == ("::1", 5000) and dist.parse_address("node-3:80") == ("node-3", 80)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1"}
    assert dist.detect_cluster(slurm) == ("SLURM", 4)
    assert dist.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # a lone srun task runs alone
    assert dist.detect_cluster({k: v for k, v in slurm.items() if k != "SLURM_PROCID"}) is None  # salloc shell
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    assert dist.detect_cluster(ompi) == ("Open MPI", 2)
    spec = dist.plan_join("auto", environ=slurm, local_device_ids=[0, 1])
    assert spec.source == "SLURM" and spec.coordinator_address is None and spec.local_device_ids == (0, 1)
    assert dist.plan_join("off", environ=slurm) is None
    with pytest.raises(ValueError, match="needs --coordinator-address"):
        dist.plan_join("auto", num_processes=2, process_id=0, environ=slurm)


def test_process_rows_and_heldout_rows():
    """In one process a mesh's batch rows are all local; held-out rows build only the rows asked for."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    from xlstm_jax.models.xlstm_lm.sharding import batch_sharding, make_mesh

    assert dist.process_rows(batch_sharding(make_mesh((2, 2, 1))), (8, 5)) == slice(0, 8)
    tokens = (np.arange(3000) % 251).astype(np.uint8)
    batches = heldout_batches(tokens, 4, 32, 3)
    assert isinstance(batches, HeldoutBatches) and len(batches) == 3
    np.testing.assert_array_equal(batches.batch(1, np.array([0, 3])), batches[1][[0, 3]])
    np.testing.assert_array_equal(batches.batch(2, slice(2, 4)), batches[2][2:4])
    np.testing.assert_array_equal(batches[0][1], tokens[32:65].astype(np.int32))
    with pytest.raises(IndexError):
        batches.batch(3)


def test_graceful_stop_agrees_at_log_steps():
    """With an agreement function the stop flag is exchanged only at multiples of ``every``, and a
    stop requested elsewhere stops this process too."""
    calls = []

    def agree(flag):
        calls.append(flag)
        return flag or len(calls) == 2  # "another process" asks at the second exchange

    notes = []
    stop = GracefulStop(notes.append, agree=agree, every=3)
    assert [stop.should_stop(s) for s in (1, 2, 3, 4, 5)] == [False] * 5 and calls == [False]
    assert stop.should_stop(6) and stop.requested and "another process" in notes[-1]
    single = GracefulStop(notes.append)
    assert not single.should_stop(1)
    single.requested = True
    assert single.should_stop(2)
