"""``xlstm-jax train``: train the xLSTM language model (default: a small model on the embedded corpus).

With no arguments it trains the ``demo`` preset on CPython's own English documentation text with the
byte tokenizer, shows a progress bar with loss and tokens/s, evaluates on a held-out split, writes
checkpoints to ``runs/default`` and resumes from there when run again (Ctrl-C saves and stops).

Every user error (a bad number, an unknown backend or step kernel, a forward-only backend, a backend
option the backend does not have, a sequence longer than the context, a mesh that does not fit, an
unreadable or non-UTF-8 data file, a run directory holding another run) is reported as a
``UsageError`` before the run directory is created or anything is compiled.

Fine-tuning: ``--init-from DIR`` starts from a transformers ``xLSTMForCausalLM`` checkpoint directory
(its config.json gives the model, its safetensors the initial parameters, placed on any ``--mesh``);
``--tokenizer`` (default: the checkpoint's tokenizer.json if it has one, else bytes) encodes the
training text and is recorded in the run for ``generate --run-dir``. A directory that is not a
checkpoint, ``--preset`` with ``--init-from``, shape options that contradict the checkpoint, a
tokenizer larger than the model's vocabulary, and resuming a run with another ``--init-from`` or
``--tokenizer`` are usage errors too (``docs/inference.md``).

Multi-process runs (one process per host or per GPU, on JAX's distributed runtime): every process
runs the same command with ``--coordinator-address HOST:PORT --num-processes N --process-id I``, or
with none of them when SLURM (``srun``) or Open MPI (``mpirun``) started the processes (JAX reads the
three from the environment; ``--distributed`` says whether to join: ``auto``, ``on``, ``off``). The
join options are checked before anything else; then JAX joins the processes, every process makes
the checks above, and an error in any process stops all of them with exit status 2. See
``docs/training.md``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .errors import UsageError
from .options import float_range, int_at_least, int_triple, name_value

# The model presets of ``xlstm_jax.models.xlstm_lm.config.PRESETS``, named here so that building the
# parser imports no JAX (tests/test_tools_cli.py checks that the two agree).
PRESET_NAMES = ("1.3b", "350m", "7b", "demo", "tiny")

# The option of ``xlstm-jax train`` behind each setting that ``check_run_settings`` can refuse.
_OPTION_OF_SETTING = {
    "mlstm_backend": "--backend",
    "mlstm_backend_kwargs": "--backend-option",
    "mlstm_step_kernel": "--step-kernel",
    "seq_len": "--seq-len",
    "mesh": "--mesh",
}


def device_ids(text: str) -> tuple[int, ...]:
    """An argparse type: ``"0,1,3"``, one or more distinct device numbers >= 0."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 0 separated by commas, e.g. 0,1; got {text!r}")
    return tuple(int(p) for p in parts)


