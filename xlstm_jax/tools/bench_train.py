"""``xlstm-jax bench-train``: time the training step of a model preset; tokens/s, MFU, memory, profile.

Builds the ``Trainer`` of a preset with the speed options given (``--fused-projections``,
``--remat``, ``--cast-params``, backend and its options), compiles the step ahead of time (compile
time), optionally runs ``--loss-steps`` steps from the fresh state on the embedded corpus recording
every loss (for comparing loss curves of two option sets: same seed, same batches), then times
``--steps`` steps after ``--warmup`` steps (each step waited for; the median step time gives
tokens/s and MFU, see ``xlstm_jax.train.flops``), and reads the peak device memory. ``--profile DIR``
traces ``--profile-steps`` more steps with ``jax.profiler`` and prints the time per op family and
per part of the step (``xlstm_jax.tools.trace_summary``); the compiled module's text goes beside the
trace (``DIR/module.hlo.txt[.gz]``) so that ``python -m xlstm_jax.tools.trace_summary DIR --steps N``
can summarise it again later with scopes. No checkpoints, no files besides ``--json`` and the
profile.

MFU uses the vendor's dense bf16 peak of the device (``flops.PEAK_TFLOPS``), or ``--peak-tflops``;
``--measure-peak`` also reports MFU against the measured bf16 matrix-product rate of the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from .errors import UsageError
from .options import float_range, int_at_least, name_value
from .train_cmd import PRESET_NAMES

REMAT_CHOICES = ("preset", "none", "full", "dots")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax bench-train``."""
    positive, nonneg = int_at_least(1), int_at_least(0)
    parser.add_argument("--preset", default="350m", choices=PRESET_NAMES, help="model size")
    parser.add_argument("--num-blocks", type=positive, default=None, help="override the number of blocks (default: the preset's)")
    parser.add_argument("--batch-size", type=positive, default=16, help="global batch size")
    parser.add_argument("--seq-len", type=nonneg, default=0, help="sequence length (default: 0, the preset's context length)")
    parser.add_argument("--steps", type=positive, default=10, help="timed steps")
    parser.add_argument("--warmup", type=nonneg, default=2, help="untimed steps before the timed ones (after compiling)")
    parser.add_argument("--backend", default="auto", help="mLSTM backend; auto: triton_kernels on a GPU if registered, else fwbw_stabilized")
    parser.add_argument("--backend-option", action="append", default=[], type=name_value, metavar="NAME=VALUE",
                        help="a config field of the backend, e.g. chunk_size=128 (repeatable; default: none)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="compute dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--remat", default="preset", choices=REMAT_CHOICES,
                        help="rematerialisation: none, full (recompute everything), dots (keep the matrix products' "
                             "outputs); preset: the preset's (full for 350m / 1.3b)")
    parser.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=False,
                        help="q/k/v/output-gate projections as one matrix product (default: off)")
    parser.add_argument("--cast-params", action=argparse.BooleanOptionalAction, default=False,
                        help="cast the weights to the compute dtype once per step (default: off)")
    parser.add_argument("--residual-in-compute-dtype", action=argparse.BooleanOptionalAction, default=False,
                        help="keep the residual stream in the compute dtype (bfloat16) instead of float32: fewer "
                             "bytes, results change at bfloat16 precision (default: off)")
    parser.add_argument("--unroll-blocks", action=argparse.BooleanOptionalAction, default=False,
                        help="run the blocks as a Python loop instead of one scan: no stacked buffers of saved "
                             "activations, longer compile (default: off)")
    parser.add_argument("--seed", type=nonneg, default=0, help="seed of parameters and data order")
    parser.add_argument("--loss-steps", type=nonneg, default=0,
                        help="first run this many steps from the fresh state on the embedded corpus and record each loss")
    parser.add_argument("--peak-tflops", type=float_range(0.0, low_open=True), default=None,
                        help="peak TFLOP/s of the device for MFU (default: the vendor's dense bf16 figure; none on a CPU)")
    parser.add_argument("--measure-peak", action="store_true", help="also measure the bf16 matmul rate and report MFU against it")
    parser.add_argument("--profile", default=None, metavar="DIR", help="trace steps with jax.profiler into DIR and summarise them (default: none, no profile)")
    parser.add_argument("--profile-steps", type=positive, default=3, help="steps traced with --profile")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file (default: none)")


