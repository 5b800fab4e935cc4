"""Configuration of the xLSTM language model (xLSTM-7B-style blocks) and named size presets.

Notation (as in ``xlstm_jax.kernels._common``):

    B     batch size                 S     sequence length
    E     embedding dimension        V     vocabulary size
    NH    number of heads            NB    number of blocks
    DHQK  query/key head dimension   DHV   value head dimension
    F     feed-forward inner dimension

``qk_dim = round(E * qk_dim_factor)`` and ``v_dim = round(E * v_dim_factor)`` are split evenly over
the NH heads (DHQK = qk_dim / NH, DHV = v_dim / NH); ``F = ffn_proj_factor * E`` rounded up to a
multiple of ``ffn_round_up_to_multiple_of`` (transformers' rule ``((x + m - 1) // m) * m``).

The defaults follow the released xLSTM-7B (transformers' ``xLSTMConfig``): RMS pre-norms, a per-head
layer norm on the cell output, soft-capped gates and logits. ``xlstm_jax.models.xlstm_lm.hf`` maps
this config to and from a transformers checkpoint directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from xlstm_jax.kernels.options import INPUT_GATES

_DTYPES = ("float32", "bfloat16", "float16", "float64")
MULTIHEAD_NORMS = ("layernorm", "rms")
REMAT_POLICIES = ("full", "dots")


@dataclasses.dataclass(frozen=True)
class xLSTMLMConfig:
    """All hyperparameters of ``xLSTMLMModel``; JSON round trip with ``to_dict``/``from_dict``.

    The mLSTM cell runs through the backend named ``mlstm_backend`` (see
    ``xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.available_mlstm_backends``) configured by
    ``mlstm_backend_kwargs``; token-by-token decoding uses the step kernel ``mlstm_step_kernel``
    (``xlstm_jax.kernels.available_mlstm_step_kernels``). Both change speed, never results.
    """

    vocab_size: int = 256
    """V: number of token ids (256 for the byte tokenizer)."""
    embedding_dim: int = 128
    """E: width of the residual stream."""
    num_heads: int = 4
    """NH: mLSTM heads per layer (split over the mesh's tensor axis)."""
    num_blocks: int = 4
    """NB: number of (mLSTM layer + feed-forward) blocks."""
    context_length: int = 256
    """Training sequence length; handed to backends through ``assign_model_config_params``."""
    qk_dim_factor: float = 0.5
    """qk_dim = E * qk_dim_factor (summed over heads)."""
    v_dim_factor: float = 1.0
    """v_dim = E * v_dim_factor (summed over heads)."""
    gate_soft_cap: float | None = 15.0
    """Soft cap ``c * tanh(x / c)`` on the input and forget gate pre-activations (None: off)."""
    output_logit_soft_cap: float | None = 30.0
    """Soft cap on the output logits (None: off)."""
    ffn_proj_factor: float = 2.667
    """F = E * ffn_proj_factor, rounded up to ``ffn_round_up_to_multiple_of``."""
    ffn_round_up_to_multiple_of: int = 64
    """Rounding multiple of F."""
    norm_eps: float = 1e-6
    """Epsilon of the norms (pre-norms, multi-head norm, final norm)."""
    norm_reduction_force_float32: bool = True
    """Reduce the pre-norms and the multi-head norm in float32 (False: in ``dtype``; the final norm
    always reduces in float32, as transformers' xLSTM does)."""
    multihead_norm: str = "layernorm"
    """Norm of the cell output h, per head: ``"layernorm"`` (subtract the head's mean, divide by its
    standard deviation: xLSTM-7B) or ``"rms"`` (divide by the root mean square). Configs written
    before this field existed used "rms" (``from_dict`` keeps them so)."""
    use_bias: bool = False
    """Biases on the q/k/v/output-gate/out projections, the feed-forward projections and the block
    norms (pre-norms and multi-head norm; never the final norm), as transformers' ``use_bias``."""
    igate_bias_init: float = -10.0
    """Initial bias of the input gate pre-activation (all heads)."""
    fgate_bias_init_range: tuple[float, float] = (3.0, 6.0)
    """Initial forget gate biases, linearly spaced over the heads."""
    tie_embeddings: bool = False
    """Use the transposed embedding matrix as the LM head."""
    mlstm_backend: str = "fwbw_stabilized"
    """Name of the mLSTM backend that runs the cell over a sequence (training, prefill)."""
    mlstm_backend_kwargs: tuple[tuple[str, Any], ...] = ()
    """Config fields of that backend, as (name, value) pairs (a dict is accepted and converted)."""
    input_gate: str = "exp"
    """Input gate of the mLSTM cell: "exp" (xLSTM-7B) or "sigmoid" (mLSTMsig: no max state); given
    to the backend (and so to decoding) as its ``input_gate`` cell option."""
    mlstm_step_kernel: str = "recurrent_native"
    """Name of the single-step kernel used for token-by-token decoding."""
    dtype: str = "float32"
    """Compute dtype of activations and matrix products (gates and norms always in float32+)."""
    param_dtype: str = "float32"
    """Dtype of the parameters (and optimizer state)."""
    remat: bool = False
    """Recompute each block's activations in the backward pass (saves memory on large models)."""
    remat_policy: str = "dots"
    """What ``remat`` keeps from the forward pass: ``"full"`` nothing but the block inputs (every
    activation is recomputed), ``"dots"`` also the outputs of the matrix products without batch
    dimensions (the projections and the feed-forward: ``jax.checkpoint_policies.
    dots_with_no_batch_dims_saveable``; the cell and the element-wise work are recomputed). Speed and
    memory only, never results; ignored when ``remat`` is False. Default ``"dots"``, measured
    (H200, 2026-12-01, 350m preset B16 S2048): 150.4k tokens/s against 132.2k with ``"full"``
    (+14%), 27.0 GiB peak against 11.2 GiB; use ``"full"`` where memory is short."""
    fused_projections: bool = False
    """Compute the q, k, v and output-gate projections of each mLSTM layer as one matrix product with
    the four kernels concatenated at apply time (the parameter tree stays the same: four ``Dense``
    entries). Speed only; the two float32 gate projections stay separate. Meant for meshes without a
    tensor axis (one GPU, data / FSDP): with tensor parallelism the concatenation of column-sharded
    kernels costs communication."""
    residual_in_compute_dtype: bool = False
    """Keep the residual stream (the embedding output and every block's input and output) in
    ``dtype`` instead of ``promote(dtype, param_dtype)`` (float32 with float32 parameters, the
    default). With bfloat16 compute this halves the bytes that the residual adds, the pre-norms and
    their gradients and the activations saved for the backward pass move, and rounds the residual
    to bfloat16 after every block: results change at bfloat16 precision (compare loss curves before
    relying on it). No effect when ``dtype`` is not narrower than ``param_dtype``."""
    bos_token_id: int | None = None
    """Token id that starts a document (tokenizer metadata; None: none, as for the byte tokenizer)."""
    eos_token_id: int | None = None
    """Token id that ends a document: generation stops a row there (None: never stops early)."""
    pad_token_id: int | None = None
    """Token id used for padding (metadata only: padding never changes results here)."""

    def __post_init__(self):
        kw = self.mlstm_backend_kwargs
        if isinstance(kw, dict):
            kw = tuple(sorted(kw.items()))
        else:
            kw = tuple(sorted((str(k), v) for k, v in kw))
        object.__setattr__(self, "mlstm_backend_kwargs", kw)
        object.__setattr__(self, "fgate_bias_init_range", tuple(float(x) for x in self.fgate_bias_init_range))
        for name in ("vocab_size", "embedding_dim", "num_heads", "num_blocks", "context_length",
                     "ffn_round_up_to_multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}; got {getattr(self, name)!r}")
        if self.input_gate not in INPUT_GATES:
            raise ValueError(f"input_gate must be one of {INPUT_GATES}; got {self.input_gate!r}")
        if dict(kw).get("input_gate", self.input_gate) != self.input_gate:
            raise ValueError(
                f"mlstm_backend_kwargs input_gate={dict(kw)['input_gate']!r} differs from input_gate="
                f"{self.input_gate!r}; set the model config's input_gate"
            )
        if self.multihead_norm not in MULTIHEAD_NORMS:
            raise ValueError(f"multihead_norm must be one of {MULTIHEAD_NORMS}; got {self.multihead_norm!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}; got {self.remat_policy!r}")
        for name in ("use_bias", "tie_embeddings", "remat", "norm_reduction_force_float32", "fused_projections",
                     "residual_in_compute_dtype"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps >= 0):
            raise ValueError(f"norm_eps must be a number >= 0; got {self.norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be None or an int in [0, vocab_size={self.vocab_size}); got {value!r}")
        if len(self.fgate_bias_init_range) != 2:
            raise ValueError(f"fgate_bias_init_range must be (low, high); got {self.fgate_bias_init_range}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None; got {value!r}")
        E, NH = self.embedding_dim, self.num_heads
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < NH or dim % NH:
                raise ValueError(
                    f"{name} = {dim} (embedding_dim {E} x {name}_factor) must be a positive multiple of "
                    f"num_heads {NH}"
                )

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_dim(self) -> int:
        """Query/key width summed over heads (NH * DHQK)."""
        return int(round(self.embedding_dim * self.qk_dim_factor))

    @property
    def v_dim(self) -> int:
        """Value width summed over heads (NH * DHV)."""
        return int(round(self.embedding_dim * self.v_dim_factor))

    @property
    def qk_head_dim(self) -> int:
        """DHQK."""
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """DHV."""
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """F: the feed-forward inner width."""
        m = self.ffn_round_up_to_multiple_of
        return int(((self.embedding_dim * self.ffn_proj_factor + m - 1) // m) * m)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a NumPy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """``param_dtype`` as a NumPy dtype."""
        return jnp.dtype(self.param_dtype)

    @property
    def backend_kwargs(self) -> dict[str, Any]:
        """``mlstm_backend_kwargs`` as a dict, with ``input_gate`` when it is not the default "exp",
        and for the ``triton_kernels`` backend ``chunk_size=None`` (the kernel's tuned / heuristic
        chunk rule instead of the seed config's 64) unless a chunk size is given."""
        kw = dict(self.mlstm_backend_kwargs)
        if self.mlstm_backend == "triton_kernels":
            kw.setdefault("chunk_size", None)
        if self.input_gate != "exp":
            kw["input_gate"] = self.input_gate
        return kw

    def num_params(self) -> int:
        """Exact parameter count of the model this config builds."""
        E, V, F = self.embedding_dim, self.vocab_size, self.ffn_dim
        NH, QK, VD = self.num_heads, self.qk_dim, self.v_dim
        b = int(self.use_bias)
        mlstm = 2 * (E * QK + b * QK) + 2 * (E * VD + b * VD) + 2 * (E * NH + NH) + (1 + b) * VD + (VD * E + b * E)
        ffn = 2 * (E * F + b * F) + (F * E + b * E)
        block = mlstm + ffn + 2 * (1 + b) * E  # two pre-norms (with biases when use_bias)
        head = 0 if self.tie_embeddings else E * V
        return V * E + self.num_blocks * block + E + head

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["mlstm_backend_kwargs"] = dict(self.mlstm_backend_kwargs)
        d["fgate_bias_init_range"] = list(self.fgate_bias_init_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "xLSTMLMConfig":
        """Build a config from ``to_dict`` output; unknown keys raise ``ValueError``.

        A dict without ``multihead_norm`` was written before that field existed, when the multi-head
        norm was an RMS norm: it gets ``multihead_norm="rms"``, so old run directories restore the
        model they trained.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown xLSTMLMConfig field(s) {unknown}; fields are {sorted(fields)}")
        d = dict(d)
        d.setdefault("multihead_norm", "rms")
        return cls(**d)

    def replace(self, **changes: Any) -> "xLSTMLMConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# Named sizes. "demo" is the default of `xlstm-jax train` (a few minutes on a CPU); "tiny" is for
# tests; "350m" is the multi-GPU check (~354M parameters with the byte vocabulary); "1.3b" is the
# one-GPU throughput size (~1.32B parameters with the byte vocabulary: E = 2048 with xLSTM-7B's head
# dimensions DHQK = 256, DHV = 512 (NH = 4) and ratios, 26 blocks); "7b" is the
# architecture of the released xLSTM-7B (NX-AI/xLSTM-7b: GPT-NeoX vocabulary of 50304, 6.9B
# parameters; trained at context 8192), for benchmarks and as the shape of loaded checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embedding_dim=32, num_heads=2, num_blocks=2, context_length=32, ffn_round_up_to_multiple_of=16),
    "demo": dict(embedding_dim=128, num_heads=4, num_blocks=4, context_length=128),
    "350m": dict(embedding_dim=1024, num_heads=8, num_blocks=28, context_length=2048, remat=True),
    "1.3b": dict(
        embedding_dim=2048, num_heads=4, num_blocks=26, context_length=2048, qk_dim_factor=0.5,
        v_dim_factor=1.0, ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64, remat=True,
    ),
    "7b": dict(
        vocab_size=50304, embedding_dim=4096, num_heads=8, num_blocks=32, context_length=8192,
        qk_dim_factor=0.5, v_dim_factor=1.0, ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64,
        gate_soft_cap=15.0, output_logit_soft_cap=30.0, norm_eps=1e-6, remat=True,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
}


def preset_config(name: str, **overrides: Any) -> xLSTMLMConfig:
    """The config of preset ``name`` with ``overrides``; ``ValueError`` listing presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(xLSTMLMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown xLSTMLMConfig field(s) {unknown}; fields are {sorted(fields)}")
    return xLSTMLMConfig(**{**PRESETS[name], **overrides})
