"""The training job: the run directory, the resumable loop, its log, checkpoints and graceful stop.

``train(model_config, train_config)`` is the whole job: check the settings
(``config.check_run_settings``), prepare the data (``data.prepare_data``), check and create the run
directory (``prepare_run_dir``), init or resume from the newest checkpoint (parameters, optimizer,
step, RNG and the data iterator position), then the loop: one jitted step per batch
(``trainer.Trainer``), the loss of every step to ``metrics.jsonl``, a progress bar with loss and
tokens/s, periodic evaluation and checkpoints. Ctrl-C (SIGINT) stops after the current step and
saves a checkpoint at it, so resuming loses no step (a second Ctrl-C aborts).

Several processes (``xlstm_jax.train.distributed``: joined by ``jax.distributed.initialize``, a
mesh over the devices of all of them) run the same loop: only ``RunLog`` writes (console, progress
bar, metrics, summary), and only on process 0; process 0 prepares the run directory, which every
process must see (a shared file system; checked); each process reads only its rows
(``Trainer.local_rows``) of every batch; checkpoints are saved and restored by every process together
(Orbax coordinates them) and restore onto any number of processes or devices; a stop (Ctrl-C in any
process) is agreed by all at the next multiple of ``log_every`` steps (``GracefulStop.should_stop``),
so that all save the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from xlstm_jax.models.xlstm_lm.config import xLSTMLMConfig

from . import checkpoint as ckpt
from . import distributed as dist
from .config import RUN_DEFINING_FIELDS, TrainConfig, check_run_settings, sequence_length
from .data import DataState, RunData, bits_per_byte, prepare_data
from .flops import device_peak_tflops, mfu, model_flops
from .trainer import Trainer, TrainState, get_trainer

__all__ = [
    "GracefulStop",
    "RunLog",
    "check_run_dir",
    "prepare_run_data",
    "prepare_run_dir",
    "prepare_shared_run_dir",
    "progress_text",
    "run_tokenizer",
    "train",
]


# ---------------------------------------------------------------------------------- run directory
def _run_record(model_config: xLSTMLMConfig, tc: TrainConfig) -> dict[str, Any]:
    # "tokenizer" at the top level is what `generate --run-dir` reads
    return {"model": model_config.to_dict(), "train": tc.to_dict(), "tokenizer": tc.tokenizer}


# TrainConfig fields added after run directories were first written: an old run's config.json
# lacks them and had their defaults
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def check_run_dir(model_config: xLSTMLMConfig, tc: TrainConfig, overwrite: bool = False) -> None:
    """Check, without writing anything, that ``tc.out_dir`` can hold this run.

    A directory that is not a run directory is refused; an existing run must have the same model
    config and the same run-defining settings (``config.RUN_DEFINING_FIELDS``: resuming would not
    continue the same run otherwise) unless ``overwrite``; ``overwrite`` deletes run directories only.
    Raises ``ValueError`` saying what differs.
    """
    out = tc.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out-dir {out!r} exists and is not a directory")
    if not os.path.isdir(out):
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--out-dir {out!r} cannot be created: {parent!r} is not writable")
        return
    known = {ckpt.CONFIG_FILE, ckpt.CHECKPOINT_DIR, ckpt.METRICS_FILE, ckpt.SUMMARY_FILE}
    entries = set(os.listdir(out))
    if overwrite:
        others = sorted(entries - known - {ckpt.CONFIG_FILE + ".tmp", ckpt.SUMMARY_FILE + ".tmp"})
        if others:
            raise ValueError(f"--overwrite deletes run directories only; {out!r} also holds {others[:5]}")
        return
    path = os.path.join(out, ckpt.CONFIG_FILE)
    if not os.path.exists(path):
        return  # an empty directory, or one without a run yet
    have = ckpt.read_json(path)
    want = _run_record(model_config, tc)
    try:  # a run written before a config field existed: the field's default (what it trained with)
        have["model"] = xLSTMLMConfig.from_dict(have.get("model", {})).to_dict()
    except (TypeError, ValueError):
        pass  # unknown fields: compared as written (and reported as different below)
    if have.get("model") != want["model"]:
        diff = sorted(k for k in want["model"] if have.get("model", {}).get(k) != want["model"][k])
        raise ValueError(
            f"run directory {out!r} holds a model with a different config (fields {diff}); "
            "use another --out-dir or --overwrite"
        )
    had = have.get("train", {})
    diff = sorted(k for k in RUN_DEFINING_FIELDS if had.get(k, _FIELD_DEFAULTS[k]) != want["train"][k])
    if diff:
        raise ValueError(
            f"run directory {out!r} was trained with different settings {diff}; resuming would "
            "not continue the same run: use another --out-dir or --overwrite"
        )


def prepare_run_dir(model_config: xLSTMLMConfig, tc: TrainConfig, overwrite: bool = False) -> None:
    """``check_run_dir``, then create the run directory (deleting the old run if ``overwrite``) and
    write its config.json."""
    check_run_dir(model_config, tc, overwrite)
    if overwrite and os.path.isdir(tc.out_dir):
        shutil.rmtree(tc.out_dir)
    os.makedirs(tc.out_dir, exist_ok=True)
    ckpt.write_json(os.path.join(tc.out_dir, ckpt.CONFIG_FILE), _run_record(model_config, tc))


def prepare_shared_run_dir(model_config: xLSTMLMConfig, tc: TrainConfig, overwrite: bool = False) -> None:
    """``prepare_run_dir`` for a run of one or more processes (every process calls it): process 0
    prepares the directory, then every process checks that it sees process 0's config.json
    (``--out-dir`` must be on a file system that all processes share). On every process together:
    process 0 raises its ``ValueError`` or ``OSError`` of ``prepare_run_dir``, the others a
    ``ValueError`` saying so; a directory that not all processes see is a ``ValueError`` naming them."""
    if dist.process_count() == 1:
        prepare_run_dir(model_config, tc, overwrite)
        return
    dist.barrier("xlstm_jax.run_dir.checked")  # every process has finished reading the directory
    error: BaseException | None = None
    if dist.process_index() == 0:
        try:
            prepare_run_dir(model_config, tc, overwrite)
        except (OSError, ValueError) as err:
            error = err
    failed = dist.failed_processes(error is None)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process 0 could not prepare the run directory {tc.out_dir!r} (see its error)")
    path = os.path.join(tc.out_dir, ckpt.CONFIG_FILE)
    deadline = time.monotonic() + 10.0  # network file systems may show a new file late
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = dist.failed_processes(os.path.exists(path))
    if blind:
        raise ValueError(
            f"process(es) {blind} do not see {path}, written by process 0: --out-dir must be on a file "
            "system shared by all processes of the run"
        )


def prepare_run_data(model_config: xLSTMLMConfig, tc: TrainConfig) -> RunData:
    """``check_run_settings`` and the run's data (``data.prepare_data``); ``ValueError`` on bad input.

    Everything a user can get wrong about a run, short of the run directory, fails here, before any
    file is written or any function is compiled.
    """
    check_run_settings(model_config, tc)
    encode = None
    if tc.tokenizer != "bytes":
        tok = run_tokenizer(model_config, tc)
        encode = tok.encode
    return prepare_data(
        tc.data, batch_size=tc.batch_size, seq_len=sequence_length(model_config, tc), seed=tc.seed,
        heldout_fraction=tc.heldout_fraction, eval_batches=tc.eval_batches, vocab_size=model_config.vocab_size,
        encode=encode,
        pack=tc.pack, doc_separator=tc.doc_separator,
    )


def run_tokenizer(model_config: xLSTMLMConfig, tc: TrainConfig):
    """The tokenizer of the run (``tc.tokenizer`` through ``xlstm_jax.text.load_tokenizer``);
    ``ValueError`` if it cannot be read or has more tokens than the model's vocabulary."""
    from xlstm_jax.text import load_tokenizer

    tok = load_tokenizer(tc.tokenizer)
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens, more than the model's vocabulary of "
            f"{model_config.vocab_size}"
        )
    return tok


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop metrics lines after ``last_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path, "w") as fh:
        fh.writelines(lines)


