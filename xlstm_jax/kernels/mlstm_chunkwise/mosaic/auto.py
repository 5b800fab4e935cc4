"""``chunkwise_auto``: the chunkwise kernel family the tuned tables chose for the call's shape.

Issue 14: "the tuner chooses between the Mosaic and Triton families per shape; Triton stays the
fallback for GPUs older than Hopper". ``xlstm-jax tune --families triton mosaic`` tunes the Triton
family (``chunkwise_pallas``) for a key as before, then times ``chunkwise_mosaic`` with the options
of the best candidate that it takes (``mosaic_options``) and records ``"family": "mosaic"`` in the
entry when it was faster by the tuner's ``--min-gain`` (``tuning`` module doc, ``tuning.FAMILIES``).

``choose_family`` is the rule (pure Python, trace time), ``mlstm_chunkwise_auto`` the kernel
(registered as ``chunkwise_auto``): the Mosaic family when all of

* tuning is enabled (``tuned`` / ``$XLSTM_JAX_TUNING``) and the entry matching the call (the
  lookup of ``tuning.lookup``: device kind, head dims, dtype, nearest S and B * NH) says
  ``"family": "mosaic"`` (its ``"mosaic_bw_kernels"`` and ``"mosaic_pipeline_slots"``, when it
  records them, are passed on as ``bw_kernels`` and ``pipeline_slots``; else ``chunkwise_mosaic``'s
  defaults);
* the kernel dtype is bfloat16 or float16 (``chunkwise_mosaic`` has no float32 kernel);
* the chunk (an explicit ``chunk_size``, else the entry's ``chunk_size_intra``) is a multiple of 64;
* Mosaic GPU can run: its API imports, and the default device is an NVIDIA GPU of compute
  capability 9.0 or newer, or ``interpret=True`` (Mosaic GPU's CPU interpret mode);

otherwise the Triton family (``chunkwise_pallas`` with the same tuned entry, or the heuristics).
Both families compute the same function with the same gradients (the same gate pull-backs and
recurrent backward; the parallel backward kernels are Mosaic or Triton ones computing the same
tiles), so the choice changes speed only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ...options import CellOptions
from ...validation import validate_sequence_call
from ..pallas import tuning
from ..pallas.autodiff import kernel_dtype_of, mlstm_chunkwise_pallas
from .forward import MOSAIC_DTYPES, mlstm_chunkwise_mosaic
from .fw_parallel import BLOCK, _mosaic

KERNEL_NAME = "chunkwise_auto"
MOSAIC_TUNED_OPTIONS = (
    "chunk_size_intra", "chunk_size_inter", "siz_b_DHQK_inter", "siz_b_DHV_inter", "num_warps_inter",
    "num_stages_inter", "m_scan", "gates_impl", "gate_grads_impl", "states_bf16", "recompute_states_in_bw",
)
"""The tuned options ``chunkwise_mosaic`` takes as they are: the chunk, the recurrent kernels' tiles
and launch parameters, the variant paths and ``recompute_states_in_bw``. The Triton intra-chunk
options (``siz_b_L_*``, ``siz_b_DH_*``, ``num_*_intra``) belong to the Triton forward kernel and are
left out (the Mosaic family's Triton backward then uses the heuristics' tiles, as the tuner
measured it)."""


def mosaic_options(params: dict) -> dict:
    """The options of a tuned entry's ``params`` (or a tuner candidate) for ``chunkwise_mosaic``."""
    return {k: v for k, v in params.items() if k in MOSAIC_TUNED_OPTIONS}



@dataclasses.dataclass(frozen=True)
class FamilyChoice:
    """The outcome of ``choose_family``: ``family`` ("triton" or "mosaic"), why, the tuned table the
    entry came from (None: no entry), and the options to call ``chunkwise_mosaic`` with."""

    family: str
    reason: str
    source: str | None = None
    mosaic_options: dict | None = None


