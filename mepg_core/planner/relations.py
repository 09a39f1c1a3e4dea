"""GenEval's rule for where one box lies relative to another, on layout boxes.

GenEval decides "A left of B" from detected boxes: take the offset between the box centres, shrink each
component towards zero by ``0.1 x`` (the sum of the two boxes' sizes on that axis), divide by the length
of the raw offset, and call a component below -0.5 / above 0.5 left of / right of (x) or above / below
(y). Layout boxes are in units of a 1000-wide canvas, so they are scaled to pixels first: on a
non-square canvas an x offset and a y offset of equal units are not equally long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

POSITION_THRESHOLD = 0.1
RELATION_NAMES = ("left of", "right of", "above", "below")


def offset_components(
    box_a: Sequence[float],
    box_b: Sequence[float],
    width: float = 1000.0,
    height: float = 1000.0,
) -> tuple[float, float] | None:
    """GenEval's normalised, size-reduced offset of A from B as ``(x, y)``; None when A and B coincide.

    Boxes are ``(x1, y1, x2, y2)`` in layout units ``[0, 1000]``; ``width``/``height`` are the canvas
    size in pixels.
    """
    sx, sy = width / 1000.0, height / 1000.0
    ax1, ay1, ax2, ay2 = (box_a[0] * sx, box_a[1] * sy, box_a[2] * sx, box_a[3] * sy)
    bx1, by1, bx2, by2 = (box_b[0] * sx, box_b[1] * sy, box_b[2] * sx, box_b[3] * sy)
    dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
    dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
    rx = max(abs(dx) - POSITION_THRESHOLD * (abs(ax2 - ax1) + abs(bx2 - bx1)), 0.0) * math.copysign(1, dx)
    ry = max(abs(dy) - POSITION_THRESHOLD * (abs(ay2 - ay1) + abs(by2 - by1)), 0.0) * math.copysign(1, dy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return None
    norm = math.hypot(dx, dy)
    return rx / norm, ry / norm


def relative_position(
    box_a: Sequence[float],
    box_b: Sequence[float],
    width: float = 1000.0,
    height: float = 1000.0,
    margin: float = 0.0,
) -> set[str]:
    """Relations of box A relative to box B (a subset of :data:`RELATION_NAMES`) under GenEval's rule.

    ``margin`` > 0 asks for a component beyond ``0.5 + margin`` (the planner keeps a safety margin so
    that rounding boxes to integers cannot flip a relation); scoring uses 0, GenEval's rule exactly.
    """
    comps = offset_components(box_a, box_b, width, height)
    if comps is None:
        return set()
    nx, ny = comps
    limit = 0.5 + margin
    found = set()
    if nx < -limit:
        found.add("left of")
    if nx > limit:
        found.add("right of")
    if ny < -limit:
        found.add("above")
    if ny > limit:
        found.add("below")
    return found


def holds(relation: str, box_a: Sequence[float], box_b: Sequence[float],
          width: float = 1000.0, height: float = 1000.0) -> bool:
    """Does ``box_a`` stand in ``relation`` ("left of", "right of", "above", "below") to ``box_b``?"""
    return relation in relative_position(box_a, box_b, width, height)