# ------------------------------------------------------------------------------------- the log
def progress_text(
    loss: float | None, eval_loss: float | None, tokens_per_s: float | None, mfu: float | None = None
) -> str:
    """The progress bar's text: only the figures known so far (None or NaN: not shown)."""
    parts = []
    if loss is not None and not math.isnan(loss):
        parts.append(f"loss {loss:.3f}")
    if eval_loss is not None and not math.isnan(eval_loss):
        parts.append(f"eval {eval_loss:.3f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if mfu is not None:
        parts.append(f"MFU {mfu:.1%}")
    return "  ".join(parts)


class RunLog:
    """Everything a run writes besides checkpoints: console lines, the progress bar, metrics.jsonl
    and summary.json. Only a ``writer`` writes; the others (the other processes of a multi-process
    run) call the same methods, which then do nothing."""

    def __init__(
        self, run_dir: str, *, writer: bool = True, progress: bool = True,
        print_fn: Callable[[str], None] | None = None,
    ):
        self.writer = writer
        self.metrics_path = os.path.join(run_dir, ckpt.METRICS_FILE)
        self.summary_path = os.path.join(run_dir, ckpt.SUMMARY_FILE)
        self._progress = progress and writer
        self._print = print_fn
        self._bar = None
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.tokens_per_s: float | None = None
        self.mfu_of: Callable[[float | None], float | None] = lambda _: None  # tokens/s -> MFU

    def say(self, text: str) -> None:
        """A console line (above the progress bar)."""
        if not self.writer:
            return
        if self._print is not None:
            self._print(text)
        else:
            from tqdm.auto import tqdm

            tqdm.write(text)

    def start(self, total: int, initial: int, resumed_from: int | None) -> None:
        """Open the progress bar; keep metrics up to ``resumed_from`` (drop all when None)."""
        if not self.writer:
            return
        if resumed_from is None:
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
        else:
            _truncate_metrics(self.metrics_path, resumed_from)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                         disable=not self._progress)

    def step_done(self) -> None:
        """Advance the progress bar by one step."""
        if self._bar is not None:
            self._bar.update(1)

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(progress_text(self.loss, self.eval_loss, self.tokens_per_s, self.mfu_of(self.tokens_per_s)))

    def train_rows(self, rows: list[dict[str, Any]], tokens_per_s: float | None) -> None:
        """Append per-step training rows; the bar shows their mean loss and the throughput."""
        if not self.writer or not rows:
            return
        with open(self.metrics_path, "a") as fh:
            for row in rows:
                fh.write(json.dumps({"step": row["step"], "kind": "train", **{k: v for k, v in row.items() if k != "step"}}) + "\n")
        self.loss = float(np.mean([row["loss"] for row in rows]))
        self.tokens_per_s = tokens_per_s
        self._refresh()

    def eval_row(self, step: int, loss: float) -> None:
        """Append an evaluation and print it."""
        self.eval_loss = loss
        if not self.writer:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, "kind": "eval", "loss": loss}) + "\n")
        self.say(f"step {step}: held-out loss {loss:.4f} nats/byte = {bits_per_byte(loss):.3f} bits/byte")
        self._refresh()

    def summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json."""
        if self.writer:
            ckpt.write_json(self.summary_path, summary)

    def close(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ------------------------------------------------------------------------------- graceful stop
class GracefulStop:
    """SIGINT sets ``requested``; the loop stops at the next step boundary. A second SIGINT aborts.

    In a multi-process run (``agree`` given: an or over the processes, ``distributed.any_process``),
    the processes agree every ``every`` steps whether any of them was interrupted, so that all stop
    after the same step.
    """

    def __init__(self, notify: Callable[[str], None], agree: Callable[[bool], bool] | None = None, every: int = 1):
        self.requested = False
        self._notify = notify
        self._agree = agree
        self._every = max(int(every), 1)
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._agree is None:
            self._notify("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")
        else:
            self._notify(
                f"interrupt: all processes stop at the next multiple of {self._every} steps and save a "
                "checkpoint (Ctrl-C again to abort)"
            )

    def should_stop(self, step: int | None = None) -> bool:
        """Whether the run stops after ``step`` (just finished). With ``agree``: only at multiples
        of ``every`` (every process must call it at every step), true for all processes if any of
        them was interrupted."""
        if self._agree is None:
            return self.requested
        if step is None or step % self._every:
            return False
        stop = self._agree(self.requested)
        if stop and not self.requested:
            self.requested = True  # a Ctrl-C from now on aborts
            self._notify("interrupt in another process: stopping after this step and saving a checkpoint")
        return stop

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _peak_memory(devices) -> list[int | None]:
    out = []
    for d in devices:
        if d.process_index != jax.process_index():
            out.append(None)  # another process's device: its statistics are not visible here
            continue
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        out.append(int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None)
    return out


# ------------------------------------------------------------------------------------- the loop
class _Throughput:
    """Tokens/s of the log intervals after the first (which includes compilation); evaluation and
    checkpoint time is excluded by ``pause``."""

    def __init__(self, step: int, tokens_per_step: int):
        self.t, self.step, self.tokens_per_step = time.perf_counter(), step, tokens_per_step
        self.steady: list[tuple[float, int]] = []
        self._first = True

    def interval(self, step: int) -> float:
        """Close the interval ending at ``step``; its tokens/s."""
        now = time.perf_counter()
        dt, ntok = now - self.t, (step - self.step) * self.tokens_per_step
        if not self._first:
            self.steady.append((dt, ntok))
        self._first = False
        self.t, self.step = now, step
        return ntok / max(dt, 1e-9)

    def pause(self) -> None:
        """Restart the clock (after work that is not training)."""
        self.t = time.perf_counter()

    def tokens_per_s(self) -> float | None:
        sec = sum(t for t, _ in self.steady)
        return sum(n for _, n in self.steady) / sec if sec > 0 else None


def train(
    model_config: xLSTMLMConfig,
    tc: TrainConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    print_fn: Callable[[str], None] | None = None,
    data: RunData | None = None,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run ``tc.out_dir``; returns the summary (also written to summary.json).

    ``data``: the result of ``prepare_run_data(model_config, tc)`` if the caller already made it
    (the CLI does, to report bad input before anything starts); otherwise it is made here.
    ``on_step(step, metrics)`` is called after every step (tests use it to send SIGINT).
    ``peak_tflops``: the peak rate of one device for the MFU figure (default: the vendor figure of
    ``flops.PEAK_TFLOPS`` for the device, none on a CPU: MFU n/a; see ``xlstm_jax.train.flops``).

    In a multi-process run (after ``jax.distributed.initialize``; see ``distributed``) every process
    calls ``train`` with the same configs (a mesh over all devices); process 0 writes and prints.
    """
    if data is None:
        data = prepare_run_data(model_config, tc)
    check_run_dir(model_config, tc, overwrite)
    seq_len = sequence_length(model_config, tc)
    writer = dist.process_index() == 0
    log = RunLog(tc.out_dir, writer=writer, progress=progress, print_fn=print_fn)
    h_uni = data.unigram_entropy
    log.say(
        f"corpus: {data.source}: {data.num_tokens:,} bytes ({len(data.train_tokens):,} train, "
        f"{len(data.heldout_tokens):,} held out); unigram entropy {h_uni:.3f} nats/byte = "
        f"{bits_per_byte(h_uni):.3f} bits/byte"
        if tc.tokenizer == "bytes" else
        f"corpus: {data.source}: {data.num_tokens:,} tokens of {tc.tokenizer} ({len(data.train_tokens):,} "
        f"train, {len(data.heldout_tokens):,} held out); unigram entropy {h_uni:.3f} nats/token"
    )
    trainer = get_trainer(model_config, tc)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    mesh_txt = "one device" if trainer.mesh is None else f"mesh (data, fsdp, tensor) = {tc.mesh}"
    procs = dist.process_count()
    n_local = len(trainer.local_devices())
    procs_txt = "" if procs == 1 else f" in {procs} processes ({n_local} device{'' if n_local == 1 else 's'} each)"
    log.say(
        f"model: {n_params:,} parameters, E={model_config.embedding_dim} NB={model_config.num_blocks} "
        f"NH={model_config.num_heads}, backend {model_config.mlstm_backend}; {mesh_txt} on "
        f"{trainer.devices()[0].platform} x{len(trainer.devices())}{procs_txt}; batch {tc.batch_size} x {seq_len} tokens"
    )

    flops_per_token = model_flops(model_config, seq_len)["train"]
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(trainer.devices()[0])
    log.mfu_of = lambda tok_s: mfu(tok_s, flops_per_token, peak, len(trainer.devices()))

    prepare_shared_run_dir(model_config, tc, overwrite)
    store = ckpt.CheckpointStore(tc.out_dir, tc.keep_checkpoints) if tc.checkpoints else None
    try:
        state, data_state, resumed = _init_or_resume(trainer, store, tc.init_from)
        if resumed is not None:
            log.say(f"resumed from {store.directory}/{resumed} (data epoch {data_state.epoch}, batch {data_state.position})")
        elif tc.init_from is not None:
            log.say(f"initial parameters: the transformers checkpoint {tc.init_from}")
        step = int(state.step)
        log.start(total=tc.steps, initial=step, resumed_from=resumed)
        t_start = time.perf_counter()
        state, step, data_state, interrupted, clock = _loop(
            trainer, tc, data, state, step, data_state, store, log, on_step
        )
        elapsed = time.perf_counter() - t_start
    finally:
        log.close()
        if store is not None:
            store.close()

    summary = {
        "step": step,
        "steps": tc.steps,
        "interrupted": interrupted,
        "num_params": n_params,
        "train_loss_last_interval": log.loss if log.loss is not None else float("nan"),
        "eval_loss": log.eval_loss if log.eval_loss is not None else float("nan"),
        "eval_bits_per_byte": (
            bits_per_byte(log.eval_loss) if log.eval_loss is not None and not math.isnan(log.eval_loss) else None
        ),
        "unigram_entropy_nats": h_uni,
        "unigram_entropy_bits": bits_per_byte(h_uni),
        "tokens_per_s": clock.tokens_per_s(),
        "model_flops_per_token": flops_per_token,
        "peak_tflops_per_device": peak,
        "mfu": log.mfu_of(clock.tokens_per_s()),
        "elapsed_s": elapsed,
        "devices": [str(d) for d in trainer.devices()],
        "mesh": list(tc.mesh) if tc.mesh is not None else None,
        "processes": procs,
        "peak_memory_bytes": _peak_memory(trainer.devices()),
        "backend": model_config.mlstm_backend,
        "corpus": data.source,
    }
    log.summary(summary)
    if interrupted:
        log.say(f"stopped at step {step}; checkpoint saved. Run the same command again to resume.")
    return summary