def build_configs(args: argparse.Namespace):
    """(xLSTMLMConfig, TrainConfig) of the bench; ``UsageError`` if the options make none."""
    import jax

    from xlstm_jax.models.xlstm_lm.config import preset_config
    from xlstm_jax.train.config import TrainConfig

    from .train_cmd import default_backend

    overrides: dict[str, Any] = {
        "fused_projections": bool(args.fused_projections),
        "residual_in_compute_dtype": bool(args.residual_in_compute_dtype),
    }
    if args.num_blocks is not None:
        overrides["num_blocks"] = args.num_blocks
    if args.remat == "none":
        overrides["remat"] = False
    elif args.remat in ("full", "dots"):
        overrides.update(remat=True, remat_policy=args.remat)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    backend = default_backend() if args.backend == "auto" else args.backend
    try:
        model_config = preset_config(
            args.preset, mlstm_backend=backend, mlstm_backend_kwargs=dict(args.backend_option), dtype=dtype, **overrides
        )
        total = max(args.loss_steps + args.warmup + args.steps + args.profile_steps, 1)
        tc = TrainConfig(
            out_dir="", steps=total, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
            eval_every=0, eval_batches=0, checkpoints=False, cast_params=bool(args.cast_params),
            unroll_blocks=bool(args.unroll_blocks),
        )
    except ValueError as err:
        raise UsageError(f"the options do not make a model / run: {err}") from None
    return model_config, tc


def _options_text(args: argparse.Namespace, model_config) -> str:
    remat = "none" if not model_config.remat else model_config.remat_policy
    return (f"remat={remat} fused={'on' if model_config.fused_projections else 'off'} "
            f"cast={'on' if args.cast_params else 'off'} unroll={'on' if args.unroll_blocks else 'off'} "
            f"{'resid=bf16 ' if model_config.residual_in_compute_dtype else ''}"
            f"backend={model_config.mlstm_backend}")


