"""Summarise a ``jax.profiler`` trace by op family: milliseconds per step and share of device time.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes ``perfetto_trace.json.gz`` (Chrome
trace-event JSON: ``{"traceEvents": [...]}``) under ``dir/plugins/profile/<run>/``. This module
reads it without TensorBoard or xprof:

1. Device events: complete events (``"ph": "X"`` with a ``dur`` in microseconds) of the processes
   named ``/device:...`` (GPU, TPU). Of such a process, only its ``Stream ...`` threads are read if
   it has any (the kernels as they ran; the ``XLA Ops`` / ``XLA Modules`` lines repeat them at
   coarser grain), else its ``XLA Ops`` threads, else all its threads. A trace without device
   processes (a CPU run) contributes the host events that carry an ``hlo_op`` argument (the XLA
   CPU runtime's thunks).
2. Each event is put in the first family (``FAMILIES``) whose rule matches, and in the first part
   of the step (``PARTS``, a finer split by where in the model the time goes). Rules read the
   event's kernel name and ``hlo_op`` argument, and its scope: the ``op_name`` metadata of its HLO
   instruction or a ``long_name`` / ``tf_op`` / ``scope`` argument of the event. The instruction is
   found by ``hlo_op``, or by the kernel name (``normalise_name``: under XLA's command buffers every
   event's ``hlo_op`` is ``command_buffer_N``, but a kernel is named after its instruction with
   ``.`` / ``-`` as ``_``); a fusion's scope is the ``op_name`` most of its fused instructions carry
   (``instruction_scopes``). The HLO comes from the compiled module's text
   (``hlo_instructions_from_text``; ``bench-train --profile`` writes it beside the trace,
   ``write_hlo_text``) or from the HLO proto that the profiler stores in the trace's ``.xplane.pb``
   (``hlo_from_xplane``). Scopes carry JAX's name stack: the trainer wraps the optimizer update in
   ``jax.named_scope("optimizer")`` and the loss in ``"loss"``, the model the cell in
   ``"mlstm_cell"``; Flax adds module names (``norm_mlstm``, ``mh_norm``, ``ffn``, ...).
3. Totals are divided by the number of profiled steps.

``python -m xlstm_jax.tools.trace_summary DIR --steps N [--hlo FILE]`` prints the tables (``main``).

The device time summed here counts concurrent streams twice; on one stream it is the busy time,
which is less than the step's wall time by the device's idle gaps (``summarise`` reports both when
the step time is given).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Any, Iterable

# (family, where the pattern is looked for, pattern); the first match wins
_NAME = "name"  # kernel name and hlo_op
_SCOPE = "scope"  # op_name / long_name of the event
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("collectives", _NAME, r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|allgather|reduce-scatter|"
                           r"reduce_scatter|all-to-all|all_to_all|collective-permute|collective_permute"),
    ("mLSTM kernels", _NAME, r"mlstm"),
    ("mLSTM kernels", _SCOPE, r"mlstm_cell|pallas_call"),
    ("matmul/gemm", _NAME, r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|dot|sm90_|sm80_|hgemm|sgemm"),
    ("optimizer", _SCOPE, r"optimizer"),
    ("copies/transposes", _NAME, r"copy|transpose|memcpy|memset|concatenate|dynamic-update-slice|dynamic_update_slice"),
    ("norms", _SCOPE, r"norm"),
    ("element-wise fusions", _NAME, r"fusion|loop_|elementwise|convert|broadcast|reduce|add|multiply|select"),
)
FAMILY_ORDER = (
    "mLSTM kernels", "matmul/gemm", "element-wise fusions", "norms", "optimizer", "copies/transposes",
    "collectives", "other",
)

# The finer split ("parts": where in the step the time goes), first match wins. Each rule reads the
# event's family (above), its kernel name / hlo_op, and its scope; a fusion's scope is the op_name
# most of its fused instructions carry (``instruction_scopes``), so e.g. the gate-gradient glue the
# backend fuses with a transpose counts as mLSTM cell glue, not as a transpose.
_FAMILY = "family"
PARTS: tuple[tuple[str, str, str], ...] = (
    ("collectives", _FAMILY, r"^collectives$"),
    ("mLSTM kernels (Pallas/Triton)", _NAME, r"mlstm|pallas"),
    ("gemm: mLSTM layer projections", _SCOPE + "+gemm", r"/mlstm/"),
    ("gemm: feed-forward", _SCOPE + "+gemm", r"/ffn/"),
    ("gemm: LM head / loss", _SCOPE + "+gemm", r"lm_head|attend|/loss"),
    ("gemm (no scope: command buffers)", _FAMILY, r"^matmul/gemm$"),
    ("optimizer", _SCOPE, r"optimizer"),
    ("mLSTM cell glue (XLA ops around the kernels)", _SCOPE, r"mlstm_cell"),
    ("loss / LM head element-wise", _SCOPE,
     r"(^|[/(])loss([/)]|$)|log_softmax|logsumexp|lm_head|soft_cap|/attend|out_norm|"
     r"xlstmlmmodel\)?/(mul|tanh|div|convert_element_type)$"),
    ("embedding (lookup, gradient)", _SCOPE, r"/embedding"),
    ("norms (RMS, multi-head)", _SCOPE, r"norm"),
    ("mLSTM layer layout (transposes, concat/split)", _SCOPE, r"/mlstm/.*(transpose|split|concatenate|reshape)"),
    ("mLSTM layer element-wise (gates, output gate)", _SCOPE, r"/mlstm/"),
    ("feed-forward element-wise (SiLU, product)", _SCOPE, r"/ffn/"),
    ("residual stream (adds, casts)", _SCOPE, r"blocks(_\d+)?/(add|convert_element_type|add_any)$"),
    ("block parameters: split, gradients stacked (unroll_blocks)", _SCOPE,
     r"jvp\(\)\)?/(split|squeeze|slice|concatenate|pad|add_any)$"),
    ("layer scan (stacked buffers: zero init, slices)", _SCOPE,
     r"broadcast_in_dim$|dynamic_update_slice|dynamic_slice|dynamic_update_index|dynamic_index"),
    ("weight casts", _SCOPE, r"convert_element_type"),
    ("copies without scope (memcpy, memset)", _FAMILY, r"^copies/transposes$"),
    ("element-wise without scope", _FAMILY, r"^element-wise fusions$"),
)
PART_OTHER = "other"


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    """One kernel / op execution on a device: its name, hlo_op (or ""), scope (or ""), duration (us)."""

    name: str
    hlo_op: str
    scope: str
    dur_us: float


def find_trace_file(trace_dir: str) -> str:
    """The newest ``perfetto_trace.json.gz`` (else ``*.trace.json.gz``) under ``trace_dir``;
    ``FileNotFoundError`` naming the directory if there is none."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz", "perfetto_trace.json", "*.trace.json"):
        hits = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", pattern))
        hits += glob.glob(os.path.join(trace_dir, pattern))
        if hits:
            return max(hits, key=os.path.getmtime)
    raise FileNotFoundError(f"no trace file (perfetto_trace.json.gz) under {trace_dir!r}/plugins/profile/*/")