def _init_or_resume(
    trainer: Trainer, store: ckpt.CheckpointStore | None, init_from: str | None = None,
) -> tuple[TrainState, DataState, int | None]:
    """(state, data state, the step resumed from or None): from the newest checkpoint, or fresh
    (parameters random from the seed, or those of the transformers checkpoint ``init_from``, placed
    on the trainer's mesh)."""
    latest = store.latest_step() if store is not None else None
    if dist.process_count() > 1 and not dist.same_on_all_processes(repr(latest)):
        raise RuntimeError(
            f"the processes see different newest checkpoints in {store.directory} (this one: {latest}): "
            "--out-dir must be on a file system shared by all processes of the run"
        )
    if latest is None:
        if init_from is None:
            return trainer.init_state(), DataState(), None
        from xlstm_jax.models.xlstm_lm.hf import load_pretrained

        _, params = load_pretrained(init_from, config=trainer.model_config, mesh=trainer.mesh)
        return trainer.init_state(params=params), DataState(), None
    abs_params, abs_rest = trainer.abstract_train_state()
    params, rest, meta = store.restore(latest, abs_params, abs_rest)
    state = TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"], rng=rest["rng"])
    return state, DataState.from_dict(meta["data_state"]), latest


def _loop(trainer, tc, data, state, step, data_state, store, log, on_step):
    """The steps from ``step`` to ``tc.steps`` (or a stop request); returns the final
    (state, step, data_state, interrupted, throughput clock)."""
    seq_len = trainer.seq_len
    clock = _Throughput(step, tc.batch_size * seq_len)
    pending: list[tuple[int, dict[str, jax.Array]]] = []

    def flush() -> None:
        if not pending:
            return
        rows = [{"step": s, **{k: float(v) for k, v in m.items()}} for s, m in pending]  # syncs the device
        tok_s = clock.interval(rows[-1]["step"])
        for row in rows:
            row["lr"] = float(trainer.schedule(row["step"] - 1))
        log.train_rows(rows, tok_s)
        pending.clear()

    def evaluate(at_step: int) -> None:
        if data.eval_batches:
            log.eval_row(at_step, trainer.eval_loss(state.params, data.eval_batches))
        clock.pause()  # evaluation time is not training throughput

    def save(at_step: int) -> None:
        if store is not None:
            meta = {"step": at_step, "data_state": data_state.to_dict(), "corpus": data.source}
            store.save(at_step, state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}, meta)
        clock.pause()

    interrupted = False
    if step == 0 and tc.eval_every:
        evaluate(0)  # the starting point of the curve
    agree = dist.any_process if dist.process_count() > 1 else None
    with GracefulStop(log.say, agree=agree, every=tc.log_every) as stop:
        while step < tc.steps:
            rows, next_data_state = data.sampler.batch(data_state, trainer.local_rows)
            state, metrics = trainer.train_step(state, rows)
            data_state, step = next_data_state, step + 1
            pending.append((step, metrics))
            log.step_done()
            if on_step is not None:
                on_step(step, metrics)
            stopping = stop.should_stop(step)
            done = step == tc.steps or stopping
            if step % tc.log_every == 0 or done:
                flush()
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                flush()
                evaluate(step)
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or done:
                flush()
                save(step)
            if stopping:
                interrupted = True
                break
    flush()
    return state, step, data_state, interrupted, clock
