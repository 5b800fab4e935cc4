"""The base of every mLSTM backend: a Flax module with a ``config`` that calls one registered kernel.

A backend only translates its config into a kernel call (``xlstm_jax.kernels.get_mlstm_kernel``);
its cell options (eps, norm_val, stabilize_correctly, grad_mode, ...) are the config's flat fields,
gathered into one ``xlstm_jax.kernels.CellOptions`` by ``mLSTMBackendConfig.cell_options`` and
validated when the config is created.
Call signature of every backend (the seeds')::

    backend(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
            segment_ids=None)

q, k (B, NH, S, DHQK); v (B, NH, S, DHV); i, f (B, NH, S) or (B, NH, S, 1); initial states
(B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH). Returns h (B, NH, S, DHV), and with
``return_last_states`` also ``(c, n, m)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax

from xlstm_jax.kernels import CellOptions, get_mlstm_kernel

_CELL_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(CellOptions))


@dataclasses.dataclass
class mLSTMBackendConfig:
    """Base of the backend configs. ``assign_model_config_params`` copies what a backend needs
    from the model config (by default nothing).

    A config's fields named like ``CellOptions`` fields (qk_scale, eps, norm_val,
    stabilize_correctly, grad_mode, input_gate) are its cell options; the others keep their
    ``CellOptions`` defaults. They are validated at construction (``ValueError``).
    """

    def __post_init__(self):
        self.cell_options  # noqa: B018 - validates the cell-option fields

    @property
    def cell_options(self) -> CellOptions:
        """The cell options of this config (its fields named like ``CellOptions`` fields)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _CELL_OPTION_FIELDS}
        return CellOptions(**own)

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take the parameters this backend needs from ``model_config``; the base needs none."""
        del model_config


class mLSTMBackend(nn.Module):
    """Base class of the mLSTM backends (a Flax module holding its ``config``).

    Subclasses set ``config_class`` and implement ``kernel_call`` (name and options of the kernel)
    or override ``__call__``.
    """

    config: Any
    config_class: ClassVar[type] = mLSTMBackendConfig
    supports_training: ClassVar[bool] = True
    """Whether gradients flow through this backend (False: forward only, inference)."""

    def kernel_call(self, seq_len: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(kernel name, kernel options, call options) for this config and sequence length."""
        raise NotImplementedError(f"{type(self).__name__} must implement kernel_call or __call__")

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend may be vmapped over the heads dimension (kernels take heads: no)."""
        return False

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
        name, options, call_options = self.kernel_call(q.shape[2])
        kernel = get_mlstm_kernel(name, **options)
        return kernel(
            q, k, v, i, f, c_initial, n_initial, m_initial,
            return_last_states=return_last_states, segment_ids=segment_ids, **call_options,
        )
