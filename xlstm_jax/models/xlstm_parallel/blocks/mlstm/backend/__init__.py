"""mLSTM backends: Flax modules that translate a config into one kernel call, and their registry.

``create_mlstm_backend(name, **config_kwargs)`` builds a backend from its registered name;
``create_mlstm_backend_config(name, **kwargs)`` builds only its config; ``available_mlstm_backends()``
lists the names. Unknown names and unknown config keywords raise ``ValueError`` listing the valid ones.
Every backend reaches its kernel through the kernel registry (``xlstm_jax.kernels``) only.

The built-in backends, registered by ``_load_builtin_backends`` on first use of the registry:

    name                  module              class                          kernel
    recurrent             recurrent.py        mLSTMBackendRecurrent          recurrent_native (seed 004)
    parallel_stabilized   simple.py           mLSTMBackendParallel           parallel_native
    fwbw_stabilized       fwbw.py             mLSTMBackendFwbw               chunkwise_native
    triton_kernels        triton_kernels.py   mLSTMBackendTriton             chunkwise_pallas (seed 002)
    recurrent_triton      recurrent_triton.py mLSTMBackendRecurrentTriton    step kernel recurrent_pallas
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import mLSTMBackend, mLSTMBackendConfig

_REGISTRY: dict[str, type[mLSTMBackend]] = {}
_loaded = False


def _load_builtin_backends() -> None:
    """Import and register the built-in backends (see the module docstring)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .fwbw import mLSTMBackendFwbw
    from .recurrent import mLSTMBackendRecurrent
    from .recurrent_triton import mLSTMBackendRecurrentTriton
    from .simple import mLSTMBackendParallel
    from .triton_kernels import mLSTMBackendTriton

    for name, cls in (
        ("recurrent", mLSTMBackendRecurrent),
        ("parallel_stabilized", mLSTMBackendParallel),
        ("fwbw_stabilized", mLSTMBackendFwbw),
        ("triton_kernels", mLSTMBackendTriton),
        ("recurrent_triton", mLSTMBackendRecurrentTriton),
    ):
        _REGISTRY.setdefault(name, cls)


def register_mlstm_backend(name: str, backend_class: type[mLSTMBackend]) -> None:
    """Register ``backend_class`` (a subclass of ``mLSTMBackend`` with ``config_class``) as ``name``."""
    if not (isinstance(backend_class, type) and issubclass(backend_class, mLSTMBackend)):
        raise ValueError(f"{backend_class!r} is not a subclass of mLSTMBackend")
    _REGISTRY[name] = backend_class


def available_mlstm_backends() -> list[str]:
    """Names of the registered mLSTM backends, sorted."""
    _load_builtin_backends()
    return sorted(_REGISTRY)


def get_mlstm_backend_class(name: str) -> type[mLSTMBackend]:
    """The backend class registered as ``name``; ``ValueError`` listing the valid names if unknown."""
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mLSTM backend {name!r}; available: {', '.join(available_mlstm_backends())}")
    return _REGISTRY[name]


def backend_supports_training(name: str) -> bool:
    """Whether gradients flow through backend ``name`` (forward-only backends are for inference)."""
    return bool(get_mlstm_backend_class(name).supports_training)


def create_mlstm_backend_config(name: str, **kwargs: Any) -> mLSTMBackendConfig:
    """The config of backend ``name`` with ``kwargs`` set; unknown keywords raise ``ValueError``."""
    config_class = get_mlstm_backend_class(name).config_class
    fields = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"backend {name!r} has no config field(s) {unknown}; its fields are {fields}")
    return config_class(**kwargs)


def create_mlstm_backend(name: str, model_config: Any = None, **kwargs: Any) -> mLSTMBackend:
    """Build backend ``name``: its config from ``kwargs``, then ``assign_model_config_params``."""
    config = create_mlstm_backend_config(name, **kwargs)
    if model_config is not None:
        config.assign_model_config_params(model_config)
    return get_mlstm_backend_class(name)(config=config)


__all__ = [
    "available_mlstm_backends",
    "backend_supports_training",
    "create_mlstm_backend",
    "create_mlstm_backend_config",
    "get_mlstm_backend_class",
    "mLSTMBackend",
    "mLSTMBackendConfig",
    "register_mlstm_backend",
]
