"""Model FLOPs per token, device peak rates and model FLOPs utilisation (MFU) of training.

MFU = tokens/s x (model FLOPs per trained token) / (devices x peak FLOP/s of one device).

Model FLOPs are counted exactly from the config (``model_flops``), not by the 6 x params rule
(``six_n_flops_per_token``, reported beside it): the matrix products of one token's forward pass,
2 FLOPs per multiply-add, times 3 for training (the backward pass is counted as twice the forward;
recomputation under ``remat`` is not model work and is not counted). Per block (E, NH, DHQK, DHV,
F as in ``xlstm_jax.models.xlstm_lm.config``; QK = NH * DHQK, VD = NH * DHV):

    projections  2 E (2 QK + 2 VD + 2 NH) + 2 VD E       q, k, v, output gate, i/f gates, out
    feed-forward 6 E F                                   up-gate, up, down
    mLSTM cell   NH (2 L (DHQK + DHV) + 4 DHQK DHV + 4 DHQK)   chunkwise, chunk length L

and once per token the LM head 2 E V. The cell term is the chunkwise form's matrix work per token:
the L x L scores and their product with V inside a chunk (counted whole, as the kernels compute the
full block before masking), the inter-chunk product q C and the state update K^T V (2 DHQK DHV
each), the normaliser terms (2 DHQK each). Element-wise work (gates, norms, activations, the
softmax of the loss) and the embedding lookup count nothing.

Peak rates (``PEAK_TFLOPS``): dense bf16 tensor-core figures of the vendor's specification, per
device, matched on ``device.device_kind``; unknown devices (and CPUs) have none, so their MFU is
n/a unless a peak is given. ``measure_matmul_tflops`` times a large bf16 matrix product instead (the
rate this device actually reaches, which can be well below the specification).
"""

from __future__ import annotations

import time
from typing import Any

from xlstm_jax.models.xlstm_lm.config import xLSTMLMConfig

# (substring of device_kind, lower case; dense bf16 TFLOP/s of the specification), first match wins
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("h800", 989.0),
    ("a100", 312.0),
    ("l40s", 362.0),
)

DEFAULT_CHUNK_SIZE = 64


def cell_chunk_size(config: xLSTMLMConfig, seq_len: int) -> int:
    """The chunk length L the FLOP count assumes: the backend's ``chunk_size`` option if set, else
    64 (the backends' default), at most ``seq_len``."""
    chunk = config.backend_kwargs.get("chunk_size", DEFAULT_CHUNK_SIZE)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        chunk = DEFAULT_CHUNK_SIZE
    return max(1, min(int(chunk), int(seq_len)))


def model_flops(config: xLSTMLMConfig, seq_len: int, chunk_size: int | None = None) -> dict[str, float]:
    """Model FLOPs per token of ``config`` at sequence length ``seq_len`` (see the module docstring).

    Returns ``projections``, ``ffn``, ``cell`` (all blocks together), ``head``, ``forward`` (their
    sum) and ``train`` (3 x forward), in FLOPs per token. ``chunk_size``: the cell's chunk length L
    (default ``cell_chunk_size``).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if chunk_size is None:
        chunk_size = cell_chunk_size(config, seq_len)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    L = min(chunk_size, seq_len)
    E, V, F, NB = config.embedding_dim, config.vocab_size, config.ffn_dim, config.num_blocks
    NH, QK, VD = config.num_heads, config.qk_dim, config.v_dim
    DHQK, DHV = config.qk_head_dim, config.v_head_dim
    proj = 2 * E * (2 * QK + 2 * VD + 2 * NH) + 2 * VD * E
    ffn = 6 * E * F
    cell = NH * (2 * L * (DHQK + DHV) + 4 * DHQK * DHV + 4 * DHQK)
    head = 2 * E * V
    out = {"projections": float(NB * proj), "ffn": float(NB * ffn), "cell": float(NB * cell), "head": float(head)}
    out["forward"] = sum(out.values())
    out["train"] = 3.0 * out["forward"]
    return out


def six_n_flops_per_token(config: xLSTMLMConfig) -> float:
    """The 6 x parameters rule of thumb (embedding included), for comparison with ``model_flops``."""
    return 6.0 * config.num_params()


def device_peak_tflops(device: Any) -> float | None:
    """Dense bf16 TFLOP/s of ``device`` from ``PEAK_TFLOPS`` by its ``device_kind``; None if unknown
    (CPUs and devices not in the table)."""
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for pattern, tflops in PEAK_TFLOPS:
        if pattern in kind:
            return tflops
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_tflops: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the throughput or the peak is unknown)."""
    if tokens_per_s is None or peak_tflops is None or not peak_tflops > 0 or num_devices < 1:
        return None
    return float(tokens_per_s) * float(flops_per_token) / (float(peak_tflops) * 1e12 * num_devices)


def measure_matmul_tflops(device: Any = None, n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matrix-product rate of ``device`` (default: the first device) in TFLOP/s: the best of
    ``repeats`` timed n x n x n products after a warm-up (2 n^3 FLOPs each)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0] if device is None else device
    a = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
    b = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e12
