"""Inference for mLSTM models: prefill a prompt, then decode step by step; and serve batches.

Two levels, one story:

* ``xlstm_jax.inference.decode``: functions over arrays and state tuples for one layer or a stack of
  mLSTM layers (``prefill`` with a registered sequence kernel, ``decode_step`` with a registered step
  kernel, ``decode_loop``), all jit-compatible. The language model's decoding step calls
  ``decode_step`` for every cell.
* ``xlstm_jax.inference.generation``: what serving needs on top, for any model that supplies a
  prefill and a decode function: right padding that leaves the cell state untouched
  (``mask_gates``), per-row sampling (``sample_rows``), length/batch buckets, and the streaming loop
  (``stream_tokens``). ``xlstm_jax.models.xlstm_lm.generate`` plugs the language model into it.
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
from .generation import (
    PAD_FORGET_GATE,
    PAD_INPUT_GATE,
    PASS_THROUGH_GATES,
    bucket,
    check_prompts,
    mask_gates,
    pad_prompts,
    row_keys,
    sample_logits,
    sample_rows,
    stream_tokens,
)

__all__ = [
    "CellOptions",
    "Layer",
    "MLSTMState",
    "PAD_FORGET_GATE",
    "PAD_INPUT_GATE",
    "PASS_THROUGH_GATES",
    "StackState",
    "bucket",
    "cast_state",
    "check_prompts",
    "decode_loop",
    "decode_sequence",
    "decode_step",
    "default_prefill_kernel",
    "init_stack_state",
    "init_state",
    "mask_gates",
    "pad_prompts",
    "prefill",
    "row_keys",
    "sample_logits",
    "sample_rows",
    "stack_decode_step",
    "stack_prefill",
    "stream_tokens",
]
