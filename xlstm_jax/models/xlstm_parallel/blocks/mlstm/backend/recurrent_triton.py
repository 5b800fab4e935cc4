"""``recurrent_triton`` backend: the recurrent form, one fused Pallas step kernel per time step.

Thin over the registry step kernel ``recurrent_pallas`` (Pallas, lowered through Triton on NVIDIA
GPUs, interpreted elsewhere) and the seed-004 loop ``recurrent_sequence_fw``. Shapes as in the other
backends: q, k (B, NH, S, DHQK); v (B, NH, S, DHV); i, f (B, NH, S) or (B, NH, S, 1); initial states
(B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH). Forward only: the step kernel has no VJP, so this
backend is for inference (prefill by recurrence, or checking), not for training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from xlstm_jax.kernels import floating_dtype

from .config import mLSTMBackend, mLSTMBackendConfig
from .recurrent import recurrent_sequence_fw, seed_step_fn

__all__ = ["mLSTMBackendRecurrentTriton", "mLSTMBackendRecurrentTritonConfig"]


@dataclasses.dataclass
class mLSTMBackendRecurrentTritonConfig(mLSTMBackendConfig):
    """Config of the recurrent backend over the fused Pallas step kernel."""

    context_length: int = -1
    """Context length of the model (informational for this backend); taken from the model config."""
    eps: float = 1e-6
    """Epsilon added to the normalizer."""
    input_gate: str = "exp"
    """Input gate: "exp" (the exponential gate with max state) or "sigmoid" (mLSTMsig, no max state)."""
    state_dtype: str | None = None
    """Dtype of the states (float32, or bfloat16 to halve the state bytes); None: the initial states'
    dtype if given, else the gate pre-activations' dtype (``recurrent_sequence_fw``)."""
    use_scan: bool = False
    """Loop with ``jax.lax.scan`` (fast to compile) instead of an unrolled Python loop."""
    kernel_dtype: str | None = None
    """Dtype to which q, k, v, i, f are cast before the kernel (e.g. "bfloat16" halves their bytes;
    arithmetic is float32 in the kernel either way); None keeps the inputs' dtypes. h is returned in
    the dtype of the queries given to the backend."""

    def __post_init__(self):
        floating_dtype("state_dtype", self.state_dtype)
        floating_dtype("kernel_dtype", self.kernel_dtype)
        super().__post_init__()

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take ``context_length`` from the model config."""
        self.context_length = model_config.context_length


class mLSTMBackendRecurrentTriton(mLSTMBackend):
    """mLSTM backend that runs the cell step by step with the fused Pallas step kernel."""

    config: mLSTMBackendRecurrentTritonConfig
    config_class = mLSTMBackendRecurrentTritonConfig
    supports_training = False  # the fused step kernel has no VJP

    def __call__(
        self,
        q: jax.Array,  # (B, NH, S, DHQK)
        k: jax.Array,  # (B, NH, S, DHQK)
        v: jax.Array,  # (B, NH, S, DHV)
        i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
        n_initial: jax.Array | None = None,  # (B, NH, DHQK)
        m_initial: jax.Array | None = None,  # (B, NH)
        return_last_states: bool = False,
        segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents
    ):
        """Run the sequence; see ``recurrent_sequence_fw``. Returns h (and the last states)."""
        c = self.config
        out_dtype = q.dtype
        kdt = floating_dtype("kernel_dtype", c.kernel_dtype)
        if kdt is not None:
            q, k, v, i, f = (x.astype(kdt) for x in (q, k, v, i, f))
        out = recurrent_sequence_fw(
            q, k, v, i, f, c_initial, n_initial, m_initial,
            return_last_states=return_last_states, eps=c.eps, state_dtype=c.state_dtype,
            use_scan=c.use_scan, mlstm_step_fn=seed_step_fn("recurrent_pallas"),
            segment_ids=segment_ids, input_gate=c.input_gate,
        )
        if return_last_states:
            h, states = out
            return h.astype(out_dtype), states
        return out.astype(out_dtype)

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension (the kernel takes heads): False."""
        return False
