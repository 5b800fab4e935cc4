"""Autotuning of the Pallas chunkwise (TFLA) kernels: search space, tuned-parameter tables, lookup.

What is here (pure Python, no GPU work; the measuring tuner is ``xlstm_jax.tools.tune``):

* ``SEARCH_SPACE``: the table of (option name, candidate values) the tuner walks, in the order it
  walks them. A name is either a field of ``heuristics.ChunkwiseKernelParams`` (a tile / launch
  parameter) or a keyword option of ``mlstm_chunkwise_pallas`` listed in ``CALL_OPTION_DEFAULTS``
  (today ``recompute_states_in_bw``). A new kernel option is tuned by adding one line to
  ``SEARCH_SPACE`` (and, for a keyword option, one line to ``CALL_OPTION_DEFAULTS``).
* ``search_space(...)`` the candidates for one shape class (values that the padded head dims or the
  sequence make identical to others are dropped), ``prune_reason(...)`` (``None`` or why a
  candidate is not worth compiling: invalid by the rules of ``heuristics``, or a shared-memory
  estimate far above the device's), ``coordinate_descent(...)`` (the search, with the measurement
  passed in as a function and a time budget).
* Tables of tuned entries (JSON, format below): the user cache at ``$XLSTM_JAX_TUNING_CACHE``, else
  ``~/.cache/xlstm_jax/tuning.json``, and the shipped defaults ``tuned_defaults.json`` in this
  package. ``lookup(...)`` finds the entry for a call; ``resolve_kernel_params(...)`` is what the
  kernel calls at trace time.

The key of an entry (kept simple on purpose): ``device_kind`` (exactly as
``jax.devices()[0].device_kind`` reports it, e.g. ``"NVIDIA H200"``), the head shape ``NH``,
``DHQK``, ``DHV``, the kernel dtype name (``"bfloat16"``), ``grad_mode`` (``"exact"`` / ``"tfla"``),
and the measured ``B`` and ``S``. The tuner's objective (``"fwbw"``: forward + backward time, the
training step; or ``"fw"``) is stored with the entry; the kernel cannot know at trace time whether it
will be differentiated, so one entry serves both.

Matching a call to an entry: the same ``device_kind``, ``DHQK``, ``DHV`` and dtype are required;
among those, the entry with the smallest distance

    |log2 S - log2 S_e| + 0.25 |log2(B NH) - log2(B_e NH_e)| + (0.5 if grad_mode differs)

wins (ties: the later entry of the table). Entries with S farther than a factor
``4`` (``MAX_LOG2_S_DISTANCE`` = 2) from the call's S are not used. So a model's shapes (its batch,
its S) use the tuned entry of the nearest measured shape with the same heads.

Lookup order for every option: explicit arguments of the call (``siz_b_L_parallel=...``,
``chunk_size=...``, ``recompute_states_in_bw=...``) > the user cache > the shipped table > the
heuristics (``heuristics.chunkwise_kernel_params``; ``True`` for ``recompute_states_in_bw``). An
explicit ``chunk_size`` also replaces a tuned ``chunk_size_intra``. A tuned entry whose values are
invalid for the call (``ValueError`` from ``chunkwise_kernel_params``) is skipped with a warning.
Disabled by ``tuned=False`` (argument of ``mlstm_chunkwise_pallas``) or the environment variable
``XLSTM_JAX_TUNING=off`` (also ``0``, ``false``, ``no``). On CPU (interpret mode) the device kind
(``"cpu"``) matches no GPU entry, so the heuristics apply.

A table file that is not valid JSON or not in the format below is ignored with a ``UserWarning``
(a broken cache must not stop a training run); single malformed entries are skipped with a warning.
``xlstm-jax tune --cache FILE`` refuses (a ``UsageError``) to write into such a file.

File format (the shipped ``tuned_defaults.json`` and ``xlstm-jax tune --json`` output are the same)::

    {"format": "xlstm_jax.tuning/1",
     "entries": [{"device_kind": "NVIDIA H200", "NH": 16, "DHQK": 128, "DHV": 256,
                  "dtype": "bfloat16", "grad_mode": "exact", "B": 8, "S": 8192,
                  "objective": "fwbw", "params": {"siz_b_L_parallel": 128, ...},
                  "ms": {"fw_default": .., "fwbw_default": .., "fw": .., "fwbw": ..},
                  "date": "YYYY-MM-DD", "jax": "0.11.2"}]}

Only ``params`` are used by the lookup (the values that differ from the heuristics at the measured
shape); the rest documents the measurement. An entry may also name the kernel family that was
faster at its key (``"family"``: ``"triton"``, the default when absent, or ``"mosaic"``; written by
``xlstm-jax tune --families triton mosaic``, read by the ``chunkwise_auto`` kernel,
``xlstm_jax.kernels.mlstm_chunkwise.mosaic.auto``); ``params`` stay the Triton family's either way
(``chunkwise_pallas`` uses them, ``chunkwise_mosaic`` the ones it takes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Iterable

import jax.numpy as jnp

from .heuristics import (
    OVERRIDABLE, VARIANT_CHOICES, ChunkwiseKernelParams, chunkwise_kernel_params, padded_head_dim, variant_options,
)

FORMAT = "xlstm_jax.tuning/1"
ENV_CACHE = "XLSTM_JAX_TUNING_CACHE"
ENV_SWITCH = "XLSTM_JAX_TUNING"
DEFAULT_CACHE = os.path.join("~", ".cache", "xlstm_jax", "tuning.json")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_defaults.json")
MAX_LOG2_S_DISTANCE = 2.0
"""Entries measured at an S more than a factor 2**2 = 4 away from the call's S are not used."""
SHARED_MEMORY_BYTES = 227 * 1024
"""Shared memory per thread block of an H100 / H200 (the opt-in maximum, 227 KB)."""
SMEM_PRUNE_FACTOR = 1.5
"""A candidate is pruned when its shared-memory estimate exceeds this multiple of the device's: the
estimate counts every tile a loop iteration loads as live at once (an over-estimate: the running
16-bit defaults estimate at 1.06x (7B heads) and 1.13x (standard heads) of 227 KB; the 7B heads
with 2 stages, which asked for 320 KB on an H200, at 1.97x), so only clearly hopeless candidates are
dropped and the compile decides the rest."""

