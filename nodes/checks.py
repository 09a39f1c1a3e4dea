"""Checks of numeric node inputs that ComfyUI's own validation lets through: NaN passes every min/max
comparison, and values that arrive through a link are not checked at all."""

from __future__ import annotations

import math
from typing import Any


def check_number(node: str, name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a float; ValueError naming ``node`` and the input when it is not a finite number in
    ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{node}: {name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        shown = value if abs(value) < 1e15 else "a huge number"
        raise ValueError(f"{node}: {name} must be in {bounds}, got {shown}")
    return float(value)


def check_choice(node: str, name: str, value: Any, options: list[str]) -> str:
    """``value`` when it is one of ``options``; ValueError naming the input otherwise (ComfyUI itself may
    replace an unknown name by a default without a word)."""
    if not isinstance(value, str) or value not in options:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"{node}: {name} {shown} is not one this ComfyUI knows; choose one of "
                         f"{', '.join(options)}")
    return value
