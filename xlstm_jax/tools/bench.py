"""``xlstm-jax bench``: time mLSTM sequence kernels at the benchmark workload, through the registry.

The workload (its definition in words: the opening section of ``docs/benchmarks.md``; the numbers:
``xlstm_jax.tools.workload``): bf16 inputs; head shapes ``standard`` (16, 128, 256), ``7b``
(8, 256, 512) and ``small`` (8, 64, 128) as (NH, DHQK, DHV); 65,536 tokens as (B, S) = (32, 2048),
(8, 8192), (2, 32768) for the first two and (16, 2048) for ``small``. For each kernel, head shape,
(B, S) and gradient convention: ``fw`` (h only) and ``fwbw`` (the gradients of sum(h * dh) for
q, k, v, i, f), timed by ``xlstm_jax.tools.timing.time_calls`` (median over timed calls after
compilation and warm-up, inputs rotated between two sets); the achieved TFLOP/s on the nominal
FLOP count, the fraction of the roofline floor (max(FLOP / bf16 matmul rate, bytes / copy bandwidth),
both ceilings measured in the same run on a GPU), the compiled program's memory and, with
``--check``, the relative errors of h and the five gradients against ``chunkwise_native`` in
float32 with full-precision matrix products (``--check-precision``) on the same inputs. For
``chunkwise_pallas`` the rows also record the kernel parameters the call uses and where they came
from (``kernel_params``, ``tuning_source``: a tuned table of ``xlstm-jax tune`` or the heuristics;
``--kernels chunkwise_pallas:tuned=false`` runs the heuristics).

float32 with full-precision matrix products (``--check-precision``) on the same inputs.

``--packed MIN,MAX`` adds cases of packed documents: every row is cut into documents of random
lengths in [MIN, MAX] (seeded by B, S, MIN, MAX and the row) passed as ``segment_ids``; ``off`` is
the unpacked case (default: only ``off``). ``--input-gate exp sigmoid`` times both cells.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from .errors import UsageError
from .options import float_range, int_at_least
from .workload import HEAD_PRESETS, NOMINAL_CHUNK, heads_arg, nominal_bytes, nominal_flops, parse_heads, shapes_arg

# kernels that cannot run the workload (quadratic memory, one step at a time)
NOT_FOR_WORKLOAD = ("parallel_native", "recurrent_native")
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 2e-2}
GRADS = ("q", "k", "v", "i", "f")


def _packed_type(text: str):
    """``off`` (None) or ``MIN,MAX`` document lengths (1 <= MIN <= MAX)."""
    if text == "off":
        return None
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected off or MIN,MAX (two ints); got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"document lengths need 1 <= MIN <= MAX; got {text!r}")
    return (lo, hi)


def packed_segment_ids(B: int, S: int, lengths: tuple[int, int]):
    """(B, S) int32 segment ids: each row cut into documents of random lengths in [MIN, MAX]
    (NumPy generator seeded by (B, S, MIN, MAX, row)), ids 0, 1, ... per row."""
    import numpy as np

    lo, hi = lengths
    rows = []
    for b in range(B):
        rng = np.random.default_rng([B, S, lo, hi, b])
        n = -(-S // lo) + 1
        doc_len = rng.integers(lo, hi + 1, size=n)
        rows.append(np.repeat(np.arange(n, dtype=np.int32), doc_len)[:S])
    return np.stack(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax bench``."""
    p.add_argument("--kernels", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="kernels, each optionally with kernel options, e.g. chunkwise_native:chunk_size=128 "
                        "(default: every registered kernel that can run the workload)")
    p.add_argument("--heads", action="append", type=heads_arg, default=None, metavar="PRESET|NH,DHQK,DHV",
                   help=f"head shape, a preset ({', '.join(f'{k} = {v[0]},{v[1]},{v[2]}' for k, v in HEAD_PRESETS.items())}) "
                        "or explicit sizes; repeatable (default: all three presets)")
    p.add_argument("--shapes", type=shapes_arg, default=None, metavar="B,S;B,S",
                   help="(B, S) shapes for every head shape, e.g. '8,8192' (default: each preset's own: "
                        "32,2048;8,8192;2,32768, and 16,2048 for small)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="input dtype")
    p.add_argument("--grad-mode", nargs="+", default=["exact"], choices=["exact", "tfla"],
                   help="gradient conventions (default: exact)")
    p.add_argument("--input-gate", nargs="+", default=["exp"], choices=["exp", "sigmoid"],
                   help="input gate(s) of the cell: exp (default) and/or sigmoid (mLSTMsig)")
    p.add_argument("--packed", nargs="+", type=_packed_type, default=[None], metavar="off|MIN,MAX",
                   help="packed documents of random lengths in [MIN, MAX] (seeded), passed as segment_ids; "
                        "off: unpacked (default: off); e.g. --packed off 100,4000 times both")
    p.add_argument("--modes", nargs="+", default=["fw", "fwbw"], choices=["fw", "fwbw"],
                   help="what to time (default: fw fwbw)")
    p.add_argument("--reps", type=int_at_least(1), default=20, help="timed calls per measurement")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed calls after compilation")
    p.add_argument("--floor-chunk", type=int_at_least(1), default=NOMINAL_CHUNK,
                   help="chunk length L of the nominal FLOP and byte counts")
    p.add_argument("--no-ceilings", action="store_true",
                   help="do not measure the matmul / copy ceilings (they are measured on a GPU only)")
    p.add_argument("--check", action="store_true",
                   help="also compare h and the gradients with chunkwise_native in float32 (off by default)")
    p.add_argument("--check-precision", default="highest", choices=["highest", "high", "default"],
                   help="matmul precision of the --check reference (XLA:GPU's default for float32 is TF32)")
    p.add_argument("--check-tol", type=float_range(0.0, low_open=True), default=None,
                   help="--check fails a case above this relative error (default: 1e-3 for float32, 2e-2 for bf16/fp16)")
    p.add_argument("--label", default="", help="a label stored with the results")
    p.add_argument("--json", default=None, help="write all results to this JSON file (default: none)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile each case (jax.profiler, one trace directory per case under DIR, with "
                        "the compiled HLO text) and print its per-kernel time breakdown (default: off)")
    p.add_argument("--profile-calls", type=int_at_least(1), default=5,
                   help="calls traced per profiled case (the breakdown is per call)")


def parse_kernel_arg(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values parsed as int, float, bool, None or str)."""
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--kernels: kernel option {item!r} is not key=value (in {text!r})")
        for conv in (int, float):
            try:
                opts[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            opts[key] = {"true": True, "false": False, "none": None}.get(val.lower(), val)
    return name, opts


def compiled_memory_bytes(jitted, args) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (None if XLA does not say)."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # memory analysis is optional per backend
        return None


def _peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend has memory statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _resolve_kernels(args) -> list[tuple[str, dict, object]]:
    """(name, options, kernel) for every --kernels entry; ``UsageError`` for unknown ones."""
    from xlstm_jax.kernels import get_mlstm_kernel
    from xlstm_jax.kernels.registry import default_tool_kernels

    texts = args.kernels or [k for k in default_tool_kernels() if k not in NOT_FOR_WORKLOAD]
    out = []
    for text in texts:
        name, opts = parse_kernel_arg(text)
        try:
            out.append((name, opts, get_mlstm_kernel(name, **opts)))
        except ValueError as err:
            raise UsageError(f"--kernels: {err}") from None
    return out


def _inputs(seed: int, B: int, NH: int, S: int, DHQK: int, DHV: int, dtype):
    """(q, k, v, i, f) and dh of one input set (forget gates around +3, as in training)."""
    import jax
    import jax.numpy as jnp

    from xlstm_jax.testing import mlstm_inputs

    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(seed), B, NH, S, DHQK, DHV, dtype=dtype)
    dh = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 7), (B, NH, S, DHV), jnp.float32).astype(dtype)
    return (q, k, v, i, f), dh


def _fw_fwbw(kernel, grad_mode, input_gate="exp", segment_ids=None):
    """Jitted fw(q, k, v, i, f) and fwbw(q, k, v, i, f, dh); ``segment_ids`` (B, S) are closed over
    (a device array, not a constant folded into the program)."""
    import jax
    import jax.numpy as jnp

    seg = None if segment_ids is None else jnp.asarray(segment_ids)

    def call(q, k, v, i, f, seg):
        return kernel(q, k, v, i, f, grad_mode=grad_mode, input_gate=input_gate, segment_ids=seg)

    fw_seg = jax.jit(call)

    def loss(q, k, v, i, f, dh, seg):
        return jnp.sum(call(q, k, v, i, f, seg).astype(jnp.float32) * dh.astype(jnp.float32))

    fwbw_seg = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    fw = lambda q, k, v, i, f: fw_seg(q, k, v, i, f, seg)  # noqa: E731
    fwbw = lambda q, k, v, i, f, dh: fwbw_seg(q, k, v, i, f, dh, seg)  # noqa: E731
    fw.lower = lambda *a: fw_seg.lower(*a, seg)
    fwbw.lower = lambda *a: fwbw_seg.lower(*a, seg)
    return fw, fwbw


def _reference(x, dh, grad_mode, precision, input_gate="exp", segment_ids=None):
    """h and the five gradients of ``chunkwise_native`` (chunk 64) in float32 at ``precision``."""
    import jax
    import jax.numpy as jnp

    from xlstm_jax.kernels import get_mlstm_kernel

    fw, fwbw = _fw_fwbw(get_mlstm_kernel("chunkwise_native", chunk_size=64), grad_mode, input_gate, segment_ids)
    x32 = tuple(a.astype(jnp.float32) for a in x)
    with jax.default_matmul_precision(precision):
        return fw(*x32), fwbw(*x32, dh.astype(jnp.float32))


def pallas_kernel_params(opts: dict, B: int, NH: int, S: int, DHQK: int, DHV: int, dtype, grad_mode: str) -> dict:
    """What ``chunkwise_pallas`` with ``opts`` runs at this shape: ``{"kernel_params": {...},
    "tuning_source": "heuristics" | path of the tuned table}`` (the trace-time lookup of
    ``xlstm_jax.kernels.mlstm_chunkwise.pallas.tuning``, without running anything)."""
    import dataclasses

    from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning
    from xlstm_jax.kernels.mlstm_chunkwise.pallas.autodiff import kernel_dtype_of
    from xlstm_jax.kernels.mlstm_chunkwise.pallas.heuristics import OVERRIDABLE

    try:
        res = tuning.resolve_kernel_params(
            B=B, NH=NH, S=S, DHQK=DHQK, DHV=DHV, dtype=kernel_dtype_of(opts.get("autocast_kernel_dtype"), dtype),
            grad_mode=grad_mode, chunk_size=opts.get("chunk_size"),
            tile_params={k: opts.get(k) for k in OVERRIDABLE},
            call_options={k: opts.get(k) for k in tuning.CALL_OPTION_DEFAULTS}, tuned=opts.get("tuned"),
        )
    except ValueError as err:  # the kernel call reports it as the case's error
        return {"kernel_params_error": str(err)}
    return {"kernel_params": {**dataclasses.asdict(res.params), **res.call_options}, "tuning_source": res.source}


def auto_family_choice(opts: dict, B: int, NH: int, S: int, DHQK: int, DHV: int, dtype, grad_mode: str) -> dict:
    """What ``chunkwise_auto`` with ``opts`` runs at this shape: ``{"family": "mosaic" | "triton",
    "family_reason": ..., "mosaic_options": {...}}`` plus the Triton family's parameters of
    ``pallas_kernel_params`` (the recurrent kernels and the gates of both families), from the same
    trace-time lookup as the call (nothing runs)."""
    from xlstm_jax.kernels.mlstm_chunkwise.mosaic.auto import choose_family
    from xlstm_jax.kernels.mlstm_chunkwise.pallas.autodiff import kernel_dtype_of

    try:
        choice = choose_family(B=B, NH=NH, S=S, DHQK=DHQK, DHV=DHV,
                               kernel_dtype=kernel_dtype_of(opts.get("autocast_kernel_dtype"), dtype),
                               grad_mode=grad_mode, chunk_size=opts.get("chunk_size"), tuned=opts.get("tuned"),
                               interpret=opts.get("interpret"))
    except ValueError as err:  # the kernel call reports it as the case's error
        return {"family_error": str(err)}
    out = {"family": choice.family, "family_reason": choice.reason}
    if choice.mosaic_options is not None:
        out["mosaic_options"] = choice.mosaic_options
    return {**out, **pallas_kernel_params({k: opts.get(k) for k in ("chunk_size", "autocast_kernel_dtype", "tuned")},
                                          B, NH, S, DHQK, DHV, dtype, grad_mode)}


def _case_name(row: dict) -> str:
    """A directory name for one measured case, e.g. ``chunkwise_pallas-small-B16-S2048-fwbw-exact-exp``."""
    opts = "".join(f"-{k}={v}" for k, v in sorted(row["options"].items()))
    packed = "" if not row["packed"] else f"-packed{row['packed'][0]}_{row['packed'][1]}"
    return (f"{row['kernel']}{opts}-{row['heads']}-B{row['B']}-S{row['S']}-{row['mode']}-{row['grad_mode']}"
            f"-{row['input_gate']}{packed}").replace("/", "_")


def _profile_case(fn, arg_sets, args, name: str) -> dict:
    """Trace ``args.profile_calls`` calls of ``fn`` (already compiled and warm) into
    ``args.profile/name`` and return its per-kernel breakdown (``trace_summary.kernel_breakdown``).
    The compiled HLO text is written beside the trace (``module.hlo.txt``): the fusion names of the
    breakdown are its instruction names."""
    import jax

    from . import trace_summary

    trace_dir = os.path.join(args.profile, name)
    os.makedirs(trace_dir, exist_ok=True)
    hlo_text = fn.lower(*arg_sets[0]).compile().as_text()
    with open(os.path.join(trace_dir, "module.hlo.txt"), "w") as fh:
        fh.write(hlo_text)
    jax.block_until_ready(fn(*arg_sets[0]))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        out = None
        for j in range(args.profile_calls):
            out = fn(*arg_sets[j % len(arg_sets)])
        jax.block_until_ready(out)
    events = trace_summary.device_events(trace_summary.load_trace(trace_summary.find_trace_file(trace_dir)))
    return trace_summary.kernel_breakdown(events, args.profile_calls)


def print_profiles(results: list[dict], top: int = 14) -> None:
    """The per-kernel breakdown of every profiled case: ms per call, share of the device-busy time."""
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        print(f"\nprofile {_case_name(r)}: wall {r['ms']:.3f} ms/call, device busy {prof['busy_ms']:.3f} ms/call "
              f"(Pallas kernels {prof['pallas_ms']:.3f}, XLA ops {prof['xla_ms']:.3f}; "
              f"{prof['launches']:.0f} launches/call)")
        for k in prof["kernels"][:top]:
            print(f"  {k['ms']:8.3f} ms {k['share']:6.1%} x{k['count']:<4g} {k['kind']:<6} {k['name'][:90]}")
        rest = prof["kernels"][top:]
        if rest:
            print(f"  {sum(k['ms'] for k in rest):8.3f} ms {sum(k['share'] for k in rest):6.1%} "
                  f"({len(rest)} more kernels)")


def workload_cases(heads_list, shapes) -> list[tuple]:
    """(Heads, B, S) of every measured case: each head shape (default: the three presets) at
    ``shapes`` (default: the head shape's own, see ``workload.Heads.shapes``)."""
    heads_list = heads_list or [parse_heads(name) for name in HEAD_PRESETS]
    return [(h, B, S) for h in heads_list for B, S in (shapes or h.shapes)]


def run(args) -> int:
    """Run the benchmark; print a table; write JSON if asked. Exit status 1 if a case failed, had a
    NaN or (with --check) exceeded the tolerance."""
    kernels = _resolve_kernels(args)  # user errors first, before any work
    groups = workload_cases(args.heads, args.shapes)
    heads_list = list(dict.fromkeys(h for h, _, _ in groups))

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from xlstm_jax.testing import relative_error

    from .timing import copy_bandwidths, matmul_tflops, time_calls

    dtype = jnp.dtype(args.dtype)
    tol = args.check_tol if args.check_tol is not None else CHECK_TOLERANCE[args.dtype]
    device = jax.devices()[0]
    print(f"xlstm-jax bench on {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{args.dtype}, heads {', '.join(f'{h.name} ({h.NH},{h.DHQK},{h.DHV})' for h in heads_list)}")
    ceilings = None
    if jax.default_backend() == "gpu" and not args.no_ceilings:
        bws = copy_bandwidths()
        ceilings = {"matmul_tflops": matmul_tflops(), "copy_tbps": max(bws.values()) / 1e12,
                    "copy_tbps_all": {k: v / 1e12 for k, v in bws.items()}}
        print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_tbps']:.2f} TB/s "
              f"(best of {', '.join(f'{k} {v:.2f}' for k, v in ceilings['copy_tbps_all'].items())})")

    variants = [(ig, pk) for pk in args.packed for ig in args.input_gate]
    total = len(groups) * len(args.grad_mode) * len(kernels) * len(variants)
    bar = tqdm(total=total, desc="bench", unit="case")
    results = []
    for heads, B, S in groups:
        NH, DHQK, DHV = heads.NH, heads.DHQK, heads.DHV
        sets = [_inputs(seed, B, NH, S, DHQK, DHV, dtype) for seed in (B * S, B * S + 1)]
        fw_sets = [x for x, _ in sets]
        bw_sets = [x + (dh,) for x, dh in sets]
        for gm, (ig, packed) in ((gm, v) for gm in args.grad_mode for v in variants):
            seg = packed_segment_ids(B, S, packed) if packed else None
            ref = _reference(*sets[0], gm, args.check_precision, ig, seg) if args.check else None
            for name, opts, kernel in kernels:
                fw, fwbw = _fw_fwbw(kernel, gm, ig, seg)
                for mode in args.modes:
                    fn, arg_sets = (fw, fw_sets) if mode == "fw" else (fwbw, bw_sets)
                    row = {"kernel": name, "options": opts, "heads": heads.name, "NH": NH, "DHQK": DHQK,
                           "DHV": DHV, "grad_mode": gm, "B": B, "S": S, "mode": mode, "input_gate": ig,
                           "packed": list(packed) if packed else None,
                           "documents": int((seg[:, 1:] != seg[:, :-1]).sum() + B) if packed else B}
                    if name == "chunkwise_pallas":
                        row.update(pallas_kernel_params(opts, B, NH, S, DHQK, DHV, dtype, gm))
                    elif name == "chunkwise_auto":
                        row.update(auto_family_choice(opts, B, NH, S, DHQK, DHV, dtype, gm))
                    try:
                        t0 = time.perf_counter()
                        out = jax.block_until_ready(fn(*arg_sets[0]))
                        row["compile_s"] = time.perf_counter() - t0
                        leaves = jax.tree_util.tree_leaves(out)
                        row["nan"] = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in leaves)
                        t = time_calls(fn, arg_sets, reps=args.reps, warmup=args.warmup)
                        row["ms"], row["min_ms"] = 1e3 * t.median_s, 1e3 * t.min_s
                        row["memory_gb"] = (compiled_memory_bytes(fn, arg_sets[0]) or 0) / 1e9 or None
                        row["peak_bytes_in_use"] = _peak_bytes()
                        flops = nominal_flops(B, NH, S, DHQK, DHV, mode, args.floor_chunk)
                        nbytes = nominal_bytes(B, NH, S, DHQK, DHV, mode, dtype.itemsize, args.floor_chunk)
                        row["tflops"] = flops / row["ms"] / 1e9
                        if ceilings:
                            floor_ms = 1e3 * max(flops / (ceilings["matmul_tflops"] * 1e12),
                                                 nbytes / (ceilings["copy_tbps"] * 1e12))
                            row["floor_ms"], row["floor_fraction"] = floor_ms, floor_ms / row["ms"]
                        if ref is not None:
                            ref_h, ref_grads = ref
                            if mode == "fw":
                                row["err"] = {"h": relative_error(out, ref_h)}
                            else:
                                row["err"] = {"d" + g: relative_error(a, b) for g, a, b in zip(GRADS, out, ref_grads)}
                            row["check_failed"] = not all(e <= tol for e in row["err"].values())  # NaN fails
                        if args.profile:
                            row["profile"] = _profile_case(fn, arg_sets, args, _case_name(row))
                        del out
                    except Exception as e:  # report and go on with the other cases
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    results.append(row)
                bar.update(1)
            del ref
    bar.close()

    def _label(r):
        return r["kernel"] + ("" if not r["options"] else ":" + ",".join(f"{k}={v}" for k, v in r["options"].items()))

    width = max([36] + [len(_label(r)) + 1 for r in results])  # every label whole: variants differ at the end
    print(f"\n{'kernel':<{width}}{'heads':>10}{'grad':>6}{'gate':>8}{'packed':>11}{'B':>4}{'S':>7}{'mode':>6}{'ms':>10}{'TFLOP/s':>9}"
          f"{'floor%':>8}{'mem GB':>8}" + ("  max rel. error" if args.check else ""))
    for r in results:
        label = _label(r)
        packed = "off" if not r["packed"] else f"{r['packed'][0]},{r['packed'][1]}"
        head = (f"{label:<{width}}{r['heads'][:9]:>10}{r['grad_mode']:>6}{r['input_gate']:>8}{packed:>11}"
                f"{r['B']:>4}{r['S']:>7}{r['mode']:>6}")
        if "error" in r:
            print(head + "  ERROR " + r["error"][:120])
            continue
        floor = f"{100 * r['floor_fraction']:7.1f}%" if "floor_fraction" in r else f"{'-':>8}"
        mem = f"{r['memory_gb']:8.2f}" if r.get("memory_gb") else f"{'-':>8}"
        err = ""
        if "err" in r:
            worst = max(r["err"], key=lambda k: float("inf") if r["err"][k] != r["err"][k] else r["err"][k])
            err = f"  {worst} {r['err'][worst]:.1e}" + ("  FAIL" if r["check_failed"] else "")
        print(head + f"{r['ms']:10.3f}{r['tflops']:9.1f}{floor}{mem}" + err + ("  NaN!" if r["nan"] else ""))
    if args.check:
        print(f"--check: relative errors vs chunkwise_native in float32 (matmul precision {args.check_precision}); "
              f"tolerance {tol:g}")
    print(f"TFLOP/s and floor on the nominal counts at L = {args.floor_chunk} (docs/benchmarks.md)")
    shown = set()
    for r in results:  # where the chunkwise_pallas parameters came from (tuned table or heuristics)
        key = (r["heads"], r["B"], r["S"], r["grad_mode"], json.dumps(r["options"], sort_keys=True))
        if "tuning_source" in r and key not in shown:
            shown.add(key)
            fam = ""
            if "family" in r:  # chunkwise_auto: the family and the options it passes on
                mo = ",".join(f"{k}={v}" for k, v in (r.get("mosaic_options") or {}).items())
                fam = f" family {r['family']} ({r['family_reason']}{'; ' + mo if mo else ''});"
            print(f"{r['kernel']} {r['heads']} {r['B']}x{r['S']} {r['grad_mode']}:{fam} parameters from "
                  f"{r['tuning_source']}: " + ",".join(f"{k}={v}" for k, v in r["kernel_params"].items()))
    if args.profile:
        print_profiles(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "ceilings": ceilings,
                       "dtype": args.dtype, "floor_chunk": args.floor_chunk, "label": args.label,
                       "check_precision": args.check_precision if args.check else None,
                       "date": time.strftime("%Y-%m-%d"), "results": results}, fh, indent=1)
    failed = any("error" in r or r.get("nan") or r.get("check_failed") for r in results)
    return 1 if failed else 0
