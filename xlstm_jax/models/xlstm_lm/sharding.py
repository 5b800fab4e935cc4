"""Device meshes and parameter sharding of the xLSTM language model.

Notation: B batch, S sequence length, E embedding dim, V vocabulary, NH heads, NB blocks,
F feed-forward width; ``P`` is ``jax.sharding.PartitionSpec``.

The mesh has three axes (``MESH_AXES``):

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split AND every parameter is split (one dimension each, FSDP / ZeRO-3 style);
            XLA gathers a weight where it is used and reduce-scatters its gradient
    tensor  heads (and the feed-forward inner width) are split: the q/k/v/output-gate/gate
            projections are split by their output columns, the output projections by their input rows

Activations carry the batch over ``BATCH_AXES = ("data", "fsdp")``; inside every mLSTM layer the kernel
runs per device under ``jax.shard_map`` on (B / (data * fsdp), NH / tensor) slices of the heads.

``param_partition_specs(params, mesh)`` gives a ``PartitionSpec`` per parameter from its name; a
dimension that the mesh axis does not divide stays unsplit (so tiny test models run on any mesh).
Parameters inside the block stack have a leading block dimension NB, never split.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)

# (module name, parameter name) -> axis per trailing dimension of the parameter
_RULES: dict[tuple[str, str], tuple[Any, ...]] = {
    # mLSTM layer: column-parallel in-projections (output columns are head-major), row-parallel out
    ("q", "kernel"): (FSDP, TENSOR),
    ("k", "kernel"): (FSDP, TENSOR),
    ("v", "kernel"): (FSDP, TENSOR),
    ("ogate", "kernel"): (FSDP, TENSOR),
    ("igate", "kernel"): (FSDP, TENSOR),
    ("fgate", "kernel"): (FSDP, TENSOR),
    ("q", "bias"): (TENSOR,),
    ("k", "bias"): (TENSOR,),
    ("v", "bias"): (TENSOR,),
    ("ogate", "bias"): (TENSOR,),
    ("igate", "bias"): (TENSOR,),
    ("fgate", "bias"): (TENSOR,),
    ("mh_norm", "scale"): (TENSOR,),
    ("mh_norm", "bias"): (TENSOR,),
    ("out_proj", "kernel"): (TENSOR, FSDP),
    ("out_proj", "bias"): (None,),
    # feed-forward: inner width split over tensor
    ("up_gate", "kernel"): (FSDP, TENSOR),
    ("up", "kernel"): (FSDP, TENSOR),
    ("up_gate", "bias"): (TENSOR,),
    ("up", "bias"): (TENSOR,),
    ("down", "kernel"): (TENSOR, FSDP),
    ("down", "bias"): (None,),
    # norms: small, replicated
    ("norm_mlstm", "scale"): (None,),
    ("norm_ffn", "scale"): (None,),
    ("norm_mlstm", "bias"): (None,),
    ("norm_ffn", "bias"): (None,),
    ("out_norm", "scale"): (None,),
    # embedding (V, E) and head (E, V)
    ("embedding", "embedding"): (None, FSDP),
    ("lm_head", "kernel"): (FSDP, TENSOR),
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``shape = (data, fsdp, tensor)`` over ``devices`` (default: the first
    data*fsdp*tensor of ``jax.devices()``), with automatic (GSPMD) axis types."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"mesh shape must be three positive ints (data, fsdp, tensor); got {shape}")
    n = int(np.prod(shape))
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        raise ValueError(f"mesh shape {shape} needs {n} devices; only {len(devices)} available: {devices}")
    return Mesh(np.array(devices[:n]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_shape(mesh: Mesh) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of ``mesh``."""
    return tuple(mesh.shape[a] for a in MESH_AXES)


def validate_mesh(mesh: Mesh, *, num_heads: int, batch_size: int | None = None) -> None:
    """Heads must split evenly over ``tensor`` and the batch over ``data * fsdp``."""
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes must be {MESH_AXES}; got {tuple(mesh.axis_names)}")
    d, f, t = mesh_shape(mesh)
    if num_heads % t:
        raise ValueError(f"num_heads {num_heads} is not divisible by the mesh's tensor axis {t} (mesh {d, f, t})")
    if batch_size is not None and batch_size % (d * f):
        raise ValueError(
            f"batch size {batch_size} is not divisible by data x fsdp = {d * f} (mesh {d, f, t})"
        )


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The ``PartitionSpec`` of one parameter, from its module/parameter names (see ``_RULES``)."""
    if len(path) < 2 or (path[-2], path[-1]) not in _RULES:
        raise ValueError(f"no sharding rule for parameter {'/'.join(path)} of shape {shape}")
    rule = _RULES[(path[-2], path[-1])]
    lead = len(shape) - len(rule)
    if lead not in (0, 1) or (lead == 1 and "blocks" not in path):
        raise ValueError(f"parameter {'/'.join(path)} has shape {shape}; its rule {rule} expects rank {len(rule)}")
    axes = []
    for dim, axis in zip(shape[lead:], rule):
        axes.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
    return P(*([None] * lead + axes))


def param_partition_specs(params: Any, mesh: Mesh) -> Any:
    """A tree of ``PartitionSpec`` matching ``params`` (arrays or ``ShapeDtypeStruct``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_partition_spec(tuple(_key_name(e) for e in path), tuple(x.shape), mesh), params
    )


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` for every ``PartitionSpec`` leaf of ``specs``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, ...) batch: B over ``BATCH_AXES``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())
