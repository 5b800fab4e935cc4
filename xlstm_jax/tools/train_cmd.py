"""``xlstm-jax train``: train the xLSTM language model (default: a small model on the embedded corpus).

With no arguments it trains the ``demo`` preset on CPython's own English documentation text with the
byte tokenizer, shows a progress bar with loss and tokens/s, evaluates on a held-out split, writes
checkpoints to ``runs/default`` and resumes from there when run again (Ctrl-C saves and stops).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax

from xlstm_jax.models.xlstm_lm.config import PRESETS, preset_config


def parse_kv(items: list[str]) -> dict[str, Any]:
    """``["chunk_size=32", "eps=1e-6"]`` -> ``{"chunk_size": 32, "eps": 1e-6}`` (JSON values, else str)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"backend option {item!r} must look like NAME=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_mesh(text: str | None) -> tuple[int, int, int] | None:
    """``"2,2,2"`` -> (2, 2, 2); None stays None."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--mesh takes DATA,FSDP,TENSOR (three ints); got {text!r}")
    return tuple(int(p) for p in parts)


def default_backend() -> str:
    """``triton_kernels`` (Pallas chunkwise) on a GPU when it is registered, else ``fwbw_stabilized``."""
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends

    if jax.default_backend() == "gpu" and "triton_kernels" in available_mlstm_backends():
        return "triton_kernels"
    return "fwbw_stabilized"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax train``."""
    m = parser.add_argument_group("model")
    m.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size (default: demo)")
    m.add_argument("--embedding-dim", type=int, help="override E")
    m.add_argument("--num-blocks", type=int, help="override the number of blocks")
    m.add_argument("--num-heads", type=int, help="override the number of heads")
    m.add_argument("--context-length", type=int, help="override the context (= training sequence) length")
    m.add_argument("--backend", default="auto",
                   help="mLSTM backend for the sequence (default auto: triton_kernels on GPU if present, else fwbw_stabilized)")
    m.add_argument("--backend-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a config field of the backend, e.g. chunk_size=64 (repeatable)")
    m.add_argument("--step-kernel", default="recurrent_native", help="step kernel used when generating")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    m.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute block activations in the backward pass (default: the preset's)")
    t = parser.add_argument_group("training")
    t.add_argument("--data", nargs="+", default=[], metavar="FILE", help="UTF-8 text files (default: embedded corpus)")
    t.add_argument("--out-dir", default="runs/default", help="run directory (checkpoints, metrics)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run (default: 600)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=0, help="training sequence length (default: context length)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=50, help="held-out evaluation interval (steps)")
    t.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation (0: none)")
    t.add_argument("--heldout-fraction", type=float, default=0.05, help="share of the text held out (its end)")
    t.add_argument("--checkpoint-every", type=int, default=200, help="checkpoint interval (steps)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard over a device mesh, e.g. 1,2,1 (default: one device)")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in --out-dir first")
    t.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints (throughput runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--summary-json", default=None, help="also write the run summary to this file")


def build_configs(args: argparse.Namespace):
    """(xLSTMLMConfig, TrainConfig) from parsed arguments."""
    from xlstm_jax.train.trainer import TrainConfig

    overrides: dict[str, Any] = {}
    for name in ("embedding_dim", "num_blocks", "num_heads", "context_length"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.remat is not None:
        overrides["remat"] = args.remat
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    backend = default_backend() if args.backend == "auto" else args.backend
    model_config = preset_config(
        args.preset, mlstm_backend=backend, mlstm_backend_kwargs=parse_kv(args.backend_option),
        mlstm_step_kernel=args.step_kernel, dtype=dtype, **overrides,
    )
    steps = args.steps if args.steps is not None else 600
    tc = TrainConfig(
        out_dir=args.out_dir, data=tuple(args.data), steps=steps, batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, eval_every=args.eval_every, eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
        mesh=parse_mesh(args.mesh), checkpoints=not args.no_checkpoint, heldout_fraction=args.heldout_fraction,
    )
    return model_config, tc


def run(args: argparse.Namespace) -> int:
    """Train; print the summary. Returns 0 (also after a Ctrl-C stop, which saved a checkpoint)."""
    from xlstm_jax.train.checkpoint import write_json
    from xlstm_jax.train.data import bits_per_byte
    from xlstm_jax.train.trainer import train

    model_config, tc = build_configs(args)
    summary = train(model_config, tc, overwrite=args.overwrite, progress=not args.no_progress, print_fn=print)
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
        print(f"throughput        {summary['tokens_per_s']:,.0f} tokens/s on {len(summary['devices'])} x {summary['devices'][0]}")
    mem = [m for m in summary["peak_memory_bytes"] if m is not None]
    if mem:
        print("peak memory       " + ", ".join(f"{m / 2**30:.2f} GiB" for m in mem) + " (per device)")
    if tc.checkpoints and not summary["interrupted"]:
        print(f"generate text     xlstm-jax generate --run-dir {tc.out_dir} --prompt \"The \"")
    return 0
