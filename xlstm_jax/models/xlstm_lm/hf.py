"""Checkpoints in the transformers ``xLSTMForCausalLM`` format (the released NX-AI/xLSTM-7B): in and out.

A checkpoint directory holds ``config.json`` (the fields of transformers' ``xLSTMConfig``) and the
weights as safetensors: one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
``load_pretrained`` reads one into ``(xLSTMLMModel, params)``; ``save_pretrained`` writes one that
transformers loads with ``xLSTMForCausalLM.from_pretrained`` and that gives the same logits.

The computation of transformers' xLSTM (5.x, its PyTorch code, read for this mapping) and ours:

* embedding (V, E); NB blocks of ``x + out_proj(sigmoid(o) * MultiHeadLayerNorm(cell(q, k, v, i, f)))``
  on ``RMSNorm(x)`` and ``x + proj_down(silu(proj_up_gate) * proj_up)`` on ``RMSNorm(x)``; a final
  RMS norm (always float32 reductions, no bias, applied whatever ``add_out_norm`` says); the LM head
  (its own weight ``lm_head.weight``: transformers does not tie it to the embedding even with
  ``tie_word_embeddings``); logits soft-capped ``c * tanh(x / c)`` in float32;
* q, k, v, o widths ``int(E * qk_dim_factor)`` / ``int(E * v_dim_factor)`` split over the heads (its
  cache rounds them up to multiples of 64: both agree for the released model); feed-forward width
  ``round_up(E * ffn_proj_factor, ffn_round_up_to_multiple_of)``; gates soft-capped at
  ``gate_soft_cap`` after their (always present) bias; the block norms carry a bias when
  ``use_bias`` and reduce in float32 when ``norm_reduction_force_float32``;
* the cell: ``qk_scale = DHQK ** -0.5``, normalizer ``max(|q . n|, exp(-m)) + eps`` (our
  ``norm_val=1``, ``stabilize_correctly=True``, ``eps = config.eps``), states from zero with m0 = 0
  (our recurrent/chunkwise convention); its kernel choices (chunkwise / sequence / step kernel,
  ``chunk_size``, ``mode``, ``autocast_kernel_dtype``, ``max_inference_chunksize``) change how, not
  what, it computes, and are not used here.

Weight names (``N`` the block; torch ``Linear`` weights are (out, in), our ``Dense`` kernels (in, out)):
``backbone.embeddings.weight``, ``backbone.blocks.N.norm_mlstm.{weight,bias}``,
``backbone.blocks.N.mlstm_layer.{q,k,v,ogate_preact,out_proj}.{weight,bias}``,
``backbone.blocks.N.mlstm_layer.{igate_preact,fgate_preact}.{weight,bias}`` (weight_mode "single") or
``.qkv_opreact`` and ``.ifgate_preact`` (weight_mode "fused": q|k|v|o and i|f stacked by rows),
``backbone.blocks.N.mlstm_layer.multihead_norm.{weight,bias}``, ``backbone.blocks.N.norm_ffn.{weight,bias}``,
``backbone.blocks.N.ffn.{proj_up_gate,proj_up,proj_down}.{weight,bias}`` (fused: ``proj_up_gate_z``,
gate|up), ``backbone.out_norm.weight``, ``lm_head.weight``; biases other than the gates' only with
``use_bias``.

Loading streams one tensor at a time: the safetensors file is memory-mapped (no host copy), the
tensor goes to the device(s) as stored, and is sliced, transposed and cast to the requested dtype
there, written into its place (into the preallocated stacked parameter when the blocks are stacked,
in place), and dropped before the next one, so a 7B checkpoint loads onto one GPU without two
host copies. With a ``mesh`` every parameter lands with the sharding of ``sharding.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import xLSTMLMConfig
from .layers import step_kernel_options
from .model import init_params, xLSTMLMModel
from .sharding import param_partition_specs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_CONTEXT_LENGTH = 8192  # the released model's training context; transformers has no such field

# ------------------------------------------------------------------------------------ config fields
# transformers xLSTMConfig fields that do not change the function the model computes
IMPLEMENTATION_FIELDS = (
    "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "chunk_size", "return_last_states",
    "autocast_kernel_dtype", "max_inference_chunksize", "use_cache",
)
# generic PreTrainedConfig / file metadata
METADATA_FIELDS = (
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "is_encoder_decoder", "chunk_size_feed_forward", "tie_encoder_decoder",
    "pruned_heads", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "auto_map", "force_bos_token_insert", "_attn_implementation_autoset", "output_scores",
)
HONOURED_FIELDS = (
    "vocab_size", "hidden_size", "embedding_dim", "num_hidden_layers", "num_blocks", "num_heads",
    "use_bias", "norm_reduction_force_float32", "tie_word_embeddings", "add_out_norm", "norm_eps",
    "qk_dim_factor", "v_dim_factor", "eps", "inference_state_dtype", "ffn_proj_factor",
    "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap", "weight_mode",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
_HF_DEFAULTS = dict(  # transformers 5.x xLSTMConfig defaults, for fields a config.json may omit
    vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8, use_bias=False,
    norm_reduction_force_float32=True, tie_word_embeddings=False, add_out_norm=True, norm_eps=1e-6,
    qk_dim_factor=0.5, v_dim_factor=1.0, eps=1e-6, inference_state_dtype="float32", ffn_proj_factor=2.667,
    ffn_round_up_to_multiple_of=64, gate_soft_cap=15.0, output_logit_soft_cap=30.0, weight_mode="single",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
WEIGHT_MODES = ("single", "fused")


def _round_up(x: float, multiple: int) -> int:
    """transformers' ``round_up_to_next_multiple_of``."""
    return int(((x + multiple - 1) // multiple) * multiple)


def default_inference_backend(eps: float = 1e-6) -> tuple[str, dict[str, Any]]:
    """(backend, kwargs) for prefill: the Pallas chunkwise kernels on an NVIDIA GPU (chunk 128),
    else the XLA chunkwise backend (chunk 64)."""
    if jax.default_backend() == "gpu":
        return "triton_kernels", {"chunk_size": 128, "eps": eps}
    return "fwbw_stabilized", {"chunk_size": 64, "eps": eps}


def config_from_hf(
    hf: dict[str, Any],
    *,
    dtype: str | None = None,
    backend: str | None = None,
    backend_kwargs: dict[str, Any] | None = None,
    step_kernel: str | None = None,
    context_length: int | None = None,
    **overrides: Any,
) -> xLSTMLMConfig:
    """Our ``xLSTMLMConfig`` for a transformers ``config.json`` dict; ValueError naming every field
    whose value this model cannot compute as transformers does.

    ``dtype`` (default: the checkpoint's ``dtype``, else float32) becomes the parameter and compute
    dtype; ``backend`` / ``backend_kwargs`` / ``step_kernel`` choose kernels (default:
    ``default_inference_backend()``, ``recurrent_native``); ``overrides`` set other fields of ours
    that do not change the function (e.g. ``remat``, ``param_dtype``).
    """
    if not isinstance(hf, dict):
        raise ValueError(f"config must be a dict (config.json); got {type(hf).__name__}")
    if hf.get("model_type", "xlstm") != "xlstm":
        raise ValueError(f"config.json model_type is {hf.get('model_type')!r}; only 'xlstm' checkpoints load here")
    known = set(HONOURED_FIELDS) | set(IMPLEMENTATION_FIELDS) | set(METADATA_FIELDS)
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        warnings.warn(f"config.json fields not known to this loader (ignored): {unknown}", stacklevel=2)
    get = lambda name: hf.get(name, _HF_DEFAULTS.get(name))  # noqa: E731
    E = hf.get("hidden_size") if hf.get("hidden_size") is not None else hf.get("embedding_dim", 4096)
    NB = hf.get("num_hidden_layers") if hf.get("num_hidden_layers") is not None else hf.get("num_blocks", 32)
    refused = []
    if hf.get("embedding_dim") is not None and hf["embedding_dim"] != E:
        refused.append(f"embedding_dim={hf['embedding_dim']} differs from hidden_size={E} (transformers "
                       "sizes the embedding by one and every layer by the other)")
    if hf.get("num_blocks") is not None and hf["num_blocks"] != NB:
        refused.append(f"num_blocks={hf['num_blocks']} differs from num_hidden_layers={NB}")
    if get("add_out_norm") is not True:
        refused.append("add_out_norm=False (transformers 5.x applies backbone.out_norm regardless, the xlstm "
                       "package would not: ambiguous)")
    if get("inference_state_dtype") != "float32":
        refused.append(f"inference_state_dtype={get('inference_state_dtype')!r} (states are float32 here)")
    if get("weight_mode") not in WEIGHT_MODES:
        refused.append(f"weight_mode={get('weight_mode')!r} (one of {WEIGHT_MODES})")
    for name in ("gate_soft_cap", "output_logit_soft_cap"):
        v = get(name)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            refused.append(f"{name}={v!r} (a cap must be > 0 or None)")
    eos = get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) != 1:
            refused.append(f"eos_token_id={eos} (one end-of-sequence id is supported)")
        eos = eos[0] if eos else None
    NH = get("num_heads")
    qk = int(E * get("qk_dim_factor"))
    vd = int(E * get("v_dim_factor"))
    if NH < 1 or qk % NH or vd % NH or qk < NH or vd < NH:
        refused.append(f"num_heads={NH} must divide the q/k width {qk} and the v width {vd}")
    if refused:
        raise ValueError("this transformers xLSTM config cannot be honoured: " + "; ".join(refused))
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if backend is None:
        backend, default_kwargs = default_inference_backend(float(get("eps")))
        backend_kwargs = {**default_kwargs, **(backend_kwargs or {})}
    backend_kwargs = dict(backend_kwargs or {})
    if backend_kwargs.setdefault("eps", float(get("eps"))) != float(get("eps")):
        raise ValueError(f"backend_kwargs eps={backend_kwargs['eps']} differs from the checkpoint's cell eps={get('eps')}")
    fields = dict(
        vocab_size=int(get("vocab_size")), embedding_dim=int(E), num_heads=int(NH), num_blocks=int(NB),
        context_length=int(context_length or DEFAULT_CONTEXT_LENGTH),
        # factors giving exactly transformers' int(E * factor) widths under our round(E * factor)
        qk_dim_factor=float(get("qk_dim_factor")) if round(E * get("qk_dim_factor")) == qk else qk / E,
        v_dim_factor=float(get("v_dim_factor")) if round(E * get("v_dim_factor")) == vd else vd / E,
        gate_soft_cap=None if get("gate_soft_cap") is None else float(get("gate_soft_cap")),
        output_logit_soft_cap=None if get("output_logit_soft_cap") is None else float(get("output_logit_soft_cap")),
        ffn_proj_factor=float(get("ffn_proj_factor")), ffn_round_up_to_multiple_of=int(get("ffn_round_up_to_multiple_of")),
        norm_eps=float(get("norm_eps")), norm_reduction_force_float32=bool(get("norm_reduction_force_float32")),
        multihead_norm="layernorm", use_bias=bool(get("use_bias")), tie_embeddings=False,
        mlstm_backend=backend, mlstm_backend_kwargs=backend_kwargs,
        mlstm_step_kernel=step_kernel or "recurrent_native", dtype=str(dtype), param_dtype=str(dtype),
        bos_token_id=get("bos_token_id"), eos_token_id=eos, pad_token_id=get("pad_token_id"),
    )
    fields.update(overrides)
    config = xLSTMLMConfig(**fields)
    assert config.qk_dim == qk and config.v_dim == vd  # by construction of the factors above
    return config


def _cell_eps(config: xLSTMLMConfig) -> float:
    """The cell's eps, after checking the cell is transformers' (norm_val 1, stabilized)."""
    opts = step_kernel_options(config)
    if hasattr(opts, "_asdict"):
        opts = opts._asdict()
    elif dataclasses.is_dataclass(opts):
        opts = dataclasses.asdict(opts)
    bad = {k: opts[k] for k, want in (("norm_val", 1.0), ("stabilize_correctly", True), ("input_gate", "exp"))
           if k in opts and opts[k] != want}
    if bad:
        raise ValueError(
            f"transformers' xLSTM cell has norm_val=1.0, stabilize_correctly=True, input_gate='exp'; this config has {bad}"
        )
    if opts.get("qk_scale") is not None:
        raise ValueError(f"transformers' xLSTM cell scales q by DHQK ** -0.5; this config has qk_scale={opts['qk_scale']}")
    return float(opts.get("eps", 1e-6))


def config_to_hf(config: xLSTMLMConfig, *, weight_mode: str = "single", dtype: str | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config``; ValueError naming every field of ours
    that transformers' xLSTM cannot compute (its model would give different logits)."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}; got {weight_mode!r}")
    E, NH = config.embedding_dim, config.num_heads
    refused = []
    if config.multihead_norm != "layernorm":
        refused.append(f"multihead_norm={config.multihead_norm!r} (transformers' xLSTM has a per-head layer norm)")
    for name in ("gate_soft_cap", "output_logit_soft_cap"):
        if getattr(config, name) is None:
            refused.append(f"{name}=None (transformers' xLSTMConfig takes a float)")

    def factor(dim: int, ours: float, name: str) -> float:
        f = ours if int(E * ours) == dim else dim / E
        if int(E * f) != dim:
            refused.append(f"{name}: width {dim} is not int(E * factor) for any factor transformers reads")
        elif _round_up(E * f, 64) != dim:
            refused.append(f"{name}: width {dim} is not a multiple of 64 (transformers' xLSTMCache rounds it up "
                           f"to {_round_up(E * f, 64)} and its forward fails)")
        return f

    qk_f = factor(config.qk_dim, config.qk_dim_factor, "qk_dim_factor")
    v_f = factor(config.v_dim, config.v_dim_factor, "v_dim_factor")
    if _round_up(E * config.ffn_proj_factor, config.ffn_round_up_to_multiple_of) != config.ffn_dim:
        refused.append("ffn_proj_factor: transformers' rounding gives a different width")
    try:
        eps = _cell_eps(config)
    except ValueError as err:
        refused.append(str(err))
        eps = 1e-6
    if refused:
        raise ValueError("this config has no transformers xLSTM equivalent: " + "; ".join(refused))
    return {
        "architectures": ["xLSTMForCausalLM"], "model_type": "xlstm",
        "vocab_size": config.vocab_size, "hidden_size": E, "embedding_dim": E,
        "num_hidden_layers": config.num_blocks, "num_blocks": config.num_blocks, "num_heads": NH,
        "use_bias": config.use_bias, "norm_reduction_force_float32": config.norm_reduction_force_float32,
        "tie_word_embeddings": config.tie_embeddings, "add_out_norm": True, "norm_eps": config.norm_eps,
        "qk_dim_factor": qk_f, "v_dim_factor": v_f, "eps": eps, "inference_state_dtype": "float32",
        "ffn_proj_factor": config.ffn_proj_factor, "ffn_round_up_to_multiple_of": config.ffn_round_up_to_multiple_of,
        "gate_soft_cap": config.gate_soft_cap, "output_logit_soft_cap": config.output_logit_soft_cap,
        "weight_mode": weight_mode, "chunk_size": 64, "mode": "inference", "return_last_states": True,
        "use_cache": True, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "dtype": dtype or config.param_dtype,
    }


# ------------------------------------------------------------------------------------ weight plan
@dataclasses.dataclass(frozen=True)
class _Part:
    path: tuple[str, ...]  # our parameter path below the block (or from the root for top-level params)
    start: int  # rows [start, stop) of the transformers tensor
    stop: int


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # transformers tensor name
    shape: tuple[int, ...]  # its shape
    parts: tuple[_Part, ...]
    block: int | None  # block index, None for embedding / out_norm / lm_head
    transpose: bool  # torch Linear weight (out, in) <-> our kernel (in, out)


def _plan(config: xLSTMLMConfig, weight_mode: str) -> list[_Entry]:
    """Every transformers tensor of a checkpoint of ``config`` and where its rows go in our params."""
    E, V, NH, F = config.embedding_dim, config.vocab_size, config.num_heads, config.ffn_dim
    QK, VD = config.qk_dim, config.v_dim
    bias = config.use_bias
    out: list[_Entry] = [
        _Entry("backbone.embeddings.weight", (V, E), (_Part(("embedding", "embedding"), 0, V),), None, False)
    ]

    def linear(prefix, rows, in_dim, block, with_bias):
        """A Linear (sum(rows) x in_dim) whose row blocks go to our modules ``rows = [(module, n)]``."""
        parts, parts_b, start = [], [], 0
        for module, n in rows:
            parts.append(_Part(module + ("kernel",), start, start + n))
            parts_b.append(_Part(module + ("bias",), start, start + n))
            start += n
        out.append(_Entry(prefix + ".weight", (start, in_dim), tuple(parts), block, True))
        if with_bias:
            out.append(_Entry(prefix + ".bias", (start,), tuple(parts_b), block, False))

    def vector(name, module, n, block, with_bias):
        out.append(_Entry(name + ".weight", (n,), (_Part(module + ("scale",), 0, n),), block, False))
        if with_bias:
            out.append(_Entry(name + ".bias", (n,), (_Part(module + ("bias",), 0, n),), block, False))

    for b in range(config.num_blocks):
        pre = f"backbone.blocks.{b}"
        ml = pre + ".mlstm_layer"
        vector(pre + ".norm_mlstm", ("norm_mlstm",), E, b, bias)
        if weight_mode == "single":
            linear(ml + ".q", [(("mlstm", "q"), QK)], E, b, bias)
            linear(ml + ".k", [(("mlstm", "k"), QK)], E, b, bias)
            linear(ml + ".v", [(("mlstm", "v"), VD)], E, b, bias)
            linear(ml + ".ogate_preact", [(("mlstm", "ogate"), VD)], E, b, bias)
            linear(ml + ".igate_preact", [(("mlstm", "igate"), NH)], E, b, True)
            linear(ml + ".fgate_preact", [(("mlstm", "fgate"), NH)], E, b, True)
        else:
            linear(ml + ".qkv_opreact", [(("mlstm", "q"), QK), (("mlstm", "k"), QK), (("mlstm", "v"), VD),
                                         (("mlstm", "ogate"), VD)], E, b, bias)
            linear(ml + ".ifgate_preact", [(("mlstm", "igate"), NH), (("mlstm", "fgate"), NH)], E, b, True)
        vector(ml + ".multihead_norm", ("mlstm", "mh_norm"), VD, b, bias)
        linear(ml + ".out_proj", [(("mlstm", "out_proj"), E)], VD, b, bias)
        vector(pre + ".norm_ffn", ("norm_ffn",), E, b, bias)
        if weight_mode == "single":
            linear(pre + ".ffn.proj_up_gate", [(("ffn", "up_gate"), F)], E, b, bias)
            linear(pre + ".ffn.proj_up", [(("ffn", "up"), F)], E, b, bias)
        else:
            linear(pre + ".ffn.proj_up_gate_z", [(("ffn", "up_gate"), F), (("ffn", "up"), F)], E, b, bias)
        linear(pre + ".ffn.proj_down", [(("ffn", "down"), E)], F, b, bias)
    vector("backbone.out_norm", ("out_norm",), E, None, False)
    linear("lm_head", [(("lm_head",), V)], E, None, False)
    return out


# ------------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def array(self) -> np.ndarray:
        """The tensor as a read-only memory map (no copy in host memory)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def _read_header(path: str) -> dict[str, _Tensor]:
    """The tensors of one safetensors file (the format: 8-byte little-endian header size, a JSON
    header of name -> {dtype, shape, data_offsets}, then the data)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(raw, "little")
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header size {n})")
        header = json.loads(fh.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: {sorted(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        t = _Tensor(path, _ST_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), base + int(begin))
        if t.nbytes != end - begin:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {t.shape} {info['dtype']}")
        out[name] = t
    return out


def _checkpoint_tensors(path: str) -> dict[str, _Tensor]:
    """All tensors of a checkpoint directory (one file, or the shards of the index)."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(f"{path!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, _Tensor] = {}
    for f in files:
        full = os.path.join(path, f)
        if not os.path.isfile(full):
            raise ValueError(f"checkpoint shard {full!r} (listed in {INDEX_NAME}) does not exist")
        for name, t in _read_header(full).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in two shards: {tensors[name].file}, {full}")
            tensors[name] = t
    return tensors


def _write_safetensors(path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]], arrays: Iterable[np.ndarray]) -> None:
    """Write a safetensors file: the header from ``entries`` (name, dtype, shape), then each array
    of ``arrays`` (one at a time, in the same order)."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for (name, dtype, shape), arr in zip(entries, arrays):
            arr = np.ascontiguousarray(arr, dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"internal: tensor {name} has shape {arr.shape}, header says {shape}")
            fh.write(arr.tobytes())


# ------------------------------------------------------------------------------------ loading
def read_hf_config(path: str) -> dict[str, Any]:
    """The ``config.json`` dict of a checkpoint directory."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} is not a transformers checkpoint directory (no {CONFIG_NAME})")
    with open(cfg_path) as fh:
        return json.load(fh)


def read_pretrained_config(path: str, **kwargs: Any) -> xLSTMLMConfig:
    """Our config of the checkpoint in directory ``path`` (``kwargs`` as ``config_from_hf``)."""
    return config_from_hf(read_hf_config(path), **kwargs)


_ARCH_FIELDS = (
    "vocab_size", "embedding_dim", "num_heads", "num_blocks", "qk_dim", "v_dim", "ffn_dim", "gate_soft_cap",
    "output_logit_soft_cap", "norm_eps", "norm_reduction_force_float32", "multihead_norm", "use_bias",
)


def _check_same_function(config: xLSTMLMConfig, ckpt: xLSTMLMConfig) -> None:
    diff = {n: (getattr(config, n), getattr(ckpt, n)) for n in _ARCH_FIELDS if getattr(config, n) != getattr(ckpt, n)}
    if config.tie_embeddings:
        diff["tie_embeddings"] = (True, False)
    if _cell_eps(config) != _cell_eps(ckpt):
        diff["cell eps"] = (_cell_eps(config), _cell_eps(ckpt))
    if diff:
        raise ValueError(f"config does not compute the checkpoint's model; (given, checkpoint): {diff}")


@functools.lru_cache(maxsize=None)
def _converter(start: int, stop: int, transpose: bool, dtype: str, sharding):
    def convert(raw):
        x = raw[start:stop]
        return (x.T if transpose else x).astype(dtype)

    return jax.jit(convert, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _writer(start: int, stop: int, transpose: bool, sharding):
    def write(buf, raw, idx):
        x = raw[start:stop]
        x = (x.T if transpose else x).astype(buf.dtype)
        return jax.lax.dynamic_update_index_in_dim(buf, x, idx, 0)

    return jax.jit(write, donate_argnums=(0,), out_shardings=sharding)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_tensors(path: str, hf: dict[str, Any], config: xLSTMLMConfig) -> tuple[list[_Entry], dict[str, _Tensor]]:
    weight_mode = hf.get("weight_mode", "single")
    plan = _plan(config, weight_mode)
    tensors = _checkpoint_tensors(path)
    expected = {e.name for e in plan}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r} (weight_mode {weight_mode!r}, use_bias {config.use_bias}) does not match the "
            f"model: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected tensors "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for e in plan:
        if tensors[e.name].shape != e.shape:
            raise ValueError(f"tensor {e.name} has shape {tensors[e.name].shape}; the config gives {e.shape}")
    return plan, tensors


def check_pretrained(path: str, config: xLSTMLMConfig | None = None) -> xLSTMLMConfig:
    """Check, reading only ``config.json`` and the safetensors headers, that directory ``path`` is a
    checkpoint ``load_pretrained(path, config=config)`` loads: ``config`` (default: the
    checkpoint's own, ``read_pretrained_config``) computes its function and every tensor is there
    with its shape. Returns the config; ``ValueError`` saying what is wrong."""
    hf = read_hf_config(path)
    ckpt_config = config_from_hf(hf)
    if config is None:
        config = ckpt_config
    elif not isinstance(config, xLSTMLMConfig):
        raise ValueError(f"config must be an xLSTMLMConfig; got {type(config).__name__}")
    else:
        _check_same_function(config, ckpt_config)
    _check_tensors(path, hf, config)
    return config


def load_pretrained(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    config: xLSTMLMConfig | None = None,
    unrolled: bool = False,
    backend: str | None = None,
    backend_kwargs: dict[str, Any] | None = None,
    step_kernel: str | None = None,
    context_length: int | None = None,
    progress: bool | None = None,
) -> tuple[xLSTMLMModel, Any]:
    """``(model, params)`` of the transformers xLSTM checkpoint in directory ``path``.

    ``model.apply({"params": params}, ids)`` gives transformers' ``xLSTMForCausalLM`` logits.
    ``dtype``: parameter and compute dtype (default: the checkpoint's). ``mesh``: place every
    parameter with the sharding rules of ``sharding.py`` (and build the model on the mesh).
    ``config``: use this config (its dtypes, kernels, remat, ...) after checking that it computes the
    checkpoint's function (e.g. for fine-tuning; otherwise ``read_pretrained_config``'s).
    ``unrolled``: per-block parameters (``xLSTMLMModel(unrolled=True)``) instead of stacked ones.
    ``backend``, ``backend_kwargs``, ``step_kernel``, ``context_length``: as ``config_from_hf``.
    ``progress``: a tqdm bar over the bytes (default: when the checkpoint exceeds 1 GiB).
    Missing or unexpected tensors and wrong shapes raise ValueError naming them.
    """
    hf = read_hf_config(path)
    ckpt_config = config_from_hf(
        hf, dtype=dtype, backend=backend, backend_kwargs=backend_kwargs, step_kernel=step_kernel,
        context_length=context_length,
    )
    if config is None:
        config = ckpt_config
    else:
        if not isinstance(config, xLSTMLMConfig):
            raise ValueError(f"config must be an xLSTMLMConfig; got {type(config).__name__}")
        _check_same_function(config, ckpt_config)
    plan, tensors = _check_tensors(path, hf, config)

    model = xLSTMLMModel(config, mesh=mesh, unrolled=unrolled)
    # parameter shapes do not depend on the kernels: trace them with the XLA backend
    shape_config = config.replace(mlstm_backend="fwbw_stabilized", mlstm_backend_kwargs={"chunk_size": 16})
    abstract = jax.eval_shape(lambda: init_params(shape_config, jax.random.key(0), seq_len=1))
    if mesh is not None:
        specs = param_partition_specs(abstract, mesh)
        shard = lambda p: NamedSharding(mesh, p)  # noqa: E731
        replicated = NamedSharding(mesh, P())
    else:
        specs = jax.tree.map(lambda _: None, abstract)
        shard = lambda p: None  # noqa: E731
        replicated = None
    param_dtype = config.params_dtype

    params: dict = {}
    if not unrolled:  # preallocate the stacked block parameters; blocks are written in place
        flat, _ = jax.tree_util.tree_flatten_with_path(abstract["blocks"])
        for kpath, leaf in flat:
            path = tuple(str(k.key) for k in kpath)
            zeros = jax.jit(functools.partial(jnp.zeros, leaf.shape, param_dtype), out_shardings=shard(_get(specs["blocks"], path)))
            _set(params, ("blocks",) + path, zeros())

    total = sum(tensors[e.name].nbytes for e in plan)
    show = total > 2**30 if progress is None else bool(progress)
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not show) as bar:
        for e in plan:
            t = tensors[e.name]
            raw = jax.device_put(t.array(), replicated)
            for part in e.parts:
                if e.block is None:
                    spec = _get(specs, part.path)
                    value = _converter(part.start, part.stop, e.transpose, param_dtype.name, shard(spec))(raw)
                    _set(params, part.path, value)
                elif unrolled:
                    spec = _get(specs["blocks"], part.path)
                    spec = None if spec is None else P(*spec[1:])
                    value = _converter(part.start, part.stop, e.transpose, param_dtype.name, shard(spec))(raw)
                    _set(params, (f"blocks_{e.block}",) + part.path, value)
                else:
                    spec = _get(specs["blocks"], part.path)
                    buf = _get(params["blocks"], part.path)
                    new = _writer(part.start, part.stop, e.transpose, shard(spec))(buf, raw, jnp.int32(e.block))
                    _set(params, ("blocks",) + part.path, new)
            del raw
            bar.update(t.nbytes)
    jax.block_until_ready(params)
    return model, params


# ------------------------------------------------------------------------------------ saving
def save_pretrained(
    path: str,
    config: xLSTMLMConfig,
    params: Any,
    *,
    weight_mode: str = "single",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool | None = None,
) -> None:
    """Write ``params`` of ``xLSTMLMModel(config)`` as a transformers checkpoint directory ``path``.

    ``params`` in the stacked or the unrolled layout; ``dtype`` of the stored tensors (default the
    parameters' dtype); ``weight_mode`` "single" or "fused" (transformers 5.x cannot build a fused
    model with its own initialisation, but loads one); shards of at most ``max_shard_bytes`` with an
    index when the weights exceed it. A tied embedding is written as ``lm_head.weight`` too
    (transformers always has its own head weight). Tensors go to the host one at a time.
    ValueError (before anything is written) if transformers cannot compute this config.
    """
    hf = config_to_hf(config, weight_mode=weight_mode, dtype=dtype)
    unrolled = "blocks" not in params
    leaves = params
    plan = _plan(config, weight_mode)
    if config.tie_embeddings:  # the head is the embedding table
        plan = [
            dataclasses.replace(e, parts=(_Part(("embedding", "embedding"), 0, config.vocab_size),), transpose=False)
            if e.name == "lm_head.weight" else e for e in plan
        ]
    first = jax.tree.leaves(params)[0]
    store_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(first.dtype)
    if store_dtype not in _ST_NAMES:
        raise ValueError(f"dtype must be one of float64, float32, float16, bfloat16; got {store_dtype}")
    hf["dtype"] = jnp.dtype(store_dtype).name

    def fetch(e: _Entry) -> np.ndarray:
        pieces = []
        for part in e.parts:
            if e.block is None:
                x = _get(leaves, part.path)
            elif unrolled:
                x = _get(leaves[f"blocks_{e.block}"], part.path)
            else:
                x = _get(leaves["blocks"], part.path)[e.block]
            pieces.append(x.T if e.transpose else x)
        x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
        if tuple(x.shape) != e.shape:
            raise ValueError(f"parameter for {e.name} has shape {tuple(x.shape)}; the config gives {e.shape}")
        return np.asarray(jax.device_get(x.astype(store_dtype)))

    for e in plan:  # check every parameter exists with its shape before writing anything
        for part in e.parts:
            try:
                src = _get(leaves, part.path) if e.block is None else (
                    _get(leaves[f"blocks_{e.block}"], part.path) if unrolled else _get(leaves["blocks"], part.path)
                )
            except (KeyError, TypeError) as err:
                raise ValueError(f"params have no entry {'/'.join(part.path)} (needed for {e.name})") from err
            del src

    sizes = [int(np.prod(e.shape, dtype=np.int64)) * store_dtype.itemsize for e in plan]
    shards: list[list[int]] = [[]]
    acc = 0
    for idx, nbytes in enumerate(sizes):
        if shards[-1] and acc + nbytes > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(idx)
        acc += nbytes
    os.makedirs(path, exist_ok=True)
    total = sum(sizes)
    show = total > 2**30 if progress is None else bool(progress)
    from tqdm import tqdm

    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="saving", disable=not show) as bar:
        for fname, idxs in zip(names, shards):
            entries = [(plan[i].name, store_dtype, plan[i].shape) for i in idxs]

            def arrays(idxs=idxs):
                for i in idxs:
                    yield fetch(plan[i])
                    bar.update(sizes[i])

            _write_safetensors(os.path.join(path, fname), entries, arrays())
            weight_map.update({plan[i].name: fname for i in idxs})
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_NAME), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    elif os.path.exists(os.path.join(path, INDEX_NAME)):
        os.remove(os.path.join(path, INDEX_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as fh:
        json.dump(hf, fh, indent=2, sort_keys=True)


__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "HONOURED_FIELDS",
    "IMPLEMENTATION_FIELDS",
    "check_pretrained",
    "config_from_hf",
    "config_to_hf",
    "default_inference_backend",
    "load_pretrained",
    "read_hf_config",
    "read_pretrained_config",
    "save_pretrained",
]