FAMILIES = ("triton", "mosaic")
"""The kernel families an entry's optional ``"family"`` may name (module doc); the first is the default."""

MOSAIC_BW_KERNELS = ("mosaic", "triton", "mosaic_split")
"""The values of ``chunkwise_mosaic``'s ``bw_kernels`` (its default, when a call gives none, is
``mosaic.forward.default_bw_kernels``), which an entry that chose the Mosaic family records as
``"mosaic_bw_kernels"`` (the fastest of those the tuner timed; docs/benchmarks.md)."""
MOSAIC_PIPELINE_SLOTS = (1, 2)
"""The values of ``chunkwise_mosaic``'s ``pipeline_slots`` (the shared-memory buffers of its forward
and dV kernels' streamed tiles; default ``mosaic.forward.default_pipeline_slots``), which an entry
that chose the Mosaic family records as ``"mosaic_pipeline_slots"`` (the faster of the two the
tuner timed)."""

CALL_OPTION_DEFAULTS: dict[str, Any] = {
    "recompute_states_in_bw": True,
}
"""Keyword options of ``mlstm_chunkwise_pallas`` (not tile parameters) that the tuner may set, with
the value used when neither the call nor a tuned entry gives one."""

SEARCH_SPACE: tuple[tuple[str, tuple], ...] = (
    # (name, candidates), walked in this order: the options with measured gains first (2026-12-01
    # H200 sweeps: keeping the states, the parallel kernels' head tile, the recurrent kernels' DHV
    # tile), then the rest; siz_b_L_parallel late (its default, 128, was measured best at 16 bit)
    ("recompute_states_in_bw", (True, False)),
    ("states_bf16", (False, True)),
    ("m_scan", ("associative", "linear")),
    ("siz_b_DH_parallel", (64, 128, 256)),
    ("siz_b_DHV_inter", (64, 128, 256)),
    ("chunk_size_intra", (64, 128, 256)),
    ("siz_b_L_loop", (32, 64, 128)),
    ("siz_b_DHQK_inter", (64, 128, 256)),
    ("siz_b_L_parallel", (64, 128)),
    ("siz_b_DH_loop", (64, 128, 256)),
    ("num_warps_intra", (4, 8)),
    ("num_stages_intra", (1, 2, 3)),
    ("num_warps_inter", (4, 8)),
    ("num_stages_inter", (1, 2, 3)),
    ("chunk_size_inter", (32, 64, 128)),
    # last: the glue-path variants of heuristics.VARIANT_CHOICES, each measured slower than the
    # default at the small, standard and 7B rows (2026-12-02 H200, docs/benchmarks.md: e.g. small
    # 16 x 2048 fwbw 1.52 ms default, 1.71 gate_grads_impl=fused, 1.60 fuse_dkdv; standard 8 x 8192
    # fwbw 6.87 default, 7.45 gate_grads_impl=pallas, 7.97 fused; gates_impl=fused fw 2.21 -> 3.32):
    # a search with budget left still tries them (another GPU may differ); the "kernel" values
    # (tt.scan inside the kernels, sixth session) were faster at the small row (fw 0.67 -> 0.42,
    # fwbw 1.33 -> 1.19 ms) and are in the shipped table there
    ("gate_grads_impl", ("xla", "pallas", "fused", "kernel")),
    ("gates_impl", ("xla", "pallas", "fused", "kernel")),
    ("save_gates", (False, True)),
    ("fuse_dkdv", (False, True)),
)
"""The tuner's options and candidates (one line per option; see the module doc)."""


