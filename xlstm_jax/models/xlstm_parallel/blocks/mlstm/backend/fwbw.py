"""``fwbw_stabilized`` backend: the chunkwise form in XLA with its own custom VJP.

Works on every platform, any sequence length, memory linear in S: the fallback of the Pallas backends.
"""

from __future__ import annotations

import dataclasses

from xlstm_jax.kernels import validate_chunk_size

from .config import mLSTMBackend, mLSTMBackendConfig


@dataclasses.dataclass
class mLSTMBackendFwbwConfig(mLSTMBackendConfig):
    """Config of the XLA chunkwise backend."""

    chunk_size: int = 64
    """Chunk length L of the chunkwise form."""
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

    def __post_init__(self):
        validate_chunk_size("chunk_size", self.chunk_size)
        super().__post_init__()


class mLSTMBackendFwbw(mLSTMBackend):
    """The chunkwise form in XLA (``chunkwise_native`` kernel)."""

    config: mLSTMBackendFwbwConfig
    config_class = mLSTMBackendFwbwConfig

    def kernel_call(self, seq_len):
        del seq_len
        c = self.config
        return "chunkwise_native", {"chunk_size": c.chunk_size}, {"cell_options": c.cell_options}
