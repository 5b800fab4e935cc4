"""``xlstm-jax tune``: measure kernel parameters of the Pallas chunkwise (TFLA) kernels on the GPU.

For every key (device kind, head shape, (B, S), dtype, gradient convention; see
``xlstm_jax.kernels.mlstm_chunkwise.pallas.tuning``) the tuner starts from the heuristic defaults
(after trying the best of the head shape's earlier rows, if any) and walks
``tuning.SEARCH_SPACE`` one option at a time (``tuning.coordinate_descent``): every new,
valid, not pruned candidate value is compiled (``--compile-threads`` candidates at a time) and timed
(the objective: ``fwbw``, forward + backward of sum(h * dh) as in ``xlstm-jax bench``, or ``fw``);
the fastest is kept if it gains at least ``--min-gain``. A candidate that fails to compile or run is
recorded and skipped. Each key stops after ``--budget-s`` seconds. Finally the default and the
best are timed in both modes, a table is printed, and the entries (the values that differ from the
heuristics) are written to the user cache (``--cache``, default ``$XLSTM_JAX_TUNING_CACHE`` or
``~/.cache/xlstm_jax/tuning.json``) and, with ``--json``, to a file in exactly the format of the
shipped ``tuned_defaults.json``.

``--families triton mosaic`` also times the Mosaic GPU family (``chunkwise_mosaic``, Hopper
only) with the options of the best Triton candidate that it takes (``mosaic.auto.mosaic_options``)
and records ``"family": "mosaic"`` in the entry when it is faster by ``--min-gain`` in the
objective (the ``chunkwise_auto`` kernel then runs it for that shape); with the ``fwbw`` objective
it times the family's three backward choices (``bw_kernels`` triton, mosaic, mosaic_split) and records
``"mosaic_bw_kernels"`` (whichever was fastest) with a Mosaic win; the fastest of those is timed once
more with the other ``pipeline_slots`` (1 or 2: the forward and dV kernels' buffers; first with
``mosaic.forward.default_pipeline_slots_for``), and the faster count is recorded as
``"mosaic_pipeline_slots"`` with a Mosaic win. Where Mosaic GPU cannot run,
the entry stays Triton and the table says why.

Refuses to run on a machine without a GPU (a ``UsageError``) unless ``--interpret`` (interpret-mode
Pallas on CPU: a smoke run at tiny shapes only, used by the tests).
"""

from __future__ import annotations

import argparse
import json
import time

