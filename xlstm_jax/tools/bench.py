"""``xlstm-jax bench``: time mLSTM kernels at PERF.md's standard workload, through the registry.

Standard workload: bf16 inputs, NH=16, DHQK=128, DHV=256, 65,536 tokens as (B, S) = (32, 2048),
(8, 8192), (2, 32768). For each kernel and shape: "fw" (h only) and "fwbw" (gradients of
sum(h * dh) for q, k, v, i, f), median milliseconds over timed runs after compile and warm-up,
achieved TFLOP/s on the nominal chunkwise FLOP count (PERF.md: 2*(L*DHQK + L*DHV + 2*DHQK*DHV) per
token and head at L=64 for fw, three times that for fwbw), the fraction of the roofline floor
(max(FLOP / matmul peak, bytes / copy bandwidth), both ceilings measured in the same run on GPU),
and the compiled program's memory (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

STANDARD_SHAPES = ((32, 2048), (8, 8192), (2, 32768))
# kernels that cannot run the standard workload (quadratic memory, one step at a time)
NOT_FOR_STANDARD = ("parallel_native", "recurrent_native")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", nargs="*", default=None,
                   help="kernel names, optionally NAME:key=value,key=value for kernel options "
                        "(default: every registered kernel that can run the workload)")
    p.add_argument("--shapes", default=None,
                   help="B,S pairs separated by ';' (default: the standard 32,2048;8,8192;2,32768)")
    p.add_argument("--heads", default="16,128,256", help="NH,DHQK,DHV (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--grad-mode", nargs="*", default=["exact"], choices=["exact", "tfla"])
    p.add_argument("--modes", nargs="*", default=["fw", "fwbw"], choices=["fw", "fwbw"])
    p.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs after compilation")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring matmul/copy ceilings")
    p.add_argument("--json", default=None, help="write all results to this JSON file")


def parse_kernel_arg(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values parsed as int, float, bool or str)."""
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"kernel option {item!r} is not key=value (in {text!r})")
        for conv in (int, float):
            try:
                opts[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            opts[key] = {"true": True, "false": False, "none": None}.get(val.lower(), val)
    return name, opts


def nominal_flops(B: int, NH: int, S: int, DHQK: int, DHV: int, mode: str, L: int = 64) -> float:
    """PERF.md's nominal chunkwise FLOP count (fw), three times that for fw+bw."""
    fw = 2.0 * (L * DHQK + L * DHV + 2 * DHQK * DHV) * B * NH * S
    return fw if mode == "fw" else 3.0 * fw


def nominal_bytes(B: int, NH: int, S: int, DHQK: int, DHV: int, mode: str, itemsize: int, L: int = 64) -> float:
    """Fewest bytes: q, k, v, h (and for fwbw dh, dq, dk, dv) once, plus the chunk states in fp32."""
    tokens = B * NH * S
    io = tokens * (2 * DHQK + 2 * DHV) * itemsize
    states = B * NH * (S // L) * DHQK * DHV * 4
    if mode == "fw":
        return io + states
    return io + tokens * (2 * DHQK + 2 * DHV) * itemsize + 3 * states


def time_fn(fn, args, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn(*args)`` over ``reps`` runs (compiled and warmed up first)."""
    import jax

    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def measure_ceilings(reps: int = 10) -> dict:
    """bf16 matmul TFLOP/s (8192^3) and device copy bandwidth (bytes read + written) on this device."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = time_fn(mm, (a, b), reps, 3)
    x = jax.random.normal(jax.random.PRNGKey(2), (256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    cp = jax.jit(lambda x: x * 1.0001)
    t_cp = time_fn(cp, (x,), reps, 3)
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e9, "copy_tbps": 2 * x.nbytes / t_cp / 1e9}


def compiled_memory_bytes(jitted, args) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (None if XLA does not say)."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # memory analysis is optional per backend
        return None


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from xlstm_jax.kernels import available_mlstm_kernels, get_mlstm_kernel
    from xlstm_jax.testing import mlstm_inputs

    NH, DHQK, DHV = (int(x) for x in args.heads.split(","))
    shapes = STANDARD_SHAPES if args.shapes is None else tuple(
        tuple(int(x) for x in pair.split(",")) for pair in args.shapes.split(";")
    )
    kernel_args = args.kernels or [k for k in available_mlstm_kernels() if k not in NOT_FOR_STANDARD]
    kernels = [parse_kernel_arg(k) for k in kernel_args]
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    print(f"xlstm-jax bench on {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"NH={NH} DHQK={DHQK} DHV={DHV} {args.dtype}")
    ceilings = measure_ceilings() if (on_gpu and not args.no_ceilings) else None
    if ceilings:
        print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
              f"copy {ceilings['copy_tbps']:.2f} TB/s")

    results = []
    jobs = [(n, o, B, S, gm) for B, S in shapes for n, o in kernels for gm in args.grad_mode]
    for name, opts, B, S, gm in tqdm(jobs, desc="bench", unit="case"):
        kernel = get_mlstm_kernel(name, **opts)
        q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(B * S), B, NH, S, DHQK, DHV, dtype=dtype)
        dh = jax.random.normal(jax.random.PRNGKey(7), (B, NH, S, DHV), jnp.float32).astype(dtype)
        fw = jax.jit(lambda q, k, v, i, f, _k=kernel, _gm=gm: _k(q, k, v, i, f, grad_mode=_gm))

        def loss(q, k, v, i, f, dh, _k=kernel, _gm=gm):
            h = _k(q, k, v, i, f, grad_mode=_gm)
            return jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32))

        fwbw = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        for mode in args.modes:
            fn, fargs = (fw, (q, k, v, i, f)) if mode == "fw" else (fwbw, (q, k, v, i, f, dh))
            row = {"kernel": name, "options": opts, "grad_mode": gm, "B": B, "S": S, "mode": mode}
            try:
                out = jax.block_until_ready(fn(*fargs))
                leaves = jax.tree_util.tree_leaves(out)
                row["nan"] = bool(any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in leaves))
                row["ms"] = time_fn(fn, fargs, args.reps, args.warmup)
                row["memory_gb"] = (compiled_memory_bytes(fn, fargs) or 0) / 1e9 or None
                flops = nominal_flops(B, NH, S, DHQK, DHV, mode)
                nbytes = nominal_bytes(B, NH, S, DHQK, DHV, mode, dtype.itemsize)
                row["tflops"] = flops / row["ms"] / 1e9
                if ceilings:
                    floor_ms = max(flops / (ceilings["matmul_tflops"] * 1e9), nbytes / (ceilings["copy_tbps"] * 1e9))
                    row["floor_ms"] = floor_ms
                    row["floor_fraction"] = floor_ms / row["ms"]
            except Exception as e:  # report and go on with the other cases
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)

    print(f"\n{'kernel':<40}{'grad':>6}{'B':>4}{'S':>7}{'mode':>6}{'ms':>10}{'TFLOP/s':>9}{'floor%':>8}{'mem GB':>8}")
    for r in results:
        label = r["kernel"] + ("" if not r["options"] else ":" + ",".join(f"{k}={v}" for k, v in r["options"].items()))
        head = f"{label[:39]:<40}{r['grad_mode']:>6}{r['B']:>4}{r['S']:>7}{r['mode']:>6}"
        if "error" in r:
            print(head + "  ERROR " + r["error"][:120])
            continue
        floor = f"{100 * r['floor_fraction']:7.1f}%" if "floor_fraction" in r else f"{'-':>8}"
        mem = f"{r['memory_gb']:8.2f}" if r.get("memory_gb") else f"{'-':>8}"
        print(head + f"{r['ms']:10.3f}{r['tflops']:9.1f}{floor}{mem}" + ("  NaN!" if r["nan"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "ceilings": ceilings,
                       "NH": NH, "DHQK": DHQK, "DHV": DHV, "dtype": args.dtype, "results": results}, fh, indent=1)
    return 1 if any("error" in r or r.get("nan") for r in results) else 0
