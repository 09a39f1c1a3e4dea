"""Box arithmetic for carrying conditioning into a latent window (pure; used by the ComfyUI glue).

Conventions (all in latent cells):

- a **window** is half-open ``(x1, y1, x2, y2)`` on the canvas, as in :mod:`.cross_denoise`;
- an **area** is ComfyUI's ``(h, w, y, x)`` (height, width, top, left), the order its area conditions
  and GLIGEN boxes use.

A condition acts on its *frame*: its area, or the whole canvas when it has none. In a window it acts on
the part of its frame inside the window, with coordinates relative to the window's origin.
"""

from __future__ import annotations

Area = tuple[int, int, int, int]
Window = tuple[int, int, int, int]


def clip_area(area: Area, canvas_hw: tuple[int, int]) -> Area:
    """``area`` clipped to the canvas the way ComfyUI clips it (size shrunk to fit right and bottom)."""
    h, w, y, x = (int(v) for v in area)
    height, width = canvas_hw
    return min(height - y, h), min(width - x, w), y, x


def frame_of(area: Area | None, canvas_hw: tuple[int, int]) -> Area:
    """Where a condition acts: its (clipped) area, or the whole canvas."""
    if area is None:
        return canvas_hw[0], canvas_hw[1], 0, 0
    return clip_area(area, canvas_hw)


def intersect(frame: Area, window: Window) -> Area | None:
    """The part of ``frame`` inside ``window`` (canvas coordinates), or None when they do not meet."""
    h, w, y, x = frame
    x1, y1, x2, y2 = window
    top, left = max(y, y1), max(x, x1)
    bottom, right = min(y + h, y2), min(x + w, x2)
    if bottom <= top or right <= left:
        return None
    return bottom - top, right - left, top, left


def relative_to(area: Area, window: Window) -> Area:
    """``area`` (canvas coordinates) with its offset measured from the window's origin."""
    h, w, y, x = area
    return h, w, y - window[1], x - window[0]


def crop_boxes(boxes: list[Area], frame: Area, part: Area) -> list[tuple[int, Area]]:
    """Boxes given relative to ``frame``'s origin (GLIGEN positions), cut to ``part`` (a piece of the frame,
    canvas coordinates) and made relative to ``part``'s origin. Returns ``(index in boxes, box)`` for the
    boxes that meet ``part``."""
    _, _, fy, fx = frame
    ph, pw, py, px = part
    out = []
    for index, (h, w, y, x) in enumerate(boxes):
        met = intersect((h, w, fy + y, fx + x), (px, py, px + pw, py + ph))
        if met is not None:
            out.append((index, (met[0], met[1], met[2] - py, met[3] - px)))
    return out