# ----------------------------------------------------------------------------- keys and entries
@dataclasses.dataclass(frozen=True)
class TuningKey:
    """What a tuned entry is measured for (see the module doc)."""

    device_kind: str
    NH: int
    DHQK: int
    DHV: int
    dtype: str
    grad_mode: str
    B: int
    S: int

    def label(self) -> str:
        """A short human-readable form."""
        return (f"{self.device_kind} NH{self.NH} DHQK{self.DHQK} DHV{self.DHV} {self.dtype} "
                f"{self.grad_mode} {self.B}x{self.S}")


_KEY_FIELDS = tuple(f.name for f in dataclasses.fields(TuningKey))
_INT_FIELDS = ("NH", "DHQK", "DHV", "B", "S")


def dtype_name(dtype) -> str:
    """The canonical name of a dtype (``"bfloat16"``); ``ValueError`` if it is not one."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype must be a dtype or its name; got {dtype!r}") from None


def _known_option(name: str) -> bool:
    return name in OVERRIDABLE or name in CALL_OPTION_DEFAULTS


def validate_entry(entry: Any) -> dict:
    """``entry`` checked as one table entry (module doc); returns it with ``dtype`` canonical.

    Raises ``ValueError`` naming what is missing or wrong (unknown option names included: an entry
    written for other kernel options is not applied half).
    """
    if not isinstance(entry, dict):
        raise ValueError(f"a tuning entry must be a JSON object; got {type(entry).__name__}")
    missing = [k for k in _KEY_FIELDS + ("params",) if k not in entry]
    if missing:
        raise ValueError(f"tuning entry lacks {missing}: {entry!r:.200}")
    for k in _INT_FIELDS:
        if isinstance(entry[k], bool) or not isinstance(entry[k], int) or entry[k] < 1:
            raise ValueError(f"tuning entry field {k} must be a positive int; got {entry[k]!r}")
    for k in ("device_kind", "grad_mode"):
        if not isinstance(entry[k], str):
            raise ValueError(f"tuning entry field {k} must be a string; got {entry[k]!r}")
    params = entry["params"]
    if not isinstance(params, dict):
        raise ValueError(f"tuning entry params must be an object; got {params!r}")
    unknown = sorted(k for k in params if not _known_option(k))
    if unknown:
        raise ValueError(f"tuning entry has unknown option(s) {unknown} (known: tile parameters "
                         f"{list(OVERRIDABLE)} and {list(CALL_OPTION_DEFAULTS)})")
    for k, v in params.items():
        if k in VARIANT_CHOICES:
            try:
                variant_options({k: v})
            except ValueError as err:
                raise ValueError(f"tuning entry option {err}") from None
        elif k in OVERRIDABLE and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"tuning entry option {k} must be an int; got {v!r}")
        if k in CALL_OPTION_DEFAULTS and type(v) is not type(CALL_OPTION_DEFAULTS[k]):
            raise ValueError(f"tuning entry option {k} must be a {type(CALL_OPTION_DEFAULTS[k]).__name__}; "
                             f"got {v!r}")
    if "family" in entry and entry["family"] not in FAMILIES:
        raise ValueError(f"tuning entry family must be one of {list(FAMILIES)}; got {entry['family']!r}")
    if "mosaic_bw_kernels" in entry and entry["mosaic_bw_kernels"] not in MOSAIC_BW_KERNELS:
        raise ValueError(f"tuning entry mosaic_bw_kernels must be one of {list(MOSAIC_BW_KERNELS)}; "
                         f"got {entry['mosaic_bw_kernels']!r}")
    slots = entry.get("mosaic_pipeline_slots")
    if "mosaic_pipeline_slots" in entry and (isinstance(slots, bool) or slots not in MOSAIC_PIPELINE_SLOTS):
        raise ValueError(f"tuning entry mosaic_pipeline_slots must be one of {list(MOSAIC_PIPELINE_SLOTS)}; "
                         f"got {slots!r}")
    out = dict(entry)
    out["dtype"] = dtype_name(entry["dtype"])
    return out


def entry_family(entry: dict) -> str:
    """The kernel family a (validated) entry names as the faster at its key (default ``"triton"``)."""
    return entry.get("family", FAMILIES[0])


def entry_mosaic_bw_kernels(entry: dict) -> str:
    """The ``bw_kernels`` of ``chunkwise_mosaic`` a (validated) entry records; None when it records
    none (``chunkwise_mosaic`` then resolves its default)."""
    return entry.get("mosaic_bw_kernels")


def entry_mosaic_pipeline_slots(entry: dict) -> int | None:
    """The ``pipeline_slots`` of ``chunkwise_mosaic`` a (validated) entry records; None when it
    records none (``chunkwise_mosaic`` then takes ``default_pipeline_slots``)."""
    return entry.get("mosaic_pipeline_slots")


def entry_key(entry: dict) -> TuningKey:
    """The ``TuningKey`` of a (validated) entry."""
    return TuningKey(**{k: entry[k] for k in _KEY_FIELDS})


def make_entry(key: TuningKey, params: dict, *, objective: str, ms: dict | None = None,
               extra: dict | None = None) -> dict:
    """A table entry (the format of the module doc) for ``key`` with the tuned ``params``."""
    entry = dict(dataclasses.asdict(key))
    entry.update(objective=objective, params=dict(params), ms=dict(ms or {}),
                 date=time.strftime("%Y-%m-%d"))
    entry.update(extra or {})
    return validate_entry(entry)


# ----------------------------------------------------------------------------- table files
def user_cache_path() -> str:
    """``$XLSTM_JAX_TUNING_CACHE`` if set, else ``~/.cache/xlstm_jax/tuning.json`` (expanded)."""
    return os.path.expanduser(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


def parse_table(text: str, where: str) -> list[dict]:
    """The entries of a table file's text; ``ValueError`` (naming ``where``) if it is not one.

    Malformed single entries are skipped with a ``UserWarning``.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"tuning table {where} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise ValueError(f"tuning table {where} is not in the format {FORMAT!r} "
                         "(an object with 'format' and a list 'entries')")
    entries = []
    for n, entry in enumerate(data["entries"]):
        try:
            entries.append(validate_entry(entry))
        except ValueError as err:
            warnings.warn(f"tuning table {where}: entry {n} skipped: {err}", UserWarning, stacklevel=2)
    return entries


