"""The options of the mLSTM cell: one frozen, validated type shared by every kernel, backend and model.

Notation: see ``xlstm_jax.kernels._common``. The cell (``docs/design.md``, section 1) is

    m_t = max(logf_t + m_{t-1}, i_t),   logf_t = log_sigmoid(f_t)
    C_t = exp(logf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise)
    h_t = (qs_t^T C_t) / (max(|qs_t . n_t|, lam_t) + eps),   qs_t = qk_scale * q_t

with ``lam_t = norm_val * exp(-m_t)`` (``stabilize_correctly=True``) or ``lam_t = norm_val``.
``CellOptions`` holds everything in these formulas that is not an array, plus the gradient convention:

    qk_scale             scale of the queries; None: DHQK ** -0.5
    eps                  added to the denominator (finite, >= 0)
    norm_val             scale of the denominator's lower bound (finite, >= 0)
    stabilize_correctly  lower bound ``norm_val * exp(-m)`` (True) or ``norm_val`` (False)
    grad_mode            "exact": the gradient of the function above; "tfla": the TFLA kernels'
                         cheaper gradient, with the denominator and m held constant
    input_gate           "exp" (the cell above) or "sigmoid" (mLSTMsig: input gate sigmoid(i), no
                         max state, m_t = 0 and lower bound lam_t = norm_val; docs/design.md)

It is validated once, in ``__post_init__``; ``resolve_cell_options`` is the one function through
which every kernel turns its keyword arguments into a ``CellOptions``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

GRAD_MODES = ("exact", "tfla")
"""Valid ``grad_mode`` values."""
INPUT_GATES = ("exp", "sigmoid")
"""Valid ``input_gate`` values."""


def _real(name: str, value: Any, *, allow_none: bool = False, positive: bool = False) -> float | None:
    """``value`` as a finite float (>= 0, or > 0 with ``positive``); ``ValueError`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x) or x < 0.0 or (positive and x == 0.0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}; got {value!r}")
    return x


@dataclasses.dataclass(frozen=True)
class CellOptions:
    """The options of the mLSTM cell (see the module docstring); frozen and hashable.

    Raises ``ValueError`` for a wrong type or value, e.g. ``stabilize_correctly="no"``, ``eps=-1``,
    ``eps=nan``, ``qk_scale=0`` or an unknown ``grad_mode``.
    """

    qk_scale: float | None = None
    """Scale of the queries; None: DHQK ** -0.5 (``effective_qk_scale``)."""
    eps: float = 1e-6
    """Added to the denominator max(|qs . n|, lam)."""
    norm_val: float = 1.0
    """Scale of the lower bound lam of the denominator."""
    stabilize_correctly: bool = True
    """lam = norm_val * exp(-m) (True) or lam = norm_val (False)."""
    grad_mode: str = "exact"
    """"exact" or "tfla" (denominator and m constant in the backward pass)."""
    input_gate: str = "exp"
    """"exp" (the exponential input gate with max state m) or "sigmoid" (mLSTMsig, m = 0)."""

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("qk_scale", _real("qk_scale", self.qk_scale, allow_none=True, positive=True))
        set_("eps", _real("eps", self.eps))
        set_("norm_val", _real("norm_val", self.norm_val))
        if not isinstance(self.stabilize_correctly, (bool, np.bool_)):
            raise ValueError(
                f"stabilize_correctly must be a bool; got {self.stabilize_correctly!r} "
                f"of type {type(self.stabilize_correctly).__name__}"
            )
        set_("stabilize_correctly", bool(self.stabilize_correctly))
        if not isinstance(self.grad_mode, str) or self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}; got {self.grad_mode!r}")
        if not isinstance(self.input_gate, str) or self.input_gate not in INPUT_GATES:
            raise ValueError(f"input_gate must be one of {INPUT_GATES}; got {self.input_gate!r}")

    def effective_qk_scale(self, DHQK: int) -> float:
        """The query scale for head dim ``DHQK``: ``qk_scale`` or ``DHQK ** -0.5``."""
        return DHQK**-0.5 if self.qk_scale is None else self.qk_scale

    @property
    def max_state(self) -> bool:
        """Whether the cell has a max state m (``input_gate="exp"``); the sigmoid cell holds m = 0."""
        return self.input_gate == "exp"

    def as_kwargs(self) -> dict[str, Any]:
        """The flat keyword arguments of the kernels' call signature."""
        return dict(
            qk_scale=self.qk_scale, eps=self.eps, norm_val=self.norm_val,
            stabilize_correctly=self.stabilize_correctly, grad_mode=self.grad_mode,
            input_gate=self.input_gate,
        )

    def replace(self, **changes: Any) -> "CellOptions":
        """A copy with ``changes`` (validated like a new instance)."""
        return dataclasses.replace(self, **changes)

    def require_implemented(self, kernel: str) -> "CellOptions":
        """Return self (every variant of the cell is implemented by every kernel)."""
        del kernel
        return self


FLAT_OPTIONS = ("qk_scale", "eps", "norm_val", "stabilize_correctly", "grad_mode", "input_gate")
"""The cell options of the kernels' flat keyword call signature."""
_DEFAULTS = CellOptions()


def resolve_cell_options(
    cell_options: CellOptions | None = None,
    *,
    kernel: str = "mLSTM kernel",
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
) -> CellOptions:
    """The one place a kernel call's cell options are built and validated.

    Either ``cell_options`` (a ``CellOptions``) or the flat keywords (the documented call
    signature); a flat keyword that differs from its default next to ``cell_options`` is ambiguous
    and raises ``ValueError``.
    """
    flat = dict(qk_scale=qk_scale, eps=eps, norm_val=norm_val,
                stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate)
    if cell_options is None:
        return CellOptions(**flat).require_implemented(kernel)
    if not isinstance(cell_options, CellOptions):
        raise ValueError(f"cell_options must be a CellOptions; got {type(cell_options).__name__}")
    changed = sorted(k for k, v in flat.items() if not _same(v, getattr(_DEFAULTS, k)))
    if changed:
        raise ValueError(
            f"{kernel}: give the cell options either as cell_options=CellOptions(...) or as keywords, "
            f"not both; also got {changed}"
        )
    return cell_options.require_implemented(kernel)


def _same(a: Any, b: Any) -> bool:
    """Whether a flat keyword was left at its default ``b``."""
    return a is b or (type(a) is type(b) and a == b)
