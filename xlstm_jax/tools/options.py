"""Argument types and the help formatter shared by the subcommands of ``xlstm-jax``.

The types check a value when the command line is parsed, so a bad number is reported by argparse
(one ``xlstm-jax: error:`` line, exit status 2; see ``xlstm_jax.cli``) before any work starts. None
of this imports JAX: building the parser (``xlstm-jax --help``) stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default or the
    default is None / False / empty (such options say in words what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def float_range(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval from ``low`` to ``high``."""
    if math.isinf(high):
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {interval}; got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}; got {text}")
        return value

    parse.__name__ = f"number {interval}"
    return parse


def int_triple(text: str) -> tuple[int, int, int]:
    """An argparse type: ``"A,B,C"`` with three positive ints (e.g. a DATA,FSDP,TENSOR mesh)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"must be three positive integers A,B,C; got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def name_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``NAME=VALUE`` with VALUE parsed as JSON (``64``, ``true``, ``"x"``), else
    kept as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must look like NAME=VALUE; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
