"""The xLSTM language model (xLSTM-7B-style blocks) on the mLSTM backends.

``xLSTMLMConfig`` / ``preset_config`` configure it, ``xLSTMLMModel`` is the Flax module,
``generate`` decodes text (prefill with the backend, then the step kernel), and ``sharding`` maps
it onto a (data, fsdp, tensor) device mesh.
"""

from .config import PRESETS, preset_config, xLSTMLMConfig
from .generate import decode_step, generate, prefill, sample_logits
from .model import init_params, xLSTMLMModel

__all__ = [
    "PRESETS",
    "decode_step",
    "generate",
    "init_params",
    "prefill",
    "preset_config",
    "sample_logits",
    "xLSTMLMConfig",
    "xLSTMLMModel",
]
