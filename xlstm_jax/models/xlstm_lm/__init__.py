"""The xLSTM language model (the xLSTM-7B architecture) on the mLSTM backends.

``xLSTMLMConfig`` / ``preset_config`` configure it, ``xLSTMLMModel`` is the Flax module,
``generate`` / ``Generator`` decode text (prefill with the backend, then the step kernel, through
``xlstm_jax.inference``), ``load_pretrained`` / ``save_pretrained`` read and write transformers
``xLSTMForCausalLM`` checkpoint directories (``hf``), and ``sharding`` maps the model onto a
(data, fsdp, tensor) device mesh.
"""

from .config import PRESETS, preset_config, xLSTMLMConfig
from .generate import Generator, decode_step, generate, prefill, sample_logits
from .hf import config_from_hf, config_to_hf, load_pretrained, read_pretrained_config, save_pretrained
from .model import init_params, stack_block_params, unstack_block_params, xLSTMLMModel

__all__ = [
    "Generator",
    "PRESETS",
    "config_from_hf",
    "config_to_hf",
    "decode_step",
    "generate",
    "init_params",
    "load_pretrained",
    "prefill",
    "preset_config",
    "read_pretrained_config",
    "sample_logits",
    "save_pretrained",
    "stack_block_params",
    "unstack_block_params",
    "xLSTMLMConfig",
    "xLSTMLMModel",
]