def default_backend() -> str:
    """``triton_kernels`` (Pallas chunkwise) on a GPU when it is registered, else ``fwbw_stabilized``."""
    import jax

    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends

    if jax.default_backend() == "gpu" and "triton_kernels" in available_mlstm_backends():
        return "triton_kernels"
    return "fwbw_stabilized"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax train``."""
    positive = int_at_least(1)
    nonneg = int_at_least(0)
    m = parser.add_argument_group("model")
    m.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="model size; not with --init-from, whose checkpoint defines the model (default: demo)")
    m.add_argument("--init-from", default=None, metavar="DIR",
                   help="fine-tune: the initial parameters and the model config are those of a transformers "
                        "xLSTMForCausalLM checkpoint directory (config.json + safetensors, e.g. NX-AI/xLSTM-7b "
                        "or one written by save_pretrained), on any --mesh; the shape options may only repeat "
                        "its values (default: none, random initial parameters of --preset)")
    m.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="tokenizer of the training text: 'bytes', or a tokenizer.json / a directory with one; "
                        "its vocabulary must fit the model's; recorded in the run so that `generate --run-dir` "
                        "uses it (default: the tokenizer.json of --init-from when it has one, else bytes)")
    m.add_argument("--embedding-dim", type=positive, help="override E (default: the preset's)")
    m.add_argument("--num-blocks", type=positive, help="override the number of blocks (default: the preset's)")
    m.add_argument("--num-heads", type=positive, help="override the number of heads (default: the preset's)")
    m.add_argument("--context-length", type=positive,
                   help="override the context length, the longest training sequence (default: the preset's)")
    m.add_argument("--backend", default="auto",
                   help="mLSTM backend of the sequence; auto: triton_kernels on a GPU if registered, else "
                        "fwbw_stabilized (an unknown name lists the valid ones)")
    m.add_argument("--backend-option", action="append", default=[], type=name_value, metavar="NAME=VALUE",
                   help="a config field of the backend, e.g. chunk_size=64 (repeatable; default: none)")
    m.add_argument("--step-kernel", default="recurrent_native",
                   help="step kernel used when generating from the run (checked now)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    m.add_argument("--input-gate", default=None, choices=["exp", "sigmoid"],
                   help="input gate of the mLSTM cell: exp (xLSTM-7B) or sigmoid (mLSTMsig) (default: the preset's)")
    m.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute block activations in the backward pass (default: the preset's)")
    m.add_argument("--remat-policy", default=None, choices=["full", "dots"],
                   help="what --remat keeps: full: nothing (recompute all), dots: the matrix products' outputs "
                        "(default: the config's, full)")
    m.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="q/k/v/output-gate projections as one matrix product (speed only; default: the config's, off)")
    t = parser.add_argument_group("training")
    t.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="UTF-8 text files to train on (default: the embedded CPython documentation corpus)")
    t.add_argument("--doc-separator", default=None, metavar="TEXT",
                   help="split every --data file into documents on TEXT (Python escapes such as \\n are "
                        "decoded; default: one document per file)")
    t.add_argument("--no-pack", action="store_true",
                   help="do not pack documents: train on one token stream, with no segment ids and no "
                        "masked targets at document borders (default: pack)")
    t.add_argument("--out-dir", default="runs/default", help="run directory (checkpoints, metrics)")
    t.add_argument("--steps", type=positive, default=600, help="total optimizer steps of the run")
    t.add_argument("--batch-size", type=positive, default=16, help="global batch size (sequences per step)")
    t.add_argument("--seq-len", type=nonneg, default=0,
                   help="training sequence length, at most the context length (default: 0, the context length)")
    t.add_argument("--lr", type=float_range(0.0, low_open=True), default=3e-3, help="peak learning rate")
    t.add_argument("--warmup-steps", type=nonneg, default=50,
                   help="linear warm-up steps (update n of them uses n/W of the peak rate)")
    t.add_argument("--weight-decay", type=float_range(0.0), default=0.1, help="AdamW decoupled weight decay")
    t.add_argument("--eval-every", type=nonneg, default=50,
                   help="held-out evaluation interval in steps (0: only at the end)")
    t.add_argument("--eval-batches", type=nonneg, default=8, help="held-out batches per evaluation (0: none)")
    t.add_argument("--heldout-fraction", type=float_range(0.0, 1.0, low_open=True), default=0.05,
                   help="share of the text held out for evaluation (its end)")
    t.add_argument("--checkpoint-every", type=nonneg, default=200,
                   help="checkpoint interval in steps (0: only at the end and on Ctrl-C)")
    t.add_argument("--log-every", type=positive, default=10, help="progress / metrics flush interval in steps")
    t.add_argument("--seed", type=nonneg, default=0, help="seed of parameters, data order and training RNG")
    t.add_argument("--mesh", type=int_triple, default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard over a device mesh of the first DATA*FSDP*TENSOR devices, e.g. 1,2,1 "
                        "(default: one device, no mesh; in a multi-process run: all devices, N,1,1)")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in --out-dir first")
    t.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints (throughput runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--summary-json", default=None, help="also write the run summary to this file (default: no)")
    t.add_argument("--cast-params", action="store_true",
                   help="cast the weights to the compute dtype once per step (speed only)")
    t.add_argument("--unroll-blocks", action="store_true",
                   help="run the blocks of the training step as a loop instead of one scan (speed only; longer compile; "
                        "default: off)")
    t.add_argument("--peak-tflops", type=float_range(0.0, low_open=True), default=None,
                   help="peak TFLOP/s of one device for the MFU figure (default: the vendor's dense bf16 figure "
                        "for known GPUs, e.g. 989 for H100 SXM / H200; none on a CPU: MFU n/a)")
    d = parser.add_argument_group(
        "multi-process runs",
        "Every process runs the same command; the mesh spans the devices of all processes (default "
        "mesh: data parallel over all of them), process 0 writes the log, metrics and summary, all write "
        "the checkpoints (--out-dir on a shared file system). The option names are those of "
        "jax.distributed.initialize.",
    )
    d.add_argument("--distributed", default="auto", choices=["auto", "on", "off"],
                   help="join a multi-process run; auto: when --coordinator-address/--num-processes/--process-id "
                        "are given or SLURM (srun) or Open MPI (mpirun) started several processes; on: must join; "
                        "off: run as one process")
    d.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0, which hosts the coordinator at PORT; goes with --num-processes "
                        "and --process-id (default: none, one process unless SLURM / Open MPI started several)")
    d.add_argument("--num-processes", type=positive, default=None, metavar="N",
                   help="processes of the run (default: none, see --coordinator-address)")
    d.add_argument("--process-id", type=nonneg, default=None, metavar="I",
                   help="this process's index, 0..N-1 (default: none, see --coordinator-address)")
    d.add_argument("--local-device-ids", type=device_ids, default=None, metavar="I,J,...",
                   help="the local devices (GPUs) this process uses (default: all; under SLURM / Open MPI: one "
                        "per process, the local rank's)")
    d.add_argument("--initialization-timeout", type=positive, default=300, metavar="SECONDS",
                   help="how long a process waits for all processes to join")
    d.add_argument("--heartbeat-timeout-seconds", type=positive, default=100, metavar="SECONDS",
                   help="a process that stops answering for this long is declared dead and the run ends")


def build_configs(args: argparse.Namespace):
    """(xLSTMLMConfig, TrainConfig) from parsed arguments; ``UsageError`` if they do not make one."""
    import jax

    from xlstm_jax.models.xlstm_lm.config import preset_config
    from xlstm_jax.train.config import TrainConfig

    overrides: dict[str, Any] = {}
    for name in ("embedding_dim", "num_blocks", "num_heads", "context_length"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.remat_policy is not None:
        overrides["remat_policy"] = args.remat_policy
    if args.fused_projections is not None:
        overrides["fused_projections"] = args.fused_projections
    if args.input_gate is not None:
        overrides["input_gate"] = args.input_gate
    doc_separator = args.doc_separator
    if doc_separator is not None:
        try:
            doc_separator = doc_separator.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise UsageError(f"--doc-separator {args.doc_separator!r} is not valid text with Python escapes") from None
        if not doc_separator:
            raise UsageError("--doc-separator must not be empty")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    mesh = args.mesh
    if mesh is None and jax.process_count() > 1:
        mesh = (jax.device_count(), 1, 1)  # a multi-process run: data parallel over all devices
    backend = default_backend() if args.backend == "auto" else args.backend
    backend_kwargs = dict(args.backend_option)
    init_from = None
    if args.init_from is not None:
        init_from = os.path.abspath(args.init_from)
        model_config = pretrained_model_config(args, init_from, dtype, backend, backend_kwargs, overrides)
    else:
        try:
            model_config = preset_config(
                args.preset or "demo", mlstm_backend=backend, mlstm_backend_kwargs=backend_kwargs,
                mlstm_step_kernel=args.step_kernel, dtype=dtype, **overrides,
            )
        except ValueError as err:
            raise UsageError(f"the model options do not make a model: {err}") from None
    tokenizer = resolve_tokenizer(args.tokenizer, init_from, model_config.vocab_size)
    try:
        tc = TrainConfig(
            out_dir=args.out_dir, data=tuple(args.data), steps=args.steps, batch_size=args.batch_size,
            seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, eval_every=args.eval_every, eval_batches=args.eval_batches,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
            mesh=mesh, checkpoints=not args.no_checkpoint, heldout_fraction=args.heldout_fraction,
            init_from=init_from, tokenizer=tokenizer,
            cast_params=args.cast_params, unroll_blocks=args.unroll_blocks,
            pack=not args.no_pack, doc_separator=doc_separator,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    return model_config, tc


def pretrained_model_config(args: argparse.Namespace, init_from: str, dtype: str, backend: str,
                            backend_kwargs: dict[str, Any], overrides: dict[str, Any]):
    """The model config of ``--init-from`` (the checkpoint's architecture with this run's dtype,
    kernels, context length and remat; parameters kept in float32); ``UsageError`` if the directory
    is not a checkpoint, ``--preset`` is given too, or a shape option contradicts the checkpoint."""
    from xlstm_jax.models.xlstm_lm.hf import read_pretrained_config

    if args.preset is not None:
        raise UsageError(
            f"--preset {args.preset} and --init-from both define the model; give one (the checkpoint's config.json "
            "defines the model of --init-from)"
        )
    if not os.path.isdir(init_from):
        raise UsageError(f"--init-from {args.init_from!r} is not a directory")
    extra = {k: v for k, v in overrides.items() if k in ("context_length", "remat")}
    try:
        config = read_pretrained_config(
            init_from, dtype=dtype, param_dtype="float32", backend=backend, backend_kwargs=backend_kwargs,
            step_kernel=args.step_kernel, **extra,
        )
    except (ValueError, OSError) as err:  # OSError: an unreadable config.json; ValueError: not a checkpoint
        raise UsageError(f"--init-from {args.init_from}: {err}") from None
    contradict = [
        f"--{name.replace('_', '-')} {overrides[name]} (the checkpoint has {getattr(config, name)})"
        for name in ("embedding_dim", "num_blocks", "num_heads")
        if name in overrides and overrides[name] != getattr(config, name)
    ]
    if contradict:
        raise UsageError(
            f"the model options contradict the checkpoint of --init-from {args.init_from}: {', '.join(contradict)}; "
            "drop them (the checkpoint defines the model)"
        )
    from xlstm_jax.models.xlstm_lm.hf import check_pretrained

    try:
        check_pretrained(init_from, config)  # every tensor there with its shape (headers only)
    except (ValueError, OSError) as err:
        raise UsageError(f"--init-from {args.init_from}: {err}") from None
    return config


def resolve_tokenizer(spec: str | None, init_from: str | None, vocab_size: int) -> str:
    """The run's tokenizer as recorded: "bytes" or an absolute path (default: the tokenizer.json of
    ``init_from`` when it has one, else "bytes"); ``UsageError`` if it cannot be read or has more
    tokens than the model's vocabulary."""
    from xlstm_jax.text import TOKENIZER_FILE, load_tokenizer

    if spec is None:
        spec = init_from if init_from is not None and os.path.isfile(os.path.join(init_from, TOKENIZER_FILE)) else "bytes"
    elif spec != "bytes":
        spec = os.path.abspath(spec)
    try:
        tok = load_tokenizer(spec)
    except (ValueError, ImportError, OSError) as err:
        raise UsageError(f"--tokenizer: {err}") from None
    if tok.vocab_size > vocab_size:
        raise UsageError(
            f"--tokenizer: {tok.name} has {tok.vocab_size} tokens, more than the model's vocabulary of {vocab_size}"
        )
    return spec