def choose_family(
    *, B: int, NH: int, S: int, DHQK: int, DHV: int, kernel_dtype, grad_mode: str,
    chunk_size: int | None = None, tuned: bool | None = None, interpret: bool | None = None,
    device_kind: str | None = None,
) -> FamilyChoice:
    """The family for one call by the rule of the module doc (trace time, pure Python)."""
    if not tuning.tuning_enabled(tuned):
        return FamilyChoice("triton", "tuning disabled")
    kind = tuning.current_device_kind() if device_kind is None else device_kind
    key = tuning.TuningKey(kind, NH, DHQK, DHV, tuning.dtype_name(kernel_dtype), grad_mode, B, S)
    found = tuning.lookup(key)
    if found is None:
        return FamilyChoice("triton", f"no tuned entry for {key.label()}")
    entry, path = found
    family = tuning.entry_family(entry)
    if family != "mosaic":
        return FamilyChoice("triton", f"the tuned entry chose {family}", path)
    if jnp.dtype(kernel_dtype) not in MOSAIC_DTYPES:
        return FamilyChoice("triton", f"kernel dtype {jnp.dtype(kernel_dtype).name}: no Mosaic kernel", path)
    opts = mosaic_options(entry["params"])
    bw = tuning.entry_mosaic_bw_kernels(entry)
    if bw is not None:
        opts["bw_kernels"] = bw
    slots = tuning.entry_mosaic_pipeline_slots(entry)
    if slots is not None:
        opts["pipeline_slots"] = slots
    if chunk_size is not None:  # an explicit chunk wins over the tuned one, as in chunkwise_pallas
        opts.pop("chunk_size_intra", None)
        opts["chunk_size"] = chunk_size
    chunk = opts.get("chunk_size_intra", opts.get("chunk_size"))
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk % BLOCK):
        return FamilyChoice("triton", f"chunk {chunk!r} is not a multiple of {BLOCK}", path)
    why = _mosaic().unavailable_reason(bool(interpret))
    if why is not None:
        return FamilyChoice("triton", f"Mosaic GPU unavailable: {why}", path)
    return FamilyChoice("mosaic", "the tuned entry chose mosaic", path, opts)


def mlstm_chunkwise_auto(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    vecF: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    *,
    return_last_states: bool = False,
    segment_ids: jax.Array | None = None,
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
    cell_options: CellOptions | None = None,
    chunk_size: int | None = None,
    autocast_kernel_dtype=None,
    output_dtype=None,
    tuned: bool | None = None,
    interpret: bool | None = None,
):
    """Chunkwise mLSTM by the family ``choose_family`` picks: ``chunkwise_mosaic`` with the tuned
    entry's options it takes, else ``chunkwise_pallas`` (the same entry, or the heuristics).

    Arguments and outputs as ``mlstm_chunkwise_pallas``; the kernel options are only the target
    ``chunk_size``, ``autocast_kernel_dtype``, ``output_dtype``, ``tuned`` (False: the heuristics
    and the Triton family) and ``interpret`` (None: compile on a GPU; the Triton family interprets
    elsewhere; True: both families interpreted, so the Mosaic family can be chosen on CPU).
    Differentiable (both families are).
    """
    call = validate_sequence_call(  # every input error is raised here, before a family is chosen
        KERNEL_NAME, matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    kd = kernel_dtype_of(autocast_kernel_dtype, matQ.dtype)
    common = dict(
        return_last_states=return_last_states, segment_ids=segment_ids, qk_scale=qk_scale, eps=eps,
        norm_val=norm_val, stabilize_correctly=stabilize_correctly, grad_mode=grad_mode,
        input_gate=input_gate, cell_options=cell_options, autocast_kernel_dtype=autocast_kernel_dtype,
        output_dtype=output_dtype, interpret=interpret,
    )
    args = (matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial)
    if not call.empty:
        choice = choose_family(
            B=call.B, NH=call.NH, S=call.S, DHQK=call.DHQK, DHV=call.DHV, kernel_dtype=kd,
            grad_mode=call.options.grad_mode, chunk_size=chunk_size, tuned=tuned, interpret=interpret,
        )
        if choice.family == "mosaic":
            return mlstm_chunkwise_mosaic(*args, **common, **choice.mosaic_options, tuned=False)
    return mlstm_chunkwise_pallas(*args, **common, chunk_size=chunk_size, tuned=tuned)
