"""The benchmark workload of ``xlstm-jax bench``: head shapes, sequence shapes, nominal FLOP and bytes.

The definition, in words, is the opening section of ``docs/benchmarks.md``. Head presets
(NH, DHQK, DHV): ``standard`` (16, 128, 256), ``7b`` (8, 256, 512: the xLSTM-7B layers) and
``small`` (8, 64, 128: the ``350m`` training preset's layers). ``standard`` and ``7b`` run at 65,536
tokens as (B, S) = (32, 2048), (8, 8192), (2, 32768); ``small`` at (16, 2048). Nothing here imports
JAX (the CLI parses these options before any work starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

HEAD_PRESETS: dict[str, tuple[int, int, int]] = {
    "standard": (16, 128, 256),
    "7b": (8, 256, 512),
    "small": (8, 64, 128),
}
"""Head shapes (NH, DHQK, DHV) by preset name."""

STANDARD_SHAPES: tuple[tuple[int, int], ...] = ((32, 2048), (8, 8192), (2, 32768))
"""(B, S) of the 65,536-token workload."""

PRESET_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "standard": STANDARD_SHAPES,
    "7b": STANDARD_SHAPES,
    "small": ((16, 2048),),
}
"""(B, S) shapes each head preset is measured at; explicit head shapes use ``STANDARD_SHAPES``."""

NOMINAL_CHUNK = 64
"""The chunk length L of the nominal FLOP and byte counts (``--floor-chunk``)."""


@dataclasses.dataclass(frozen=True)
class Heads:
    """A head shape: its name (a preset's, or ``NH,DHQK,DHV``) and the sizes."""

    name: str
    NH: int
    DHQK: int
    DHV: int

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """The (B, S) shapes this head shape is measured at by default."""
        return PRESET_SHAPES.get(self.name, STANDARD_SHAPES)


def parse_heads(text: str) -> Heads:
    """``standard`` / ``7b`` / ``small`` or ``NH,DHQK,DHV`` (positive ints) -> ``Heads``.

    Raises ``ValueError`` naming the accepted forms.
    """
    name = text.strip()
    if name in HEAD_PRESETS:
        return Heads(name, *HEAD_PRESETS[name])
    parts = [p.strip() for p in name.split(",")]
    if len(parts) == 3 and all(p.isdigit() and int(p) >= 1 for p in parts):
        nh, dhqk, dhv = (int(p) for p in parts)
        return Heads(f"{nh},{dhqk},{dhv}", nh, dhqk, dhv)
    raise ValueError(
        f"heads must be a preset ({', '.join(HEAD_PRESETS)}) or three positive integers NH,DHQK,DHV; got {text!r}"
    )


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"32,2048;8,8192"`` or ``"32x2048,8x8192"`` -> ((32, 2048), (8, 8192)); ``ValueError`` if malformed."""
    items = [s for s in re.split(r"[;,]" if "x" in text else r";", text) if s.strip()]
    shapes = []
    for item in items:
        parts = [p.strip() for p in re.split(r"[x,]", item)]
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            shapes = []
            break
        shapes.append((int(parts[0]), int(parts[1])))
    if not shapes:
        raise ValueError(
            f"shapes must be B,S pairs separated by ';' (or BxS separated by ','), positive integers; got {text!r}"
        )
    return tuple(shapes)


def heads_arg(text: str) -> Heads:
    """``parse_heads`` as an argparse type (a bad value is argparse's one-line usage error)."""
    try:
        return parse_heads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def shapes_arg(text: str) -> tuple[tuple[int, int], ...]:
    """``parse_shapes`` as an argparse type."""
    try:
        return parse_shapes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def nominal_flops(B: int, NH: int, S: int, DHQK: int, DHV: int, mode: str, L: int = NOMINAL_CHUNK) -> float:
    """Nominal chunkwise FLOP: 2 * (L*DHQK + L*DHV + 2*DHQK*DHV) per token and head for ``fw``,
    three times that for ``fwbw``."""
    fw = 2.0 * (L * DHQK + L * DHV + 2 * DHQK * DHV) * B * NH * S
    return fw if mode == "fw" else 3.0 * fw


def nominal_bytes(
    B: int, NH: int, S: int, DHQK: int, DHV: int, mode: str, itemsize: int, L: int = NOMINAL_CHUNK
) -> float:
    """Fewest bytes moved: q, k, v, h once in the input dtype plus the float32 chunk states (one
    (DHQK, DHV) matrix per chunk and head) once; ``fwbw`` adds dh, dq, dk, dv once and the states
    twice more (read back, and their gradients)."""
    tokens = B * NH * S
    io = tokens * (2 * DHQK + 2 * DHV) * itemsize
    states = B * NH * (S // L) * DHQK * DHV * 4
    if mode == "fw":
        return io + states
    return 2 * io + 3 * states
