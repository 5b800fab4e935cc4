"""``parallel_stabilized`` backend: the quadratic parallel form (``parallel_native`` kernel).

Memory grows with S^2: for short contexts and for checking, not for long training sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import mLSTMBackend, mLSTMBackendConfig


@dataclasses.dataclass
class mLSTMBackendParallelConfig(mLSTMBackendConfig):
    """Config of the parallel backend."""

    context_length: int = -1
    """Longest sequence accepted (-1: any); taken from the model config."""
    eps: float = 1e-6
    """Epsilon added to the normalizer."""
    norm_val: float = 1.0
    """Lower bound of the normalizer: max(norm_val * exp(-m), |q . n|)."""
    stabilize_correctly: bool = True
    """Scale norm_val by exp(-m) (True) or use norm_val itself (False)."""
    grad_mode: str = "exact"
    """'exact' gradients, or 'tfla' (denominator and m constant in the backward)."""
    input_gate: str = "exp"
    """Input gate: "exp" (the exponential gate with max state) or "sigmoid" (mLSTMsig, no max state)."""

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take ``context_length`` from the model config."""
        self.context_length = model_config.context_length


class mLSTMBackendParallel(mLSTMBackend):
    """The stabilized parallel form."""

    config: mLSTMBackendParallelConfig
    config_class = mLSTMBackendParallelConfig

    def kernel_call(self, seq_len):
        S = seq_len
        if self.config.context_length > 0 and S > self.config.context_length:
            raise ValueError(
                f"sequence length {S} exceeds context_length {self.config.context_length} of the "
                "parallel_stabilized backend"
            )
        return "parallel_native", {}, {"cell_options": self.config.cell_options}