def check_inputs(model_config, tc, overwrite: bool):
    """Everything a user can get wrong, checked before anything is written; returns the run's data
    (``RunData``). Raises ``UsageError`` naming the option."""
    from xlstm_jax.train.config import RunSettingError
    from xlstm_jax.train.run import check_run_dir, prepare_run_data

    try:
        data = prepare_run_data(model_config, tc)
    except RunSettingError as err:
        raise UsageError(f"{_OPTION_OF_SETTING.get(err.setting, err.setting)}: {err}") from None
    except ValueError as err:  # data files, text too short for a batch
        raise UsageError(str(err)) from None
    try:
        check_run_dir(model_config, tc, overwrite)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return data


def join_spec(args: argparse.Namespace):
    """The ``distributed.JoinSpec`` of the multi-process options (None: one process); ``UsageError``
    for a missing partner option, a process id out of range, a bad address. Imports no JAX."""
    from xlstm_jax.train.distributed import plan_join

    try:
        return plan_join(
            args.distributed, coordinator_address=args.coordinator_address, num_processes=args.num_processes,
            process_id=args.process_id, local_device_ids=args.local_device_ids,
            initialization_timeout=args.initialization_timeout,
            heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _agreed(fn):
    """``fn()`` on every process; if it raises ``UsageError`` on any process, every process raises
    one (its own, or one naming the processes that failed), so that all stop together."""
    from xlstm_jax.train import distributed as dist

    try:
        result, error = fn(), None
    except UsageError as err:
        result, error = None, err
    failed = dist.failed_processes(error is None)
    if error is not None:
        raise error
    if failed:
        raise UsageError(f"process(es) {failed} of the run stopped with an error (see their message); stopping too")
    return result


def _prepare(args: argparse.Namespace):
    """Configs, checks and the run directory (every process together); returns (configs, data)."""
    import json

    from xlstm_jax.train import distributed as dist
    from xlstm_jax.train.run import prepare_shared_run_dir

    model_config, tc = _agreed(lambda: build_configs(args))
    if dist.process_count() > 1:
        record = json.dumps({"model": model_config.to_dict(), "train": tc.to_dict(), "overwrite": args.overwrite}, sort_keys=True)
        if not dist.same_on_all_processes(record):
            raise UsageError(
                "the processes of the run were started with different training options; start every process "
                "with the same options (only --process-id and --local-device-ids differ)"
            )
    data = _agreed(lambda: check_inputs(model_config, tc, args.overwrite))

    try:  # every check passed: the run directory is the first thing written (all processes together)
        prepare_shared_run_dir(model_config, tc, args.overwrite)
    except OSError as err:
        raise UsageError(f"--out-dir {tc.out_dir!r} cannot be created: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    return model_config, tc, data


def run(args: argparse.Namespace) -> int:
    """Train; print the summary. Returns 0 (also after a Ctrl-C stop, which saved a checkpoint).

    In a multi-process run: join first (``join_spec``, ``distributed.initialize``), then the same as
    in one process on every process; process 0 prints; a process that fails ends at once and so ends
    the others (``distributed.exit_at_once_on_failure``).
    """
    import sys

    from xlstm_jax.train import distributed as dist

    spec = join_spec(args)  # before anything touches JAX's backends
    if spec is not None:
        try:
            dist.initialize(spec, notify=lambda text: print(text, file=sys.stderr, flush=True))
        except ValueError as err:
            raise UsageError(str(err)) from None
    with dist.exit_at_once_on_failure(passthrough=(UsageError,)):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from xlstm_jax.train import distributed as dist

    model_config, tc, data = _prepare(args)

    from xlstm_jax.train.checkpoint import write_json
    from xlstm_jax.train.data import bits_per_byte
    from xlstm_jax.train.run import train

    summary = train(model_config, tc, progress=not args.no_progress, print_fn=print, data=data,
                    peak_tflops=args.peak_tflops)
    if dist.process_index() != 0:
        return 0
    if args.summary_json:
        write_json(args.summary_json, summary)
    h = summary["unigram_entropy_nats"]
    ev = summary["eval_loss"]
    print("---- summary ----")
    print(f"steps             {summary['step']} / {summary['steps']}" + ("  (interrupted)" if summary["interrupted"] else ""))
    print(f"unigram entropy   {h:.4f} nats/byte ({bits_per_byte(h):.3f} bits/byte)")
    if ev == ev:  # not NaN
        print(f"held-out loss     {ev:.4f} nats/byte ({bits_per_byte(ev):.3f} bits/byte) = {ev / h:.0%} of the unigram entropy")
    if summary["tokens_per_s"]:
        procs = f" in {summary['processes']} processes" if summary["processes"] > 1 else ""
        print(f"throughput        {summary['tokens_per_s']:,.0f} tokens/s on {len(summary['devices'])} x {summary['devices'][0]}{procs}")
        peak = summary["peak_tflops_per_device"]
        mfu_txt = (f"{summary['mfu']:.1%} of {peak:g} TFLOP/s per device" if summary["mfu"] is not None
                   else "n/a (no peak rate known for this device: --peak-tflops)")
        print(f"MFU               {mfu_txt} ({summary['model_flops_per_token'] / 1e9:.2f} GFLOP per token)")
    mem = [m for m in summary["peak_memory_bytes"] if m is not None]
    if mem:
        print("peak memory       " + ", ".join(f"{m / 2**30:.2f} GiB" for m in mem) + " (per device" + (
            " of process 0)" if summary["processes"] > 1 else ")"))
    if tc.checkpoints and not summary["interrupted"]:
        print(f"generate text     xlstm-jax generate --run-dir {tc.out_dir} --prompt \"The \"")
    return 0