@functools.lru_cache(maxsize=32)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    del mtime_ns, size  # part of the cache key only: a rewritten file is read again
    with open(path) as fh:
        text = fh.read()
    try:
        return tuple(parse_table(text, path))
    except ValueError as err:
        warnings.warn(f"{err}; ignored", UserWarning, stacklevel=3)
        return ()


def read_table(path: str) -> tuple[dict, ...]:
    """The entries of the table at ``path`` (none if it does not exist; an invalid file is ignored
    with a ``UserWarning``). Re-read when the file changes."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return _read_cached(path, st.st_mtime_ns, st.st_size)


def write_table(path: str, entries: Iterable[dict], *, merge: bool = True) -> list[dict]:
    """Write ``entries`` to the table at ``path`` (directories created); with ``merge``, entries
    already there are kept unless one of ``entries`` has the same key. Returns what was written.

    Raises ``ValueError`` if ``merge`` and the existing file is not a valid table (never
    overwritten silently).
    """
    path = os.path.expanduser(path)
    new = [validate_entry(e) for e in entries]
    old: list[dict] = []
    if merge and os.path.exists(path):
        with open(path) as fh:
            old = parse_table(fh.read(), path)
    keys = {entry_key(e) for e in new}
    table = [e for e in old if entry_key(e) not in keys] + new
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": FORMAT, "entries": table}, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return table


def tables() -> list[tuple[str, tuple[dict, ...]]]:
    """(path, entries) of the tables in lookup order: the user cache, then the shipped defaults."""
    return [(p, read_table(p)) for p in (user_cache_path(), SHIPPED)]


# ----------------------------------------------------------------------------- lookup
def tuning_enabled(tuned: bool | None = None) -> bool:
    """``tuned`` if given, else False when ``$XLSTM_JAX_TUNING`` is off/0/false/no, else True."""
    if tuned is not None:
        if not isinstance(tuned, bool):
            raise ValueError(f"tuned must be None, True or False; got {tuned!r}")
        return tuned
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def current_device_kind() -> str:
    """``jax.devices()[0].device_kind`` of the default backend (``"cpu"`` on CPU)."""
    import jax

    return str(jax.devices()[0].device_kind)


def match_distance(key: TuningKey, entry: dict) -> float | None:
    """The distance of the module doc between a call's key and an entry; None if it cannot match."""
    if (entry["device_kind"] != key.device_kind or entry["DHQK"] != key.DHQK
            or entry["DHV"] != key.DHV or entry["dtype"] != key.dtype):
        return None
    ds = abs(math.log2(key.S) - math.log2(entry["S"]))
    if ds > MAX_LOG2_S_DISTANCE:
        return None
    dbh = abs(math.log2(key.B * key.NH) - math.log2(entry["B"] * entry["NH"]))
    return ds + 0.25 * dbh + (0.5 if entry["grad_mode"] != key.grad_mode else 0.0)