from .errors import UsageError
from .options import float_range, int_at_least
from .workload import HEAD_PRESETS, heads_arg, parse_heads, shapes_arg

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def _space_type(text: str) -> tuple[str, tuple]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"must look like NAME=V1,V2,...; got {text!r}")
    out = []
    for v in values.split(","):
        v = v.strip()
        low = v.lower()
        if low in ("true", "false"):
            out.append(low == "true")
        else:
            try:
                out.append(int(v))
            except ValueError:  # a named choice (m_scan=linear, gates_impl=pallas), checked by the kernel
                out.append(v)
    return name.strip(), tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax tune``."""
    p.add_argument("--heads", action="append", type=heads_arg, default=None, metavar="PRESET|NH,DHQK,DHV",
                   help=f"head shape, a preset ({', '.join(HEAD_PRESETS)}) or explicit sizes; repeatable "
                        "(default: all three presets)")
    p.add_argument("--shapes", type=shapes_arg, default=None, metavar="B,S;B,S",
                   help="(B, S) shapes for every head shape (default: each preset's benchmark shapes)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input and kernel dtype")
    p.add_argument("--grad-mode", nargs="+", default=["exact"], choices=["exact", "tfla"],
                   help="gradient conventions, one key each (default: exact)")
    p.add_argument("--objective", default="fwbw", choices=["fwbw", "fw"],
                   help="what the search minimises: forward + backward time (training) or forward only")
    p.add_argument("--budget-s", type=float_range(0.0, low_open=True), default=60.0,
                   help="seconds of search per key (compiles included; the heuristic start is always measured)")
    p.add_argument("--space", action="append", type=_space_type, default=None, metavar="NAME=V1,V2",
                   help="search only these options and values (repeatable; default: tuning.SEARCH_SPACE)")
    p.add_argument("--exclude", action="append", default=None, metavar="NAME",
                   help="leave this option at its heuristic value (repeatable), e.g. recompute_states_in_bw "
                        "to keep the memory of the recomputed states (default: none)")
    p.add_argument("--min-gain", type=float_range(0.0, 1.0), default=0.02,
                   help="relative speed-up a candidate needs to replace the best so far")
    p.add_argument("--reps", type=int_at_least(1), default=10, help="timed calls per candidate")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed calls after compilation")
    p.add_argument("--compile-threads", type=int_at_least(1), default=4,
                   help="candidates of one option compiled concurrently before they are timed")
    p.add_argument("--cache", default=None,
                   help="tuning table to update (default: $XLSTM_JAX_TUNING_CACHE or ~/.cache/xlstm_jax/tuning.json)")
    p.add_argument("--no-cache", action="store_true", help="do not write the user cache")
    p.add_argument("--json", default=None, help="also write the new entries to this file, in the shipped table's format (default: none)")
    p.add_argument("--trials-json", default=None, help="write every candidate and its time to this file (default: none)")
    p.add_argument("--report-modes", nargs="+", default=["fw", "fwbw"], choices=["fw", "fwbw"],
                   help="modes the heuristic start and the best are timed in at the end, for the table")
    p.add_argument("--families", nargs="+", default=["triton"], choices=["triton", "mosaic"],
                   help="kernel families to time per key: triton (always; the search runs on it) and "
                        "mosaic (chunkwise_mosaic with the best candidate's options it takes; the entry "
                        "records the faster family for chunkwise_auto) (default: triton)")
    p.add_argument("--interpret", action="store_true",
                   help="interpret-mode Pallas (CPU smoke runs at tiny shapes only; timings meaningless)")


def _check_space(space, flag: str = "--space") -> list:
    from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning
    from xlstm_jax.kernels.mlstm_chunkwise.pallas.heuristics import OVERRIDABLE

    known = set(OVERRIDABLE) | set(tuning.CALL_OPTION_DEFAULTS)
    for name, _ in space:
        if name not in known:
            raise UsageError(f"{flag}: unknown option {name!r}; known: {sorted(known)}")
    return list(space)


MOSAIC_FAMILY_BW = {"mosaic": "triton", "mosaic_bw": "mosaic", "mosaic_split": "mosaic_split"}
"""The ``family`` names of ``_Measurer.measure`` for ``chunkwise_mosaic`` and the ``bw_kernels`` each
times (the keys of the ``final`` times: ``mosaic_*``, ``mosaic_bw_*``, ``mosaic_split_*``)."""


class _Measurer:
    """Compiles and times candidates of one key (``overrides`` dicts of kernel options)."""

    def __init__(self, B, NH, S, DHQK, DHV, dtype, grad_mode, *, interpret, reps, warmup, threads):
        # candidates of the Triton family; ``measure(..., family="mosaic")`` times chunkwise_mosaic
        from .bench import _inputs

        self.shape = (B, NH, S, DHQK, DHV)
        self.dtype, self.grad_mode, self.interpret = dtype, grad_mode, interpret
        self.reps, self.warmup, self.threads = reps, warmup, threads
        sets = [_inputs(seed, B, NH, S, DHQK, DHV, dtype) for seed in (B * S, B * S + 1)]
        self.sets = {"fw": [x for x, _ in sets], "fwbw": [x + (dh,) for x, dh in sets]}
        self.compiled: dict = {}

    def _functions(self, overrides: dict, family: str = "triton", slots: int | None = None):
        import jax
        import jax.numpy as jnp

        from xlstm_jax.kernels.mlstm_chunkwise.pallas import mlstm_chunkwise_pallas

        gm, interp = self.grad_mode, self.interpret
        if family in MOSAIC_FAMILY_BW:  # the Mosaic family, by its bw_kernels
            from xlstm_jax.kernels.mlstm_chunkwise.mosaic import forward
            from xlstm_jax.kernels.mlstm_chunkwise.mosaic.auto import mosaic_options

            fn, overrides = forward.mlstm_chunkwise_mosaic, mosaic_options(overrides)
            overrides = {**overrides, "bw_kernels": MOSAIC_FAMILY_BW[family], **({} if slots is None else {"pipeline_slots": slots})}
        else:
            fn = mlstm_chunkwise_pallas

        def kernel(q, k, v, i, f):
            return fn(q, k, v, i, f, grad_mode=gm, tuned=False, interpret=interp, **overrides)

        def loss(q, k, v, i, f, dh):
            return jnp.sum(kernel(q, k, v, i, f).astype(jnp.float32) * dh.astype(jnp.float32))

        return {"fw": jax.jit(kernel), "fwbw": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))}

    @staticmethod
    def _key(overrides: dict, mode: str, family: str = "triton", slots: int | None = None):
        return ((mode, tuple(sorted(overrides.items()))) + (() if family == "triton" else (family,))
                + (() if slots is None else (("pipeline_slots", slots),)))

    def _compile(self, overrides: dict, mode: str, family: str = "triton", slots: int | None = None):
        key = self._key(overrides, mode, family, slots)
        if key not in self.compiled:
            try:
                fn = self._functions(overrides, family, slots)[mode]
                self.compiled[key] = ("ok", fn.lower(*self.sets[mode][0]).compile())
            except Exception as err:  # recorded, raised when the candidate is measured
                self.compiled[key] = ("error", err)
        return self.compiled[key]

    def precompile(self, candidates: list[dict], mode: str) -> None:
        """Compile ``candidates`` concurrently (``threads`` at a time)."""
        todo = [c for c in candidates if self._key(c, mode) not in self.compiled]
        if self.threads <= 1 or len(todo) <= 1:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.threads, len(todo))) as pool:
            list(pool.map(lambda c: self._compile(c, mode), todo))

    def measure(self, overrides: dict, mode: str, family: str = "triton", slots: int | None = None) -> float:
        """Median ms per call of ``mode`` ("fw" or "fwbw") with ``overrides`` (of the Triton family;
        ``family="mosaic"``: chunkwise_mosaic with those it takes and the Triton backward kernels,
        ``"mosaic_bw"``: the same with ``bw_kernels="mosaic"``, ``"mosaic_split"``: with
        ``bw_kernels="mosaic_split"``; ``slots``: the Mosaic family's ``pipeline_slots``, None its
        default); raises on failure."""
        from .timing import time_calls

        status, obj = self._compile(overrides, mode, family, slots)
        if status == "error":
            raise obj
        sets = self.sets[mode]
        t = time_calls(obj, sets, reps=self.reps, warmup=self.warmup)
        self.compiled.pop(self._key(overrides, mode, family, slots), None)  # free the executable
        return 1e3 * t.median_s


def run(args) -> int:
    """Tune every key; print a table; write the cache / JSON. Exit status 1 if a key failed."""
    heads_list = args.heads or [parse_heads(name) for name in HEAD_PRESETS]
    cases = [(h, B, S) for h in heads_list for B, S in (args.shapes or h.shapes)]
    space_arg = args.space

    import jax
    import jax.numpy as jnp

    from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning

    if jax.default_backend() != "gpu" and not args.interpret:
        raise UsageError(f"xlstm-jax tune measures compiled kernels and needs an NVIDIA GPU (the default "
                         f"backend is {jax.default_backend()!r}); use --interpret only for a smoke run")
    space_override = _check_space(space_arg) if space_arg else None
    excluded = {name for name, _ in _check_space([(n, ()) for n in (args.exclude or [])], "--exclude")}
    cache = None if args.no_cache else (args.cache or tuning.user_cache_path())
    if cache:  # refuse to merge into a broken table (--json is written anew)
        try:
            with open(cache) as fh:
                tuning.parse_table(fh.read(), cache)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise UsageError(f"--cache: cannot read the tuning table {cache}: {err}") from None
        except ValueError as err:
            raise UsageError(f"--cache: {err}; fix or remove it") from None

    dtype = jnp.dtype(DTYPES[args.dtype])
    kind = tuning.current_device_kind()
    print(f"xlstm-jax tune on {kind} ({jax.default_backend()}), jax {jax.__version__}, {dtype.name}, "
          f"objective {args.objective}, budget {args.budget_s:g} s per key"
          + (", INTERPRET MODE (timings meaningless)" if args.interpret else ""), flush=True)
    entries, rows, all_trials, failed = [], [], [], False
    for heads, B, S in cases:
        NH, DHQK, DHV = heads.NH, heads.DHQK, heads.DHV
        for gm in args.grad_mode:
            key = tuning.TuningKey(kind, NH, DHQK, DHV, dtype.name, gm, B, S)
            print(f"\n[{key.label()}]", flush=True)
            space = [(n, v) for n, v in (space_override or tuning.search_space(S, DHQK, DHV, dtype))
                     if n not in excluded]
            t0 = time.perf_counter()
            try:
                m = _Measurer(B, NH, S, DHQK, DHV, dtype, gm, interpret=args.interpret, reps=args.reps,
                              warmup=args.warmup, threads=args.compile_threads)
                seeds = [e["params"] for e in entries if (e["NH"], e["DHQK"], e["DHV"], e["grad_mode"]) ==
                         (NH, DHQK, DHV, gm) and e["params"]]  # the best of this head shape's other rows
                res = _search(m, space, key, args, dtype, seeds)
                final = {}
                for mode in args.report_modes:  # the default and the best, for the table
                    final[f"{mode}_default"] = (res.default_ms if mode == args.objective
                                                else _try(m.measure, {}, mode))
                    final[mode] = (res.best_ms if mode == args.objective else
                                   final[f"{mode}_default"] if not res.best else _try(m.measure, res.best, mode))
                family, family_note, mosaic_bw, mosaic_slots = _family_choice(m, res, final, args, dtype)
                params = tuning.minimal_overrides(S, DHQK, DHV, dtype, res.best)
                entry = tuning.make_entry(key, params, objective=args.objective,
                                          ms={k: (None if v is None else round(v, 4)) for k, v in final.items()},
                                          extra={"jax": jax.__version__, "budget_s": args.budget_s,
                                                 "candidates": sum(t.ms is not None for t in res.trials),
                                                 "failed": sum(t.error is not None for t in res.trials),
                                                 **({"family": family, "family_note": family_note}
                                                    if "mosaic" in args.families else {}),
                                                 **({"mosaic_bw_kernels": mosaic_bw, "mosaic_pipeline_slots": mosaic_slots}
                                                    if family == "mosaic" else {})})
                entries.append(entry)
                shown = {**params, **({"family": family} if family != "triton" else {})}
                rows.append((key, shown, final, time.perf_counter() - t0))
                all_trials.append({"key": entry_key_dict(key), "trials": [
                    {"overrides": t.overrides, "ms": t.ms, "skipped": t.skipped, "error": t.error}
                    for t in res.trials]})
                _write(entries, cache, args.json, all_trials, args.trials_json)  # a later crash keeps these
                del m
            except Exception as err:  # this key failed (its default did not run): go on with the rest
                failed = True
                print(f"  FAILED: {type(err).__name__}: {' '.join(str(err).split())[:300]}", flush=True)
                rows.append((key, None, {"error": f"{type(err).__name__}: {err}"[:300]}, time.perf_counter() - t0))

    _print_table(rows)
    if entries and cache:
        print(f"cache: {len(entries)} entries written to {cache}")
    if args.json:
        _write(entries, None, args.json, all_trials, args.trials_json)
        print(f"json: {args.json} (format of tuned_defaults.json)")
    return 1 if failed else 0


def _family_choice(m: _Measurer, res, final: dict, args, dtype) -> tuple[str, str, str, int | None]:
    """("mosaic" or "triton", a note, the Mosaic ``bw_kernels``, its ``pipeline_slots``) for one key:
    with ``--families ... mosaic``, chunkwise_mosaic is timed with the best candidate, with the
    Triton backward kernels and (when the objective includes the backward pass) with
    ``bw_kernels="mosaic"`` and ``"mosaic_split"`` (times in ``final`` as ``mosaic_fw`` /
    ``mosaic_fwbw`` / ``mosaic_bw_fwbw`` / ``mosaic_split_fwbw``), all with the default
    ``pipeline_slots``; the fastest of them once more with the other slot count
    (``mosaic_slots<n>_<objective>``); the fastest variant wins if it is ``--min-gain`` faster than the
    Triton family in the objective."""
    if "mosaic" not in args.families:
        return "triton", "", "triton", None
    from xlstm_jax.kernels.mlstm_chunkwise.mosaic.forward import MOSAIC_DTYPES
    from xlstm_jax.kernels.pallas import _mosaic

    why = _mosaic.unavailable_reason(bool(args.interpret))
    if why is None and dtype not in MOSAIC_DTYPES:
        why = f"no Mosaic kernel for {dtype.name}"
    if why is not None:
        print(f"  mosaic: not timed ({why})", flush=True)
        return "triton", f"mosaic not timed: {why}"[:200], "triton", None
    for mode in dict.fromkeys([args.objective, *args.report_modes]):
        final[f"mosaic_{mode}"] = _try(m.measure, res.best, mode, "mosaic")
        print(f"  mosaic {mode}: {_fmt(final[f'mosaic_{mode}'])} ms (triton {_fmt(final.get(mode))})", flush=True)
        if mode == "fwbw":  # the forward pass is the same with either backward
            final["mosaic_bw_fwbw"] = _try(m.measure, res.best, mode, "mosaic_bw")
            print(f"  mosaic, bw_kernels=mosaic, fwbw: {_fmt(final['mosaic_bw_fwbw'])} ms", flush=True)
            final["mosaic_split_fwbw"] = _try(m.measure, res.best, mode, "mosaic_split")
            print(f"  mosaic, bw_kernels=mosaic_split, fwbw: {_fmt(final['mosaic_split_fwbw'])} ms", flush=True)
    bw = "triton"
    mos = final[f"mosaic_{args.objective}"]
    if args.objective == "fwbw":
        for key, name in (("mosaic_bw_fwbw", "mosaic"), ("mosaic_split_fwbw", "mosaic_split")):
            alt = final.get(key)
            if alt is not None and (mos is None or alt < mos):
                mos, bw = alt, name
    if mos is None:
        return "triton", "mosaic failed (see the log)", "triton", None
    from xlstm_jax.kernels.mlstm_chunkwise.mosaic.forward import default_pipeline_slots_for

    _, _, _, DHQK, DHV = m.shape
    slots = default_pipeline_slots_for(DHQK, DHV)
    other = 3 - slots  # the other of (1, 2)
    fam = next(f for f, b in MOSAIC_FAMILY_BW.items() if b == bw)
    alt = final[f"mosaic_slots{other}_{args.objective}"] = _try(m.measure, res.best, args.objective, fam, other)
    print(f"  mosaic, bw_kernels={bw}, pipeline_slots={other}, {args.objective}: {_fmt(alt)} ms "
          f"(pipeline_slots={slots}: {_fmt(mos)})", flush=True)
    if alt is not None and alt < mos:
        mos, slots = alt, other
    what = "mosaic (" + (f"bw_kernels={bw}, " if bw != "triton" else "") + f"pipeline_slots={slots})"
    if mos < res.best_ms * (1.0 - args.min_gain):
        return "mosaic", f"{what} {mos:.3f} ms < triton {res.best_ms:.3f} ms ({args.objective})", bw, slots
    return ("triton", f"{what} {mos:.3f} ms >= (1 - min_gain) x triton {res.best_ms:.3f} ms ({args.objective})",
            "triton", None)


def _write(entries: list, cache: str | None, json_path: str | None, trials: list, trials_path: str | None) -> None:
    """Merge ``entries`` into the cache; write them (only them) to ``json_path``; the trials."""
    from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning

    if cache and entries:
        tuning.write_table(cache, entries, merge=True)
    if json_path:
        tuning.write_table(json_path, entries, merge=False)
    if trials_path:
        with open(trials_path, "w") as fh:
            json.dump(trials, fh, indent=1, default=str)


def entry_key_dict(key) -> dict:
    """A key as a plain dict (for the trials file)."""
    import dataclasses

    return dataclasses.asdict(key)


def _try(fn, *a):
    try:
        return fn(*a)
    except Exception as err:  # reported in the table as missing
        print(f"  (timing failed: {type(err).__name__}: {' '.join(str(err).split())[:200]})", flush=True)
        return None


def _search(m: _Measurer, space, key, args, dtype, seeds):
    from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning

    def measure(overrides):
        return m.measure(overrides, args.objective)

    def log(line):
        print(line, flush=True)

    def on_option(best, name, candidates):  # compile one option's candidates together, then time them
        m.precompile(list(candidates), args.objective)

    return tuning.coordinate_descent(measure, S=key.S, DHQK=key.DHQK, DHV=key.DHV, dtype=dtype, space=space,
                                     budget_s=args.budget_s, min_gain=args.min_gain, log=log,
                                     on_option=on_option, seeds=seeds)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_table(rows) -> None:
    print(f"\n{'key':<58}{'fw ms':>16}{'fwbw ms':>18}{'s':>6}  tuned params (vs heuristics)")
    for key, params, final, secs in rows:
        label = key.label()
        if params is None:
            print(f"{label[:57]:<58}  FAILED {final.get('error', '')[:100]}")
            continue
        fw = f"{_fmt(final.get('fw_default'))}->{_fmt(final.get('fw'))}"
        fwbw = f"{_fmt(final.get('fwbw_default'))}->{_fmt(final.get('fwbw'))}"
        ptxt = ",".join(f"{k}={v}" for k, v in params.items()) or "(heuristics)"
        if final.get("mosaic_fwbw") is not None or final.get("mosaic_fw") is not None:
            ptxt += f"  [mosaic fw {_fmt(final.get('mosaic_fw'))}, fwbw {_fmt(final.get('mosaic_fwbw'))}]"
        print(f"{label[:57]:<58}{fw:>16}{fwbw:>18}{secs:6.0f}  {ptxt}")