def run(args: argparse.Namespace) -> int:
    """Compile, (record losses,) time, (profile,) report. Returns 0."""
    import jax
    import numpy as np

    from xlstm_jax.train.config import RunSettingError, check_run_settings, sequence_length
    from xlstm_jax.train.data import DataState, prepare_data
    from xlstm_jax.train.flops import device_peak_tflops, measure_matmul_tflops, mfu, model_flops, six_n_flops_per_token
    from xlstm_jax.train.trainer import Trainer

    from . import trace_summary

    model_config, tc = build_configs(args)
    try:
        check_run_settings(model_config, tc)
    except RunSettingError as err:
        raise UsageError(f"{err.setting}: {err}") from None
    S, B = sequence_length(model_config, tc), tc.batch_size
    try:
        data = prepare_data([], batch_size=B, seq_len=S, seed=tc.seed, heldout_fraction=tc.heldout_fraction,
                            eval_batches=0, vocab_size=model_config.vocab_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    trainer = Trainer(model_config, tc)
    device = trainer.devices()[0]
    state = trainer.init_state()

    data_state = DataState()

    def next_batch():
        nonlocal data_state
        rows, data_state = data.sampler.batch(data_state)
        return trainer.put_batch(rows)

    first = next_batch()
    t0 = time.perf_counter()
    compiled = trainer._train_step.lower(state, first).compile()
    compile_s = time.perf_counter() - t0
    hlo_text = compiled.as_text() if args.profile else None
    if hlo_text:  # beside the trace, so that it can be summarised again offline with scopes
        trace_summary.write_hlo_text(args.profile, hlo_text)

    losses = []
    batch = first
    for _ in range(args.loss_steps):
        state, metrics = compiled(state, batch)
        losses.append(metrics["loss"])
        batch = next_batch()
    losses = [float(x) for x in losses]

    pool = [batch] + [next_batch() for _ in range(min(args.steps, 4) - 1)]
    for i in range(args.warmup):
        state, metrics = compiled(state, pool[i % len(pool)])
    jax.block_until_ready(state)
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, pool[i % len(pool)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    profile = None
    if args.profile:
        jax.block_until_ready(state)
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for i in range(args.profile_steps):
                state, metrics = compiled(state, pool[i % len(pool)])
            jax.block_until_ready((state, metrics))
        profile = trace_summary.summarise_dir(args.profile, args.profile_steps, hlo_text, step_ms=step_s * 1e3)

    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak_mem = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    flops = model_flops(model_config, S)
    tokens_per_s = B * S / step_s
    peak = args.peak_tflops if args.peak_tflops is not None else device_peak_tflops(device)
    measured = measure_matmul_tflops(device) if args.measure_peak else None
    result = {
        "preset": args.preset, "options": _options_text(args, model_config),
        "remat": "none" if not model_config.remat else model_config.remat_policy,
        "fused_projections": model_config.fused_projections, "cast_params": tc.cast_params,
        "unroll_blocks": tc.unroll_blocks, "seed": tc.seed,
        "residual_in_compute_dtype": model_config.residual_in_compute_dtype,
        "backend": model_config.mlstm_backend, "backend_kwargs": model_config.backend_kwargs,
        "dtype": model_config.dtype, "batch_size": B, "seq_len": S, "num_blocks": model_config.num_blocks,
        "num_params": model_config.num_params(), "device": str(getattr(device, "device_kind", device.platform)),
        "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "compile_s": compile_s, "step_ms_median": step_s * 1e3, "step_ms": [t * 1e3 for t in times],
        "tokens_per_s": tokens_per_s, "model_flops_per_token": flops, "six_n_flops_per_token": six_n_flops_per_token(model_config),
        "peak_tflops": peak, "mfu": mfu(tokens_per_s, flops["train"], peak),
        "measured_matmul_tflops": measured, "mfu_of_measured": mfu(tokens_per_s, flops["train"], measured),
        "peak_memory_bytes": peak_mem, "losses": losses, "profile": profile,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=float)
    if profile is not None:
        print(f"profile of {args.profile_steps} steps ({profile['trace_file']}):")
        print(trace_summary.format_table(profile))
    if losses:
        print(f"losses of the first {len(losses)} steps: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(format_result(result))
    return 0


def format_result(r: dict[str, Any]) -> str:
    """The one-row table of a bench-train result (header and row)."""
    mfu_txt = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    if r.get("mfu_of_measured") is not None:
        mfu_txt += f" ({r['mfu_of_measured']:.1%} of {r['measured_matmul_tflops']:.0f} measured)"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None else "n/a"
    head = f"{'preset':<6} {'B x S':<10} {'options':<68} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'step ms':>9} {'compile s':>9}"
    row = (f"{r['preset']:<6} {str(r['batch_size']) + 'x' + str(r['seq_len']):<10} {r['options']:<68} "
           f"{r['tokens_per_s']:>10,.0f} {mfu_txt:>7} {mem:>9} {r['step_ms_median']:>9.1f} {r['compile_s']:>9.1f}")
    return head + "\n" + row


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` steps (the first ``window - 1`` points average fewer)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def compare_loss_curves(curves: dict[str, dict[int, list[float]]], window: int = 10, skip: int = 10) -> dict[str, Any]:
    """Loss curves of two option sets, each run with several seeds (of parameters and data order):
    ``curves = {"old": {seed: losses}, "new": {seed: losses}}``, all of one length. On the curves
    smoothed by a ``window``-step moving average, from step ``skip + 1`` on:

    - ``noise[setting]``: the largest |difference| between two seeds of one setting (run-to-run
      noise: what another seed changes);
    - ``diff[seed]``: the largest |old - new| of one seed (same parameters, same batches);
    - ``tail_mean[setting][seed]``: the mean loss of the last 50 steps;
    - ``within_noise``: max ``diff`` <= max ``noise``.

    ``ValueError`` unless there are exactly the settings "old" and "new", the same >= 2 seeds in
    each, and curves longer than ``skip`` of equal length."""
    if set(curves) != {"old", "new"}:
        raise ValueError(f"curves must have the settings 'old' and 'new'; got {sorted(curves)}")
    seeds = sorted(curves["old"])
    if sorted(curves["new"]) != seeds or len(seeds) < 2:
        raise ValueError(f"both settings need the same >= 2 seeds; got old {sorted(curves['old'])}, new {sorted(curves['new'])}")
    lengths = {len(c) for runs in curves.values() for c in runs.values()}
    if len(lengths) != 1 or min(lengths) <= skip:
        raise ValueError(f"curves must be of one length > skip={skip}; got lengths {sorted(lengths)}")
    sm = {k: {sd: _smooth([float(x) for x in c], window)[skip:] for sd, c in runs.items()} for k, runs in curves.items()}

    def maxdiff(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    noise = {k: max(maxdiff(sm[k][a], sm[k][b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]) for k in sm}
    diff = {sd: maxdiff(sm["old"][sd], sm["new"][sd]) for sd in seeds}
    tail = {k: {sd: sum(c[-50:]) / len(c[-50:]) for sd, c in runs.items()} for k, runs in curves.items()}
    return {
        "steps": lengths.pop(), "window": window, "skip": skip, "seeds": seeds, "noise": noise, "diff": diff,
        "tail_mean": tail, "within_noise": max(diff.values()) <= max(noise.values()),
    }


def format_loss_comparison(c: dict[str, Any], new_name: str = "new") -> str:
    """Text of a ``compare_loss_curves`` result; ``new_name``: what to call the "new" setting."""
    lines = [f"loss curves, {c['steps']} steps, moving average over {c['window']} steps, from step {c['skip'] + 1}:"]
    label = {"old": "old", "new": new_name}
    for k, v in c["noise"].items():
        tails = ", ".join(f"seed {sd}: {t:.4f}" for sd, t in c["tail_mean"][k].items())
        lines.append(f"  seed-to-seed spread ({label[k]}): max |diff| {v:.4f}; mean of the last 50 steps {tails}")
    for sd, v in c["diff"].items():
        lines.append(f"  old vs {new_name}, seed {sd}: max |diff| {v:.4f}")
    verdict = "within" if c["within_noise"] else "NOT within"
    lines.append(f"  old vs {new_name} is {verdict} the run-to-run noise")
    return "\n".join(lines)