def lookup(key: TuningKey, table_list: list[tuple[str, tuple[dict, ...]]] | None = None) -> tuple[dict, str] | None:
    """(entry, path of its table) for ``key``: the nearest entry of the first table (user cache,
    then shipped) that has a matching one; None if none matches."""
    for path, entries in tables() if table_list is None else table_list:
        best, best_d = None, None
        for entry in entries:
            d = match_distance(key, entry)
            if d is not None and (best_d is None or d <= best_d):
                best, best_d = entry, d
        if best is not None:
            return best, path
    return None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The kernel parameters and keyword options of one call, and where the tuned ones came from."""

    params: ChunkwiseKernelParams
    call_options: dict
    source: str  # "heuristics" or the path of the tuned table
    entry: dict | None = None


def resolve_kernel_params(
    *, B: int, NH: int, S: int, DHQK: int, DHV: int, dtype, grad_mode: str,
    chunk_size: int | None, tile_params: dict, call_options: dict | None = None,
    tuned: bool | None = None, device_kind: str | None = None,
) -> Resolved:
    """The parameters of one kernel call by the lookup order of the module doc (trace time, pure
    Python). ``tile_params``: the call's explicit tile parameters (None = not given);
    ``call_options``: its keyword options of ``CALL_OPTION_DEFAULTS`` (None = not given).
    Invalid explicit values raise ``ValueError`` (from ``chunkwise_kernel_params``)."""
    call_options = dict(call_options or {})
    unknown = sorted(set(call_options) - set(CALL_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown tunable call option(s) {unknown}; known: {list(CALL_OPTION_DEFAULTS)}")
    explicit = {k: v for k, v in tile_params.items() if v is not None}
    base = dict(S=S, DHQK=DHQK, DHV=DHV, dtype=dtype, chunk_size=chunk_size)
    heuristic = chunkwise_kernel_params(**base, **explicit)  # invalid explicit values raise here
    found = None
    if tuning_enabled(tuned):
        kind = current_device_kind() if device_kind is None else device_kind
        key = TuningKey(kind, NH, DHQK, DHV, dtype_name(dtype), grad_mode, B, S)
        found = lookup(key)
    if found is not None:
        entry, path = found
        tuned_vals = dict(entry["params"])
        if chunk_size is not None:  # an explicit target chunk wins over a tuned one
            tuned_vals.pop("chunk_size_intra", None)
        tiles = {k: v for k, v in tuned_vals.items() if k in OVERRIDABLE}
        tiles.update(explicit)
        try:
            params = chunkwise_kernel_params(**base, **tiles)
        except ValueError as err:
            warnings.warn(f"tuned entry of {path} for {entry_key(entry).label()} not usable at "
                          f"S={S}: {err}; using the heuristics", UserWarning, stacklevel=2)
        else:
            opts = {k: (call_options.get(k) if call_options.get(k) is not None
                        else tuned_vals.get(k, default)) for k, default in CALL_OPTION_DEFAULTS.items()}
            return Resolved(params, opts, path, entry)
    params = heuristic
    opts = {k: (call_options.get(k) if call_options.get(k) is not None else default)
            for k, default in CALL_OPTION_DEFAULTS.items()}
    return Resolved(params, opts, "heuristics")


# ----------------------------------------------------------------------------- search space
def search_space(S: int, DHQK: int, DHV: int, dtype, space: tuple = SEARCH_SPACE) -> list[tuple[str, tuple]]:
    """The candidates of ``space`` for one shape class: head-dim tiles above the padded head dims
    (they clamp to the same kernel) and chunks above the padded sequence are dropped; float32 drops
    chunks of 256 (twice the shared memory of 16-bit tiles)."""
    Dq, Dv = padded_head_dim(DHQK), padded_head_dim(DHV)
    Dmax = max(Dq, Dv)
    limit = {"siz_b_DH_parallel": Dmax, "siz_b_DH_loop": Dmax, "siz_b_DHQK_inter": Dq, "siz_b_DHV_inter": Dv}
    Smax = max(16, 1 << max(0, S - 1).bit_length())
    fp32 = jnp.dtype(dtype) == jnp.float32
    out = []
    for name, values in space:
        vals = []
        for v in values:
            if name in limit and v > limit[name]:
                continue
            if name in ("chunk_size_intra", "siz_b_L_parallel", "siz_b_L_loop", "chunk_size_inter") and v > Smax:
                continue
            if fp32 and name == "chunk_size_intra" and v > 128:
                continue
            vals.append(v)
        if len(vals) > 1 or (vals and name in CALL_OPTION_DEFAULTS):
            out.append((name, tuple(vals)))
    return out


def shared_memory_estimate(p: ChunkwiseKernelParams, DHQK: int, DHV: int, dtype) -> int:
    """An upper estimate (bytes) of the shared memory of the largest of the six kernels.

    Per kernel: num_stages x (every tile one loop iteration loads) + the tiles loaded once (one
    sub-tile of the state: the products with the state run over static sub-tiles of the head dim);
    see ``SMEM_PRUNE_FACTOR`` for how it is used.
    """
    it = jnp.dtype(dtype).itemsize
    Dq, Dv = padded_head_dim(DHQK), padded_head_dim(DHV)
    bL, bLl = p.siz_b_L_parallel, p.siz_b_L_loop
    si, sr = p.num_stages_intra, p.num_stages_inter
    # fw h: loop k (bLl x Dq), v (bLl x bV), q if several DHQK tiles; once: q or nothing, C (bDK x bV)
    bV, bDK = p.tile("siz_b_DH_parallel", Dv), p.tile("siz_b_DH_loop", Dq)
    q_loop = bL * Dq if Dq // bDK > 1 else 0
    fw = si * (bLl * Dq + bLl * bV + q_loop) + (bL * Dq - q_loop) + bDK * bV
    # dq: loop v (bLl x Dv), k (bLl x bDK); dh in the loop if several DHV tiles; once C (bDK x bDV)
    bDKp, bDVl = p.tile("siz_b_DH_parallel", Dq), p.tile("siz_b_DH_loop", Dv)
    dh_loop = bL * Dv if Dv // bDVl > 1 else 0
    dq = si * (bLl * Dv + bLl * bDKp + dh_loop) + (bL * Dv - dh_loop) + bDKp * bDVl
    # dk: loop dh (bLl x Dv), q (bLl x bDK); v in the loop if several DHV tiles; once dC
    dk = si * (bLl * Dv + bLl * bDKp + dh_loop) + (bL * Dv - dh_loop) + bDKp * bDVl
    # dv: loop q (bLl x Dq), dh (bLl x bDV); k in the loop if several DHQK tiles; once dC
    bDVp, bDKl = p.tile("siz_b_DH_parallel", Dv), p.tile("siz_b_DH_loop", Dq)
    k_loop = bL * Dq if Dq // bDKl > 1 else 0
    dv = si * (bLl * Dq + bLl * bDVp + k_loop) + (bL * Dq - k_loop) + bDKl * bDVp
    # recurrent: loop (L_inter x bK) and (L_inter x bV)
    bK, bVr = p.tile("siz_b_DHQK_inter", Dq), p.tile("siz_b_DHV_inter", Dv)
    rec = sr * p.chunk_size_inter * (bK + bVr)
    return it * max(fw, dq, dk, dv, rec)


def prune_reason(S: int, DHQK: int, DHV: int, dtype, overrides: dict,
                 smem_limit: int = SHARED_MEMORY_BYTES) -> str | None:
    """None if the candidate ``overrides`` is worth compiling, else why not ("invalid: ..." for the
    rules of ``heuristics``, "shared memory: ..." for an estimate above SMEM_PRUNE_FACTOR x limit)."""
    tiles = {k: v for k, v in overrides.items() if k in OVERRIDABLE}
    try:
        p = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=dtype, **tiles)
    except ValueError as err:
        return f"invalid: {err}"
    est = shared_memory_estimate(p, DHQK, DHV, dtype)
    if est > SMEM_PRUNE_FACTOR * smem_limit:
        return f"shared memory: estimate {est // 1024} KB > {SMEM_PRUNE_FACTOR:g} x {smem_limit // 1024} KB"
    return None


def canonical(S: int, DHQK: int, DHV: int, dtype, overrides: dict) -> tuple:
    """What a candidate runs (resolved tile parameters and call options): equal tuples are the same
    kernel, so the tuner measures each once."""
    tiles = {k: v for k, v in overrides.items() if k in OVERRIDABLE}
    p = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=dtype, **tiles)
    opts = tuple((k, overrides.get(k, d)) for k, d in CALL_OPTION_DEFAULTS.items())
    return (p, opts)


def minimal_overrides(S: int, DHQK: int, DHV: int, dtype, overrides: dict) -> dict:
    """``overrides`` without the values that equal the heuristics' at this shape (what an entry stores)."""
    p0 = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=dtype)
    p = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=dtype,
                                **{k: v for k, v in overrides.items() if k in OVERRIDABLE})
    out = {k: getattr(p, k) for k in OVERRIDABLE if getattr(p, k) != getattr(p0, k)}
    out.update({k: v for k, v in overrides.items() if k in CALL_OPTION_DEFAULTS and v != CALL_OPTION_DEFAULTS[k]})
    return out