def load_trace(path: str) -> list[dict[str, Any]]:
    """The trace events of a Chrome trace-event JSON file (gzipped or not; an object with
    ``traceEvents`` or a bare list). ``ValueError`` if it is neither."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path!r} is not a Chrome trace-event file (no traceEvents list)")
    return [e for e in events if isinstance(e, dict)]


def op_scopes_from_hlo(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} of an HLO module's text (``compiled.as_text()``)."""
    out: dict[str, str] = {}
    pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def device_events(events: Iterable[dict[str, Any]], hlo_scopes: dict[str, str] | None = None) -> list[DeviceEvent]:
    """The device events of a trace (see the module docstring, step 1), with their scopes."""
    events = list(events)
    hlo_scopes = hlo_scopes or {}
    proc_names: dict[Any, str] = {}
    thread_names: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = str((e.get("args") or {}).get("name", ""))
        if e.get("name") == "process_name":
            proc_names[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            thread_names[(e.get("pid"), e.get("tid"))] = name
    device_pids = {pid for pid, n in proc_names.items() if "/device:" in n.lower() or n.lower().startswith("/gpu")}
    keep: set[tuple[Any, Any]] = set()
    for pid in device_pids:
        threads = {k: n for k, n in thread_names.items() if k[0] == pid}
        streams = {k for k, n in threads.items() if n.lower().startswith("stream")}
        ops = {k for k, n in threads.items() if "xla ops" in n.lower()}
        keep |= streams or ops or set(threads) or {(pid, None)}
    picked = []
    for e in events:
        if e.get("ph") != "X" or not isinstance(e.get("dur"), (int, float)):
            continue
        args = e.get("args") or {}
        hlo_op = str(args.get("hlo_op", ""))
        if device_pids:
            key = (e.get("pid"), e.get("tid"))
            if e.get("pid") not in device_pids or (key not in keep and (e.get("pid"), None) not in keep):
                continue
        elif not hlo_op:
            continue
        picked.append(e)
    by_norm = {normalise_name(k): v for k, v in hlo_scopes.items()}
    out = []
    for e in _leaves(picked):
        args = e.get("args") or {}
        hlo_op = str(args.get("hlo_op", ""))
        name = str(e.get("name", ""))
        scope = (
            hlo_scopes.get(hlo_op) or by_norm.get(normalise_name(hlo_op)) or by_norm.get(normalise_name(name))
            or str(args.get("long_name") or args.get("tf_op") or args.get("scope") or "")
        )
        out.append(DeviceEvent(name, hlo_op, scope, float(e["dur"])))
    return out


def normalise_name(name: str) -> str:
    """An HLO instruction name as a GPU kernel is named after it: ``.`` and ``-`` become ``_``
    (instruction ``loop_add_fusion.6`` runs as kernel ``loop_add_fusion_6``). Under XLA's command
    buffers (CUDA graphs) the events' ``hlo_op`` is ``command_buffer_N``, so the kernel name is the
    only link from an event to its instruction."""
    return re.sub(r"[.\-]", "_", name)


def _leaves(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that contain no other event of their thread (a CPU trace nests the ops of a
    ``while`` loop inside the loop's event). Containment means the next event of the thread starts
    and ends inside this one: GPU kernels do not nest, but consecutive kernels of one stream often
    overlap by a fraction of a microsecond in the trace's clock, and such a partial overlap must not
    drop either kernel (it once dropped 60% of a training step's device time)."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e.get("ts", 0.0)), -float(e["dur"])))
        for idx, e in enumerate(evs):
            end = float(e.get("ts", 0.0)) + float(e["dur"])
            nxt = evs[idx + 1] if idx + 1 < len(evs) else None
            contains_next = (
                nxt is not None and float(e["dur"]) > 0.0
                and float(nxt.get("ts", 0.0)) + float(nxt["dur"]) <= end
            )
            if not contains_next:
                out.append(e)
    return out


def classify(event: DeviceEvent) -> str:
    """The family (``FAMILY_ORDER``) of one device event."""
    name_text = f"{event.name} {event.hlo_op}".lower()
    scope_text = event.scope.lower()
    for family, where, pattern in FAMILIES:
        if re.search(pattern, name_text if where == _NAME else scope_text):
            return family
    return "other"


def classify_part(event: DeviceEvent, family: str | None = None) -> str:
    """The part (``PARTS``) of one device event; ``family``: its ``classify`` result if known."""
    family = classify(event) if family is None else family
    scope_text = event.scope.lower()
    for part, where, pattern in PARTS:
        if where == _FAMILY:
            hit = re.search(pattern, family)
        elif where == _NAME:
            hit = re.search(pattern, f"{event.name} {event.hlo_op}".lower())
        elif where == _SCOPE + "+gemm":
            hit = family == "matmul/gemm" and re.search(pattern, scope_text)
        else:
            hit = family != "matmul/gemm" and re.search(pattern, scope_text)
        if hit:
            return part
    return PART_OTHER


def summarise(
    events: Iterable[DeviceEvent], steps: int, step_ms: float | None = None, top: int = 8
) -> dict[str, Any]:
    """Per family: ms per step, share of device time, events per step; also the busy ms per step,
    the ``top`` kernels by time, and (with ``step_ms``, the measured step time) the idle share."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    totals = {f: 0.0 for f in FAMILY_ORDER}
    counts = {f: 0 for f in FAMILY_ORDER}
    kernels: dict[tuple[str, str], float] = {}
    part_totals: dict[str, float] = {}
    part_counts: dict[str, int] = {}
    for ev in events:
        fam = classify(ev)
        totals[fam] += ev.dur_us
        counts[fam] += 1
        kernels[(ev.name, fam)] = kernels.get((ev.name, fam), 0.0) + ev.dur_us
        part = classify_part(ev, fam)
        part_totals[part] = part_totals.get(part, 0.0) + ev.dur_us
        part_counts[part] = part_counts.get(part, 0) + 1
    busy_us = sum(totals.values())
    rows = [
        {
            "family": f, "ms_per_step": totals[f] / 1e3 / steps,
            "share": totals[f] / busy_us if busy_us else 0.0, "events_per_step": counts[f] / steps,
        }
        for f in FAMILY_ORDER
    ]
    top_rows = [
        {"kernel": n, "family": fam, "ms_per_step": t / 1e3 / steps}
        for (n, fam), t in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    ]
    part_rows = [
        {
            "part": p, "ms_per_step": t / 1e3 / steps, "share": t / busy_us if busy_us else 0.0,
            "events_per_step": part_counts[p] / steps,
        }
        for p, t in sorted(part_totals.items(), key=lambda kv: -kv[1])
    ]
    out = {
        "steps": steps, "busy_ms_per_step": busy_us / 1e3 / steps, "families": rows, "parts": part_rows,
        "top_kernels": top_rows,
    }
    if step_ms is not None:
        out["step_ms"] = step_ms
        out["idle_share"] = max(0.0, 1.0 - out["busy_ms_per_step"] / step_ms) if step_ms > 0 else None
    return out


_PALLAS_KERNEL = re.compile(r"mlstm|pallas|triton|mosaic", re.IGNORECASE)


def kernel_breakdown(events: Iterable[DeviceEvent], calls: int) -> dict[str, Any]:
    """Per kernel name (a Pallas kernel's name, or an XLA fusion/instruction name): ms per call,
    launches per call, share of the device-busy time, kind ``pallas`` or ``xla``; sorted by time.
    Also the busy ms per call in total and split by kind, and the launches per call."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int; got {calls!r}")
    by_name: dict[str, list[float]] = {}
    for ev in events:
        acc = by_name.setdefault(ev.name, [0.0, 0])
        acc[0] += ev.dur_us
        acc[1] += 1
    busy_us = sum(t for t, _ in by_name.values())
    rows = []
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        kind = "pallas" if _PALLAS_KERNEL.search(name) else "xla"
        rows.append({"name": name, "kind": kind, "ms": t / 1e3 / calls, "count": n / calls,
                     "share": t / busy_us if busy_us else 0.0})
    return {
        "calls": calls, "busy_ms": busy_us / 1e3 / calls,
        "pallas_ms": sum(r["ms"] for r in rows if r["kind"] == "pallas"),
        "xla_ms": sum(r["ms"] for r in rows if r["kind"] == "xla"),
        "launches": sum(r["count"] for r in rows), "kernels": rows,
    }


def summarise_dir(
    trace_dir: str, steps: int, hlo_text: str | None = None, step_ms: float | None = None, top: int = 8
) -> dict[str, Any]:
    """``summarise`` of the trace under ``trace_dir`` (``find_trace_file``). The scopes of the
    instructions come from ``hlo_text`` (the compiled module's text) if given, else from
    ``trace_dir/module.hlo.txt[.gz]`` (``bench-train --profile`` writes it), else from the HLO
    proto that ``jax.profiler`` stores in the ``*.xplane.pb`` beside the trace (``hlo_from_xplane``).
    Adds ``trace_file`` and ``hlo_source`` (where the scopes came from, or None)."""
    path = find_trace_file(trace_dir)
    events = load_trace(path)
    source = None
    if hlo_text:
        source = "given"
        instrs = hlo_instructions_from_text(hlo_text)
    else:
        instrs = None
        for name in (HLO_FILE_NAME, HLO_FILE_NAME + ".gz"):
            f = os.path.join(trace_dir, name)
            if os.path.exists(f):
                instrs, source = hlo_instructions_from_text(read_text(f)), f
                break
        if instrs is None:
            xplanes = glob.glob(os.path.join(os.path.dirname(path), "*.xplane.pb"))
            if xplanes:
                instrs = hlo_from_xplane(xplanes[0], _main_module(events))
                source = xplanes[0] if instrs else None
    scopes = instruction_scopes(instrs) if instrs else None
    out = summarise(device_events(events, scopes), steps, step_ms, top=top)
    out["trace_file"] = path
    out["hlo_source"] = source
    return out


def _main_module(events: list[dict[str, Any]]) -> str | None:
    """The ``hlo_module`` most device events name (e.g. ``jit__step``), or None."""
    counts: dict[str, int] = {}
    for e in events:
        mod = (e.get("args") or {}).get("hlo_module") if e.get("ph") == "X" else None
        if mod:
            counts[str(mod)] = counts.get(str(mod), 0) + 1
    return max(counts, key=counts.get) if counts else None


# ------------------------------------------------------------------ HLO instructions and their scopes
HLO_FILE_NAME = "module.hlo.txt"


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    """One HLO instruction: name, opcode, shape (text), ``op_name`` metadata (or ""), and the names
    of the computations it calls (a fusion's fused computation)."""

    name: str
    opcode: str
    shape: str
    op_name: str
    calls: tuple[str, ...] = ()


def read_text(path: str) -> str:
    """The text of a file, gunzipped when its name ends in ``.gz``."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def write_hlo_text(directory: str, hlo_text: str, gzip_above: int = 1 << 20) -> str:
    """Write a compiled module's text as ``directory/module.hlo.txt`` (gzipped, ``.gz``, when longer
    than ``gzip_above`` characters) so that its trace can be summarised later with scopes; returns
    the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HLO_FILE_NAME)
    if len(hlo_text) > gzip_above:
        path += ".gz"
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(hlo_text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(hlo_text)
    return path


_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_CALLS_RE = re.compile(r"\bcalls=%?([\w.\-]+)")
_OPNAME_RE = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')


def hlo_instructions_from_text(hlo_text: str) -> dict[str, dict[str, list[HloInstruction]]]:
    """{computation name: [instructions]} of an HLO module's text (``compiled.as_text()``),
    wrapped as {"": ...} (one module)."""
    comps: dict[str, list[HloInstruction]] = {}
    current: list[HloInstruction] | None = None
    for line in hlo_text.splitlines():
        m = _INSTR_RE.match(line)
        if m:
            if current is None:  # instructions before any computation header: one unnamed computation
                current = comps.setdefault("", [])
            op = _OPNAME_RE.search(line)
            calls = tuple(_CALLS_RE.findall(line))
            current.append(HloInstruction(m.group(1), m.group(3), m.group(2), op.group(1) if op else "", calls))
            continue
        c = _COMP_RE.match(line)
        if c:
            current = comps.setdefault(c.group(1), [])
    return {"": comps}


# op_names that say where a value is stored, not what is computed: left out of a fusion's vote (a
# fusion that writes its result into a scan's stacked buffer is named after what it computes)
_BOOKKEEPING = re.compile(r"(dynamic_update_slice|dynamic_slice|dynamic_update_index_in_dim|dynamic_index_in_dim|"
                          r"broadcast_in_dim|squeeze|reshape|bitcast)$")


def instruction_scopes(modules: dict[str, dict[str, list[HloInstruction]]]) -> dict[str, str]:
    """{instruction name: scope} of every instruction: its own ``op_name``, or for an instruction
    that calls a computation (a fusion) the ``op_name`` most of that computation's instructions
    carry (ties: the instruction's own; op_names of storage such as ``dynamic_update_slice`` or
    ``broadcast_in_dim`` do not vote). The first module's entry wins a name two modules share."""
    out: dict[str, str] = {}
    for comps in modules.values():
        for instrs in comps.values():
            for ins in instrs:
                scope = ins.op_name
                if ins.calls:
                    counts: dict[str, int] = {}
                    for called in ins.calls:
                        for sub in comps.get(called, ()):
                            if sub.op_name and not _BOOKKEEPING.search(sub.op_name):
                                counts[sub.op_name] = counts.get(sub.op_name, 0) + 1
                    if counts:
                        best = max(counts.values())
                        if counts.get(scope, 0) < best:
                            scope = max(counts, key=counts.get)
                if scope:
                    out.setdefault(ins.name, scope)
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message's wire format (no schema needed)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, wire, value


def _ints(value, wire) -> list[int]:
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        x, i = _varint(value, i)
        out.append(x)
    return out


_ELEMENT_TYPES = {1: "pred", 2: "s8", 3: "s16", 4: "s32", 5: "s64", 6: "u8", 7: "u16", 8: "u32", 9: "u64",
                  10: "f16", 11: "f32", 12: "f64", 16: "bf16", 15: "c64", 18: "c128"}


def _shape_text(buf: bytes) -> str:
    element, dims, parts = None, [], []
    for f, w, v in _fields(buf):
        if f == 2:
            element = v
        elif f == 3:
            dims += _ints(v, w)
        elif f == 4:
            parts.append(_shape_text(v))
    if parts:
        return "(" + ", ".join(parts) + ")"
    return f"{_ELEMENT_TYPES.get(element, element)}[{','.join(map(str, dims))}]"


def _hlo_module_from_proto(buf: bytes) -> dict[str, list[HloInstruction]]:
    # HloModuleProto: computations = 3; HloComputationProto: name 1, instructions 2, id 5;
    # HloInstructionProto: name 1, opcode 2, shape 3, metadata 7 (OpMetadata: op_name 2),
    # called_computation_ids 38
    raw = []
    for f, _w, v in _fields(buf):
        if f != 3:
            continue
        name, cid, instrs = "", None, []
        for cf, cw, cv in _fields(v):
            if cf == 1:
                name = bytes(cv).decode("utf-8", "replace")
            elif cf == 5:
                cid = cv
            elif cf == 2:
                d: dict[str, Any] = {"calls": []}
                for inf, inw, inv in _fields(cv):
                    if inf == 1:
                        d["name"] = bytes(inv).decode("utf-8", "replace")
                    elif inf == 2:
                        d["opcode"] = bytes(inv).decode("utf-8", "replace")
                    elif inf == 3:
                        d["shape"] = _shape_text(inv)
                    elif inf == 7:
                        for mf, _mw, mv in _fields(inv):
                            if mf == 2:
                                d["op_name"] = bytes(mv).decode("utf-8", "replace")
                    elif inf == 38:
                        d["calls"] += _ints(inv, inw)
                instrs.append(d)
        raw.append((name, cid, instrs))
    names = {cid: name for name, cid, _ in raw}
    return {
        name: [
            HloInstruction(d.get("name", ""), d.get("opcode", ""), d.get("shape", ""), d.get("op_name", ""),
                           tuple(names.get(c, str(c)) for c in d["calls"]))
            for d in instrs
        ]
        for name, _cid, instrs in raw
    }


def hlo_from_xplane(path: str, module: str | None = None) -> dict[str, dict[str, list[HloInstruction]]]:
    """The HLO modules that ``jax.profiler`` stored in an ``.xplane.pb`` (the ``/host:metadata``
    plane holds each compiled module's ``HloProto`` as the stat "Hlo Proto"), read from the
    protobuf wire format without XLA's schemas: {module name: {computation: [instructions]}}.
    ``module`` (e.g. ``jit__step``): keep the modules named so (``jit__step(2680)``) first. Empty
    if the file holds none."""
    with open(path, "rb") as fh:
        buf = fh.read()
    found: dict[str, dict[str, list[HloInstruction]]] = {}
    for f, _w, plane in _fields(buf):
        if f != 1:  # XSpace.planes
            continue
        plane_fields = list(_fields(plane))
        if not any(pf == 2 and bytes(pv) == b"/host:metadata" for pf, _pw, pv in plane_fields):
            continue
        for pf, _pw, pv in plane_fields:
            if pf != 4:  # XPlane.event_metadata: map<int64, XEventMetadata>
                continue
            entry = {k: v for k, _w2, v in _fields(pv)}
            if 2 not in entry:
                continue
            meta = list(_fields(entry[2]))
            name = next((bytes(v).decode("utf-8", "replace") for k, _w2, v in meta if k == 2), "")
            for k, _w2, v in meta:
                if k != 5:  # XEventMetadata.stats
                    continue
                stat = {sk: sv for sk, _sw, sv in _fields(v)}
                if not isinstance(stat.get(6), (bytes, memoryview)):  # XStat.bytes_value
                    continue
                try:
                    proto = {hk: hv for hk, _hw, hv in _fields(stat[6])}
                    if isinstance(proto.get(1), (bytes, memoryview)):  # HloProto.hlo_module
                        comps = _hlo_module_from_proto(proto[1])
                        if comps:
                            found[name] = comps
                except (ValueError, IndexError):
                    continue  # a bytes stat that is not an HloProto
    if module:
        first = {k: v for k, v in found.items() if k.split("(")[0] == module}
        found = {**first, **{k: v for k, v in found.items() if k not in first}}
    return found


def format_table(summary: dict[str, Any]) -> str:
    """The family table (and the top kernels) of a ``summarise`` result, as text."""
    lines = [f"{'op family':<22} {'ms/step':>9} {'share':>7} {'events/step':>12}"]
    for r in summary["families"]:
        lines.append(f"{r['family']:<22} {r['ms_per_step']:>9.2f} {r['share']:>7.1%} {r['events_per_step']:>12.1f}")
    busy = f"{'device busy':<22} {summary['busy_ms_per_step']:>9.2f}"
    if summary.get("step_ms") is not None:
        busy += f"   (step {summary['step_ms']:.2f} ms"
        if summary.get("idle_share") is not None:
            busy += f", idle {summary['idle_share']:.1%}"
        busy += ")"
    lines.append(busy)
    if summary.get("parts"):
        lines.append(f"{'part of the step':<50} {'ms/step':>9} {'share':>7} {'events/step':>12}")
        for r in summary["parts"]:
            lines.append(f"{r['part'][:50]:<50} {r['ms_per_step']:>9.2f} {r['share']:>7.1%} {r['events_per_step']:>12.1f}")
    if summary["top_kernels"]:
        lines.append("top kernels:")
        for r in summary["top_kernels"]:
            lines.append(f"  {r['ms_per_step']:>8.2f} ms  [{r['family']}]  {r['kernel'][:90]}")
    return "\n".join(lines)


def format_comparison(before: dict[str, Any], after: dict[str, Any], labels: tuple[str, str] = ("before", "after")) -> str:
    """Two ``summarise`` results side by side as Markdown tables (per family, then per part): ms per
    step and share of each, and the change in ms; the device busy time and step time last."""
    b_lab, a_lab = labels
    out = []
    for key, title in (("families", "op family"), ("parts", "part of the step")):
        rows_b = {r["family" if key == "families" else "part"]: r for r in before.get(key, [])}
        rows_a = {r["family" if key == "families" else "part"]: r for r in after.get(key, [])}
        names = list(rows_b) + [n for n in rows_a if n not in rows_b]
        out.append(f"| {title} | {b_lab} ms/step | share | {a_lab} ms/step | share | change ms |")
        out.append("|---|---|---|---|---|---|")
        for n in names:
            b, a = rows_b.get(n), rows_a.get(n)
            if not ((b and b["ms_per_step"] > 0) or (a and a["ms_per_step"] > 0)):
                continue
            bm, am = (b["ms_per_step"] if b else 0.0), (a["ms_per_step"] if a else 0.0)
            bs, as_ = (b["share"] if b else 0.0), (a["share"] if a else 0.0)
            out.append(f"| {n} | {bm:.2f} | {bs:.1%} | {am:.2f} | {as_:.1%} | {am - bm:+.2f} |")
        out.append("")
    step = lambda r: f" / step {r['step_ms']:.1f}" if r.get("step_ms") is not None else ""  # noqa: E731
    out.append(f"device busy: {b_lab} {before['busy_ms_per_step']:.1f}{step(before)} ms, "
               f"{a_lab} {after['busy_ms_per_step']:.1f}{step(after)} ms")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m xlstm_jax.tools.trace_summary DIR --steps N [--hlo FILE] [--step-ms MS] [--top K]
    [--json FILE]``: the tables of a trace directory (a ``bench-train --profile`` directory or any
    ``jax.profiler.trace`` one), e.g. to re-summarise a trace from another machine offline."""
    import argparse

    import sys

    from .errors import UsageError

    parser = argparse.ArgumentParser(prog="python -m xlstm_jax.tools.trace_summary", description=main.__doc__)
    parser.add_argument("trace_dir", help="directory of the trace (holds plugins/profile/<run>/)")
    parser.add_argument("--steps", type=int, required=True, help="number of steps the trace holds")
    parser.add_argument("--hlo", default=None,
                        help="compiled module text for the scopes (default: DIR/module.hlo.txt[.gz], else the "
                             "HLO proto in the trace's .xplane.pb)")
    parser.add_argument("--step-ms", type=float, default=None, help="measured step time for the idle share (default: none)")
    parser.add_argument("--top", type=int, default=15, help="top kernels listed (default: 15)")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file (default: none)")
    args = parser.parse_args(argv)

    def go() -> int:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1; got {args.steps}")
        if not os.path.isdir(args.trace_dir):
            raise UsageError(f"no such trace directory: {args.trace_dir!r}")
        hlo_text = None
        if args.hlo is not None:
            if not os.path.isfile(args.hlo):
                raise UsageError(f"--hlo: no such file: {args.hlo!r}")
            hlo_text = read_text(args.hlo)
        try:
            out = summarise_dir(args.trace_dir, args.steps, hlo_text, step_ms=args.step_ms, top=args.top)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
        print(f"trace {out['trace_file']}; scopes from {out['hlo_source'] or 'nowhere (no HLO found)'}")
        print(format_table(out))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
        return 0

    try:
        return go()
    except UsageError as err:
        print(f"xlstm-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
