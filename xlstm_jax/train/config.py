"""Configuration of a training run (``TrainConfig``) and the checks of a run's settings.

``TrainConfig`` holds the optimizer, data and bookkeeping settings of a run (the model has its own
``xLSTMLMConfig``); it validates each field on construction. ``check_run_settings(model_config, tc)``
checks what depends on both configs and on the machine (the backend can train, the step kernel
exists, the sequence fits the context, the mesh fits the devices, heads and batch); it has no side
effects, so a caller (the CLI) can run it before anything is created. Both raise ``ValueError``
naming the setting, the value and, where there is a list, the valid values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

# Fields that define a run: a resumed run must have the same values (see ``run.check_run_dir``).
# The others (steps, intervals, mesh, run directory) may change between the segments of one run.
RUN_DEFINING_FIELDS = (
    "data", "batch_size", "seq_len", "seed", "learning_rate", "warmup_steps", "min_lr_ratio",
    "weight_decay", "grad_clip", "b1", "b2", "heldout_fraction", "init_from", "tokenizer", "pack", "doc_separator",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and bookkeeping of a training run (the model has its own ``xLSTMLMConfig``)."""

    out_dir: str = "runs/default"
    """Run directory: config, checkpoints, metrics (see ``checkpoint.py``)."""
    data: tuple[str, ...] = ()
    """UTF-8 text files to train on; empty: the embedded CPython documentation corpus."""
    steps: int = 600
    """Total optimizer steps of the run (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Global batch size B (split over data x fsdp)."""
    seq_len: int = 0
    """Training sequence length S; 0: the model's context_length."""
    learning_rate: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up: update n (1-based) of the first ``warmup_steps`` uses n / warmup_steps of the
    peak rate, so the first update already trains."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) on weight matrices and the embedding."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eval_every: int = 50
    """Evaluate on the held-out split every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Held-out batches per evaluation (0: no evaluation)."""
    checkpoint_every: int = 200
    """Save a checkpoint every this many steps (0: only at the end and on interrupt)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    log_every: int = 10
    """Progress bar / console update interval in steps (every step's loss goes to metrics.jsonl)."""
    heldout_fraction: float = 0.05
    """Fraction of the text (its end) held out for evaluation."""
    seed: int = 0
    """Seed of parameters, data order and the training RNG."""
    mesh: tuple[int, int, int] | None = None
    """(data, fsdp, tensor) device mesh; None: a single device, no mesh (a multi-process run needs a
    mesh over the devices of all processes)."""
    checkpoints: bool = True
    """Write checkpoints (off for throughput measurements)."""
    init_from: str | None = None
    """A transformers ``xLSTMForCausalLM`` checkpoint directory (``models.xlstm_lm.hf``) whose weights
    are the initial parameters (fine-tuning); None: random initial parameters from ``seed``. Only a
    fresh run reads it; a resumed run continues from its own checkpoints."""
    tokenizer: str = "bytes"
    """The tokenizer of the training text: "bytes" (UTF-8 bytes), or the path of a ``tokenizer.json``
    or of a directory with one (``xlstm_jax.text.load_tokenizer``); recorded in the run directory so
    that ``generate --run-dir`` uses the same one."""
    cast_params: bool = False
    """Cast the weights used in the compute dtype to it once per step, before the forward pass
    (``xlstm_jax.models.xlstm_lm.model.cast_compute_params``; the float32 master parameters and the
    optimizer are unchanged). Speed only, never results."""
    unroll_blocks: bool = False
    """Run the blocks of the training step as a Python loop (``xLSTMLMModel(unrolled=True)`` on the
    stacked parameters sliced per block inside the step) instead of one ``nn.scan``: no stacked
    buffers of the saved activations (their zero fill and the copies in and out of them), at the
    cost of compile time growing with depth. The parameter tree, checkpoints and results are those
    of the scan (same function). Speed only, never results."""
    pack: bool = True
    """Pack documents: batches carry segment ids, every document starts from the empty cell state
    and no target is predicted across a document border (``packing.py``); False: one token stream."""
    doc_separator: str | None = None
    """Split every ``data`` file into documents on this string (None: one document per file)."""

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"init_from must be a checkpoint directory path or None; got {self.init_from!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer must be 'bytes' or a tokenizer.json path; got {self.tokenizer!r}")
        if self.mesh is not None:
            mesh = tuple(self.mesh)
            if len(mesh) != 3 or not all(_is_int(m) and m >= 1 for m in mesh):
                raise ValueError(f"mesh must be three positive ints (data, fsdp, tensor); got {self.mesh!r}")
            object.__setattr__(self, "mesh", tuple(int(m) for m in mesh))
        if not isinstance(self.cast_params, bool):
            raise ValueError(f"cast_params must be a bool; got {self.cast_params!r}")
        if not isinstance(self.unroll_blocks, bool):
            raise ValueError(f"unroll_blocks must be a bool; got {self.unroll_blocks!r}")
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        for name in ("seq_len", "warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if not _finite(self.learning_rate) or not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1]; got {self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not _finite(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must lie in [0, 1); got {value!r}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack must be a bool; got {self.pack!r}")
        if self.doc_separator is not None and (not isinstance(self.doc_separator, str) or not self.doc_separator):
            raise ValueError(f"doc_separator must be None or a non-empty string; got {self.doc_separator!r}")
        if not _finite(self.heldout_fraction) or not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in (0, 1); got {self.heldout_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        d["mesh"] = list(self.mesh) if self.mesh is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        d = dict(d)
        if d.get("mesh") is not None:
            d["mesh"] = tuple(d["mesh"])
        return cls(**d)


class RunSettingError(ValueError):
    """A ``ValueError`` of ``check_run_settings`` that names the config field at fault in ``setting``
    (``mlstm_backend``, ``mlstm_backend_kwargs``, ``mlstm_step_kernel``, ``seq_len``, ``mesh``), so
    that a front end can name its own option for it."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sequence_length(model_config: Any, tc: TrainConfig) -> int:
    """The training sequence length S of a run: ``tc.seq_len``, or the model's context length."""
    return tc.seq_len or model_config.context_length


def check_run_settings(model_config: Any, tc: TrainConfig, devices: Sequence[Any] | None = None) -> None:
    """Check the settings that depend on both configs and on the machine; no side effects.

    - the sequence backend is registered and has a backward pass (forward-only backends such as
      ``recurrent_triton`` are for inference);
    - its config accepts ``mlstm_backend_kwargs`` (names and values);
    - the step kernel used for generation is registered;
    - the training sequence length does not exceed the model's context length;
    - the mesh needs no more devices than there are (``devices``: default ``jax.devices()``), the
      heads divide by its tensor axis and the batch by data x fsdp; a multi-process run has a mesh,
      over all devices of all its processes.

    Raises ``RunSettingError`` (a ``ValueError``) naming the setting and the valid values.
    """
    from xlstm_jax.kernels import available_mlstm_step_kernels
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
        available_mlstm_backends,
        backend_supports_training,
        create_mlstm_backend_config,
    )

    backend = model_config.mlstm_backend
    backends = available_mlstm_backends()
    if backend not in backends:
        raise RunSettingError("mlstm_backend", f"unknown mLSTM backend {backend!r}; available: {', '.join(backends)}")
    if not backend_supports_training(backend):
        trainable = [b for b in backends if backend_supports_training(b)]
        raise RunSettingError(
            "mlstm_backend",
            f"backend {backend!r} is forward-only (no backward pass) and cannot train; "
            f"backends that train: {', '.join(trainable)}"
        )
    try:
        create_mlstm_backend_config(backend, **model_config.backend_kwargs)  # unknown fields, bad values
    except (ValueError, TypeError) as err:
        raise RunSettingError("mlstm_backend_kwargs", str(err)) from None
    step_kernels = available_mlstm_step_kernels()
    if model_config.mlstm_step_kernel not in step_kernels:
        raise RunSettingError(
            "mlstm_step_kernel",
            f"unknown mLSTM step kernel {model_config.mlstm_step_kernel!r}; available: {', '.join(step_kernels)}"
        )
    if tc.seq_len > model_config.context_length:
        raise RunSettingError(
            "seq_len",
            f"seq_len {tc.seq_len} exceeds the model's context length {model_config.context_length}; "
            "raise the context length or shorten the sequences"
        )
    import jax

    processes = jax.process_count()
    if tc.mesh is None and processes > 1:
        raise RunSettingError(
            "mesh",
            f"a run of {processes} processes needs a mesh over the devices of all of them "
            f"({jax.device_count()} devices), e.g. ({jax.device_count()}, 1, 1)"
        )
    if tc.mesh is not None:
        import numpy as np

        available = len(jax.devices() if devices is None else devices)
        needed = int(np.prod(tc.mesh))
        if needed > available:
            where = "this machine has" if processes == 1 else f"the {processes} processes of the run have"
            raise RunSettingError(
                "mesh",
                f"mesh {tc.mesh} (data, fsdp, tensor) needs {needed} devices; {where} {available}"
            )
        if processes > 1 and needed != available:
            raise RunSettingError(
                "mesh",
                f"mesh {tc.mesh} (data, fsdp, tensor) uses {needed} devices; a run of {processes} processes "
                f"must use all {available} devices of its processes"
            )
        data, fsdp, tensor = tc.mesh
        if model_config.num_heads % tensor:
            raise RunSettingError(
                "mesh",
                f"num_heads {model_config.num_heads} is not divisible by the mesh's tensor axis {tensor} (mesh {tc.mesh})"
            )
        if tc.batch_size % (data * fsdp):
            raise RunSettingError(
                "mesh",
                f"batch size {tc.batch_size} is not divisible by data x fsdp = {data * fsdp} (mesh {tc.mesh})"
            )
