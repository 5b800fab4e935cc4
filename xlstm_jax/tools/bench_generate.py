"""``xlstm-jax bench-generate``: model-level inference of the xLSTM-7B architecture on one device.

Random weights (``--dtype``, default bfloat16) of a preset (default ``7b``: 6.9B parameters), the
serving code path of ``xlstm_jax.models.xlstm_lm.Generator``:

* prefill throughput: ``--tokens-per-measurement`` tokens (default 65,536) as (B, S) with
  B = tokens / S for each S of ``--prefill-lengths`` (default 2048 ... 32768): the masked prefill
  with the LM head at each row's last position and the first token sampled, tokens/s;
* time to first token at each of ``--ttft-lengths`` (default 128, 2048, 16384) prompt tokens, B = 1:
  from the call to the first token on the host;
* decode tokens/s at each B of ``--decode-batches`` (default 1, 8, 64) over ``--decode-tokens``
  (default 256) tokens after a 128-token prompt, ``--block-size`` tokens per device call, each
  block fetched while the next runs (as served); per row and summed over rows; for each parameter
  layout of ``--decode-layouts`` ("unrolled": per-block weights, "scan": stacked weights in one
  ``nn.scan``);
* peak device memory after each part (``memory_stats``, where the platform reports it).

Each figure stands beside its floor from ceilings measured in the same run: the copy bandwidth
(``x + 1`` over ``--copy-mib`` MiB of float32, bytes read + written) and the matmul rate
(``--matmul-n`` cubed bf16 products). Floors: prefill = model FLOP / matmul rate (FLOP per token:
2 x the matmul weights, plus the chunkwise cell 2 NH (L DHQK + L DHV + 2 DHQK DHV) at chunk L);
TTFT = max(that, weight bytes / bandwidth); decode step = (weight bytes + 2 x state bytes) /
bandwidth. Medians of ``--reps`` timed repetitions after a warm-up call that compiles.

On a CPU it runs at a tiny config for a smoke test, e.g. ``--preset tiny --dtype float32
--prefill-lengths 32 --tokens-per-measurement 64 --ttft-lengths 16 --decode-batches 1,2
--decode-tokens 8 --block-size 4 --reps 1 --copy-mib 8 --matmul-n 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from xlstm_jax.tools.errors import UsageError

PAPER = {  # xLSTM 7B paper, one H100, transformers + torch.compile
    "prefill_tokens_per_s": 47.6e3, "ttft_ms": {128: 8.7, 2048: 46.1, 16384: 349.0}, "decode_tokens_per_s_b1": 157.0,
}
GOALS = {"prefill_tokens_per_s": 45e3, "ttft_ms_2048": 40.0, "decode_tokens_per_s_b1": 240.0}  # one H200


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise UsageError(f"{name} must be comma-separated integers; got {text!r}") from err
    if not values or min(values) < 1:
        raise UsageError(f"{name} must list positive integers; got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax bench-generate``."""
    parser.add_argument("--preset", default="7b", help="model preset (default: 7b)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="parameter and compute dtype (default: bfloat16)")
    parser.add_argument("--backend", default=None, help="prefill backend (default: triton_kernels on GPU, else fwbw_stabilized)")
    parser.add_argument("--chunk-size", type=int, default=None, help="backend chunk size (default: 128 on GPU, 64 on CPU)")
    parser.add_argument("--step-kernel", default="recurrent_native", help="decode step kernel (default: recurrent_native)")
    parser.add_argument("--parts", default="prefill,ttft,decode", help="which parts to run (default: all three)")
    parser.add_argument("--prefill-lengths", default="2048,4096,8192,16384,32768", help="prompt lengths S of the prefill part")
    parser.add_argument("--tokens-per-measurement", type=int, default=65536, help="B * S of each prefill measurement")
    parser.add_argument("--ttft-lengths", default="128,2048,16384", help="prompt lengths of the time-to-first-token part")
    parser.add_argument("--decode-batches", default="1,8,64", help="batch sizes of the decode part")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens decoded per measurement (default: 256)")
    parser.add_argument("--decode-prompt", type=int, default=128, help="prompt length before decoding (default: 128)")
    parser.add_argument("--block-size", type=int, default=32, help="decode steps per device call (default: 32)")
    parser.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of the decode block (default: 1)")
    parser.add_argument("--prefill-layout", default="scan", choices=("scan", "unrolled"),
                        help="parameter layout for prefill and TTFT (default: scan: compiles once per shape fast)")
    parser.add_argument("--decode-layouts", default="unrolled,scan", help="parameter layouts timed for decoding")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per figure (median; default 3)")
    parser.add_argument("--copy-mib", type=int, default=2048, help="MiB of float32 for the bandwidth ceiling")
    parser.add_argument("--matmul-n", type=int, default=8192, help="n of the n x n x n bf16 matmul ceiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None,
                        help="write every figure to this JSON file, rewritten after each figure (default: none)")
    parser.add_argument("--table-from", default=None, metavar="JSON",
                        help="only print the table of a JSON file that --json wrote (also a partial one) (default: none)")


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` (which blocks on its result) over ``reps`` calls."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_ceilings(copy_bytes: int, matmul_n: int, reps: int) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s), measured now."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((copy_bytes // 4,), jnp.float32)
    add = jax.jit(lambda x: x + 1)
    jax.block_until_ready(add(x))
    t_copy = _median_time(lambda: jax.block_until_ready(add(x)), max(reps, 3))
    del x
    a = jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    t_mm = _median_time(lambda: jax.block_until_ready(mm(a, b)), max(reps, 3))
    return {"copy_bytes_per_s": 2 * copy_bytes / t_copy, "matmul_flop_per_s": 2 * matmul_n**3 / t_mm}


def model_costs(cfg, chunk: int) -> dict[str, float]:
    """Weight bytes, state bytes per row, and FLOP per prefill token (matmuls + chunkwise cell) of ``cfg``."""
    import numpy as np

    E, V, NH, F, NB = cfg.embedding_dim, cfg.vocab_size, cfg.num_heads, cfg.ffn_dim, cfg.num_blocks
    QK, VD, DHQK, DHV = cfg.qk_dim, cfg.v_dim, cfg.qk_head_dim, cfg.v_head_dim
    item = np.dtype(cfg.params_dtype).itemsize
    matmul_params = NB * (E * (2 * QK + 2 * VD + 2 * NH) + VD * E + 3 * E * F)  # per token, no head
    cell = NB * 2 * NH * (chunk * DHQK + chunk * DHV + 2 * DHQK * DHV)
    state = NB * NH * (DHQK * DHV + DHQK + 1) * 4  # float32 C, n, m per row
    return {
        "weight_bytes": float(cfg.num_params() * item),
        "state_bytes_per_row": float(state),
        "flop_per_token": float(2 * matmul_params + cell),
        "flop_head_per_row": float(2 * E * V),
    }


def _peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a table (and JSON with ``--json``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xlstm_jax.kernels import available_mlstm_step_kernels
    from xlstm_jax.models.xlstm_lm import Generator, init_params, preset_config, unstack_block_params, xLSTMLMModel
    from xlstm_jax.models.xlstm_lm.config import PRESETS
    from xlstm_jax.models.xlstm_lm.hf import default_inference_backend
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends

    if args.table_from is not None:
        try:
            with open(args.table_from) as fh:
                print_table(json.load(fh))
        except (OSError, ValueError) as err:
            raise UsageError(f"--table-from {args.table_from}: {err}") from None
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"prefill", "ttft", "decode"}:
        raise UsageError(f"--parts must list prefill, ttft, decode; got {args.parts!r}")
    if args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r} is unknown; presets: {', '.join(sorted(PRESETS))}")
    prefill_lengths = _ints(args.prefill_lengths, "--prefill-lengths")
    ttft_lengths = _ints(args.ttft_lengths, "--ttft-lengths")
    batches = _ints(args.decode_batches, "--decode-batches")
    layouts = [x.strip() for x in args.decode_layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"scan", "unrolled"}:
        raise UsageError(f"--decode-layouts must list scan and/or unrolled; got {args.decode_layouts!r}")
    for name in ("tokens_per_measurement", "decode_tokens", "decode_prompt", "block_size", "unroll", "reps",
                 "copy_mib", "matmul_n"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for S in prefill_lengths:
        if args.tokens_per_measurement % S:
            raise UsageError(f"--tokens-per-measurement {args.tokens_per_measurement} is not a multiple of prefill length {S}")
    if args.step_kernel not in available_mlstm_step_kernels():
        raise UsageError(f"--step-kernel {args.step_kernel!r} is unknown; step kernels: {', '.join(available_mlstm_step_kernels())}")
    backend, kwargs = default_inference_backend()
    if args.backend is not None:
        if args.backend not in available_mlstm_backends():
            raise UsageError(f"--backend {args.backend!r} is unknown; backends: {', '.join(available_mlstm_backends())}")
        backend, kwargs = args.backend, {}
    if args.chunk_size is not None:
        kwargs = {**kwargs, "chunk_size": args.chunk_size}
    try:
        cfg = preset_config(
            args.preset, dtype=args.dtype, param_dtype=args.dtype, mlstm_backend=backend,
            mlstm_backend_kwargs=kwargs, mlstm_step_kernel=args.step_kernel, remat=False,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    chunk = int(dict(cfg.mlstm_backend_kwargs).get("chunk_size", 64))
    dev = jax.devices()[0]
    result: dict[str, Any] = {
        "device": str(dev), "device_kind": getattr(dev, "device_kind", ""), "jax": jax.__version__,
        "preset": args.preset, "dtype": args.dtype, "backend": backend, "backend_kwargs": dict(cfg.mlstm_backend_kwargs),
        "step_kernel": args.step_kernel, "num_params": cfg.num_params(), "paper": PAPER, "goals": GOALS,
    }
    print(f"# bench-generate: {args.preset} ({cfg.num_params():,} parameters, {args.dtype}) on {dev} "
          f"({result['device_kind']}), jax {jax.__version__}; prefill {backend} {dict(cfg.mlstm_backend_kwargs)}, "
          f"decode {args.step_kernel}", flush=True)

    ceil = measure_ceilings(args.copy_mib << 20, args.matmul_n, args.reps)
    bw, rate = ceil["copy_bytes_per_s"], ceil["matmul_flop_per_s"]
    result["ceilings"] = ceil
    costs = model_costs(cfg, chunk)
    result["costs"] = costs
    print(f"# ceilings: copy {bw / 1e9:.1f} GB/s, bf16 matmul {rate / 1e12:.1f} TFLOP/s; weights "
          f"{costs['weight_bytes'] / 1e6:.1f} MB, state {costs['state_bytes_per_row'] / 1e6:.2f} MB per row, "
          f"{costs['flop_per_token'] / 1e6:.1f} MFLOP per prefill token", flush=True)

    t0 = time.perf_counter()
    init_cfg = cfg.replace(mlstm_backend="fwbw_stabilized", mlstm_backend_kwargs={"chunk_size": 16})
    params = jax.jit(lambda k: init_params(init_cfg, k, seq_len=1))(jax.random.key(args.seed))
    jax.block_until_ready(params)
    print(f"# random weights on the device in {time.perf_counter() - t0:.1f} s", flush=True)
    needed = set(layouts) if "decode" in parts else set()
    if "prefill" in parts or "ttft" in parts:
        needed.add(args.prefill_layout)
    stores = {"scan": params}
    if "unrolled" in needed:  # a second copy of the weights (13.7 GB for the 7B in bf16)
        stores["unrolled"] = jax.block_until_ready(unstack_block_params(params))
    if "scan" not in needed:
        del stores["scan"]
    del params
    gens = {
        name: Generator(xLSTMLMModel(cfg, unrolled=name == "unrolled"), p, block_size=args.block_size, unroll=args.unroll)
        for name, p in stores.items()
    }
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, ...]] = []
    result["rows"] = rows

    def dump() -> None:
        """Write the JSON so far (after every figure: a run stopped by a time limit keeps its figures)."""
        if args.json:
            result["peak_bytes"] = _peak_memory()
            with open(args.json + ".tmp", "w") as fh:
                json.dump(result, fh, indent=2)
            os.replace(args.json + ".tmp", args.json)

    dump()

    def tokens(B: int, S: int) -> np.ndarray:
        return rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)

    if "prefill" in parts:
        gen = gens[args.prefill_layout]
        pf = gen.prefill_fn()
        out = result["prefill"] = []
        for S in prefill_lengths:
            B = args.tokens_per_measurement // S
            toks, lens, seeds = jnp.asarray(tokens(B, S)), jnp.full((B,), S, jnp.int32), jnp.arange(B, dtype=jnp.uint32)
            jax.block_until_ready(pf(toks, lens, seeds))
            t = _median_time(lambda: jax.block_until_ready(pf(toks, lens, seeds)), args.reps)
            n = B * S
            floor = (n * costs["flop_per_token"] + B * costs["flop_head_per_row"]) / rate
            rec = {"S": S, "B": B, "seconds": t, "tokens_per_s": n / t, "floor_tokens_per_s": n / floor,
                   "peak_bytes": _peak_memory()}
            out.append(rec)
            rows.append(("prefill", f"S={S} B={B}", f"{n / t / 1e3:.1f}k tok/s", f"{n / floor / 1e3:.1f}k tok/s",
                         f"{100 * floor / t:.0f}%", "47.6k tok/s", ">= 45k tok/s"))
            print(f"prefill S={S:6d} B={B:3d}: {t * 1e3:9.1f} ms  {n / t:10.0f} tok/s  (floor {n / floor:10.0f})", flush=True)
            dump()

    if "ttft" in parts:
        gen = gens[args.prefill_layout]
        pf = gen.prefill_fn()
        out = result["ttft"] = []
        for S in ttft_lengths:
            toks, lens, seeds = jnp.asarray(tokens(1, S)), jnp.full((1,), S, jnp.int32), jnp.zeros((1,), jnp.uint32)

            def first_token():
                _, first = pf(toks, lens, seeds)
                return np.asarray(jax.device_get(first))

            first_token()
            t = _median_time(first_token, max(args.reps, 3))
            floor = max((S * costs["flop_per_token"] + costs["flop_head_per_row"]) / rate, costs["weight_bytes"] / bw)
            rec = {"S": S, "seconds": t, "floor_seconds": floor, "peak_bytes": _peak_memory()}
            out.append(rec)
            paper = PAPER["ttft_ms"].get(S)
            rows.append(("ttft", f"S={S}", f"{t * 1e3:.1f} ms", f"{floor * 1e3:.1f} ms", f"{100 * floor / t:.0f}%",
                         f"{paper} ms" if paper else "", "<= 40 ms" if S == 2048 else ""))
            print(f"ttft    S={S:6d}:      {t * 1e3:9.2f} ms  (floor {floor * 1e3:.2f} ms)", flush=True)
            dump()

    if "decode" in parts:
        out = result["decode"] = []
        for layout in layouts:
            gen = gens[layout]
            pf, dec = gen.prefill_fn(), gen.decode_fn()
            for B in batches:
                toks = jnp.asarray(tokens(B, args.decode_prompt))
                lens, seeds = jnp.full((B,), args.decode_prompt, jnp.int32), jnp.arange(B, dtype=jnp.uint32)
                nblocks = -(-args.decode_tokens // args.block_size)

                def decode_run():
                    carry, first = pf(toks, lens, seeds)
                    jax.block_until_ready(carry)
                    t0 = time.perf_counter()
                    pending = None
                    for _ in range(nblocks):  # as served: fetch a block while the next one runs
                        carry, blk = dec(carry)
                        if pending is not None:
                            np.asarray(jax.device_get(pending))
                        pending = blk
                    np.asarray(jax.device_get(pending))
                    return time.perf_counter() - t0

                decode_run()  # compiles
                t = statistics.median(decode_run() for _ in range(args.reps))
                steps = nblocks * args.block_size
                t_step = t / steps
                floor_step = (costs["weight_bytes"] + 2 * B * costs["state_bytes_per_row"]) / bw
                rec = {"layout": layout, "B": B, "steps": steps, "seconds": t, "tokens_per_s_per_row": 1 / t_step,
                       "tokens_per_s": B / t_step, "floor_tokens_per_s_per_row": 1 / floor_step, "peak_bytes": _peak_memory()}
                out.append(rec)
                rows.append(("decode", f"B={B} {layout}", f"{1 / t_step:.0f} tok/s/row ({B / t_step:.0f} total)",
                             f"{1 / floor_step:.0f} tok/s/row", f"{100 * floor_step / t_step:.0f}%",
                             "157 tok/s" if B == 1 else "", ">= 240 tok/s" if B == 1 else ""))
                print(f"decode  B={B:4d} {layout:8s}: {t_step * 1e3:8.3f} ms/step  {1 / t_step:8.1f} tok/s/row "
                      f"{B / t_step:9.1f} tok/s  (floor {1 / floor_step:.1f} tok/s/row)", flush=True)
                dump()

    result["peak_bytes"] = _peak_memory()
    result["complete"] = True
    dump()
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    """The short table of a run's figures (``result``: what ``--json`` writes, possibly partial)."""
    print()
    print(f"# {result.get('preset')} {result.get('dtype')} on {result.get('device_kind') or result.get('device')}, "
          f"jax {result.get('jax')}; ceilings: copy {result['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {result['ceilings']['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s" if "ceilings" in result else "# no ceilings measured")
    print("| part | shape | measured | floor | % of floor | paper (H100) | goal (H200) |")
    print("|---|---|---|---|---|---|---|")
    for r in result.get("rows", []):
        print("| " + " | ".join(r) + " |")
    peak = result.get("peak_bytes")
    print(f"\npeak device memory: {peak / 2**30:.2f} GiB" if peak else "\npeak device memory: not reported by this platform")
    if not result.get("complete"):
        print("(incomplete: the run stopped before every figure was measured)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``python -m xlstm_jax.tools.bench_generate`` (the same as ``xlstm-jax bench-generate``)."""
    parser = argparse.ArgumentParser(prog="bench-generate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UsageError as err:
        print(f"bench-generate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
