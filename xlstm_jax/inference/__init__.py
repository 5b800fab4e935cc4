"""Inference for stacks of mLSTM layers: prefill a prompt, then decode step by step.

See ``xlstm_jax.inference.decode`` for the notation and the usage pattern. Functions over arrays and
state tuples, all jit-compatible; sequence kernels and step kernels come from the kernel registry.
"""

from xlstm_jax.kernels import MLSTMState

from .decode import (
    CellOptions,
    Layer,
    StackState,
    cast_state,
    decode_loop,
    decode_sequence,
    decode_step,
    default_prefill_kernel,
    init_stack_state,
    init_state,
    prefill,
    stack_decode_step,
    stack_prefill,
)

__all__ = [
    "CellOptions",
    "Layer",
    "MLSTMState",
    "StackState",
    "cast_state",
    "decode_loop",
    "decode_sequence",
    "decode_step",
    "default_prefill_kernel",
    "init_stack_state",
    "init_state",
    "prefill",
    "stack_decode_step",
    "stack_prefill",
]