# ----------------------------------------------------------------------------- the search
@dataclasses.dataclass
class Trial:
    """One candidate the tuner looked at: its overrides, the time (ms) or why there is none."""

    overrides: dict
    ms: float | None = None
    skipped: str | None = None  # pruned before compiling
    error: str | None = None  # failed to compile or run


@dataclasses.dataclass
class SearchResult:
    """The outcome of ``coordinate_descent``."""

    best: dict
    best_ms: float
    default_ms: float
    trials: list
    budget_exhausted: bool


def coordinate_descent(
    measure: Callable[[dict], float],
    *, S: int, DHQK: int, DHV: int, dtype,
    space: list[tuple[str, tuple]],
    budget_s: float,
    min_gain: float = 0.02,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
    on_option: Callable[[dict, str, tuple[dict, ...]], None] | None = None,
    seeds: Iterable[dict] = (),
) -> SearchResult:
    """Greedy one-option-at-a-time search from the heuristics (``overrides = {}``).

    ``measure(overrides) -> ms`` times one candidate (it may raise: the candidate is recorded as
    failed and skipped, the search goes on). Each option of ``space`` in turn: every candidate value
    that is new (``canonical``), valid and not pruned (``prune_reason``) is measured; the best is kept
    if it is at least ``min_gain`` (relative) faster. Stops when ``budget_s`` seconds have passed
    (the default is always measured). If the default itself fails, ``RuntimeError``.
    ``seeds`` (e.g. the best of a neighbouring shape) are measured right after the default and
    the fastest becomes the start if it gains ``min_gain``. ``on_option(best, name, candidates)``, if given, is called with the candidates (override dicts)
    of an option before they are measured (the tuner compiles them together there).
    """
    t_start = clock()
    trials: list[Trial] = []
    seen: set = set()
    best: dict = {}
    try:
        seen.add(canonical(S, DHQK, DHV, dtype, best))
        best_ms = default_ms = float(measure(best))
    except Exception as err:
        raise RuntimeError(f"the heuristic default failed: {type(err).__name__}: {err}") from err
    trials.append(Trial({}, default_ms))
    log(f"  default: {default_ms:.3f} ms")
    for seed in seeds:
        seed = {k: v for k, v in seed.items() if k in OVERRIDABLE or k in CALL_OPTION_DEFAULTS}
        if clock() - t_start > budget_s or prune_reason(S, DHQK, DHV, dtype, seed) is not None:
            continue
        c = canonical(S, DHQK, DHV, dtype, seed)
        if c in seen:
            continue
        seen.add(c)
        try:
            ms = float(measure(seed))
        except Exception as err:  # recorded like any candidate
            trials.append(Trial(dict(seed), error=f"{type(err).__name__}: {err}"[:400]))
            log(f"  seed {seed}: failed")
            continue
        trials.append(Trial(dict(seed), ms))
        better = ms < best_ms * (1.0 - min_gain)
        log(f"  seed {seed}: {ms:.3f} ms" + ("  <- best" if better else ""))
        if better:
            best, best_ms = dict(seed), ms
    exhausted = False
    for name, values in space:
        if clock() - t_start > budget_s:
            exhausted = True
            break
        todo = []  # this option's new, valid candidates (the others only differ in ``name``)
        for v in values:
            cand = {**best, name: v}
            reason = prune_reason(S, DHQK, DHV, dtype, cand)
            if reason is not None:
                trials.append(Trial(cand, skipped=reason))
                log(f"  {name}={v}: skipped ({reason[:100]})")
                continue
            c = canonical(S, DHQK, DHV, dtype, cand)
            if c not in seen:
                seen.add(c)
                todo.append((v, cand))
        if todo and on_option is not None:
            on_option(dict(best), name, tuple(cand for _, cand in todo))
        for v, cand in todo:
            if clock() - t_start > budget_s:
                exhausted = True
                break
            try:
                ms = float(measure(cand))
            except Exception as err:  # a compile / launch failure: record, go on
                msg = f"{type(err).__name__}: {err}"
                trials.append(Trial(cand, error=msg[:400]))
                log(f"  {name}={v}: failed ({' '.join(msg.split())[:120]})")
                continue
            trials.append(Trial(cand, ms))
            better = ms < best_ms * (1.0 - min_gain)
            log(f"  {name}={v}: {ms:.3f} ms" + ("  <- best" if better else ""))
            if better:
                best, best_ms = {**best, name: v}, ms
        if exhausted:
            break
    if exhausted:
        log(f"  budget of {budget_s:g} s used up")
    return SearchResult(best, best_ms, default_ms, trials, exhausted)
