"""Test configuration: 8 simulated CPU devices (sharding tests), GPU-only tests skipped on CPU."""

import os

# must be set before JAX initialises its backends
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    if on_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (compiled Pallas); runs in scripts/gpu_suite.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
