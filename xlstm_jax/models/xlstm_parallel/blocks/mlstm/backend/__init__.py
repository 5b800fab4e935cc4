"""mLSTM backends: Flax modules that translate a config into one kernel call, and their registry.

``create_mlstm_backend(name, **config_kwargs)`` builds a backend from its registered name;
``create_mlstm_backend_config(name, **kwargs)`` builds only its config; ``available_mlstm_backends()``
lists the names. Unknown names and unknown config keywords raise ``ValueError`` listing the valid ones.
Backend modules register themselves at import (``register_mlstm_backend``); the modules below are
imported on first use of the registry.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .config import mLSTMBackend, mLSTMBackendConfig

_BACKEND_MODULES = {
    # name -> module that defines it
    "recurrent": ("xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent", "mLSTMBackendRecurrent"),
    "parallel_stabilized": ("xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.simple", "mLSTMBackendParallel"),
    "fwbw_stabilized": ("xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.fwbw", "mLSTMBackendFwbw"),
    "triton_kernels": ("xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.triton_kernels", "mLSTMBackendTriton"),
    "recurrent_triton": (
        "xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent_triton", "mLSTMBackendRecurrentTriton"
    ),
}

_REGISTRY: dict[str, type[mLSTMBackend]] = {}


def register_mlstm_backend(name: str, backend_class: type[mLSTMBackend]) -> None:
    """Register ``backend_class`` (a subclass of ``mLSTMBackend`` with ``config_class``) as ``name``."""
    if not (isinstance(backend_class, type) and issubclass(backend_class, mLSTMBackend)):
        raise ValueError(f"{backend_class!r} is not a subclass of mLSTMBackend")
    _REGISTRY[name] = backend_class


def available_mlstm_backends() -> list[str]:
    """Names of the registered mLSTM backends, sorted."""
    return sorted(set(_REGISTRY) | set(_BACKEND_MODULES))


def get_mlstm_backend_class(name: str) -> type[mLSTMBackend]:
    """The backend class registered as ``name``; ``ValueError`` listing the valid names if unknown."""
    if name not in _REGISTRY:
        if name not in _BACKEND_MODULES:
            raise ValueError(
                f"unknown mLSTM backend {name!r}; available: {', '.join(available_mlstm_backends())}"
            )
        module, cls = _BACKEND_MODULES[name]
        register_mlstm_backend(name, getattr(importlib.import_module(module), cls))
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
