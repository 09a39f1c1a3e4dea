"""Region masks from a layout, at any pixel or latent size.

Overlap policies (how a pixel covered by several boxes is shared):

- ``smaller_on_top`` (default): the smallest box covering a pixel owns it. Objects placed on or in
  front of larger ones (a cat on a sofa) keep their whole box; the larger region keeps the rest.
- ``later_on_top``: the region listed last owns the pixel (paint order, as in the layout editor).
- ``overlap``: every box keeps its full area; overlapping regions are averaged downstream
  (ComfyUI averages masked predictions by weight).

With the two exclusive policies the hard region masks and the background mask partition the canvas:
they sum to exactly 1 at every pixel. Feathering blurs the hard masks with the same separable box
filter (edge-replicated at the canvas border), which keeps that sum at 1, so feathered masks can be
used directly as blending weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import Layout, box_to_grid

OVERLAP_POLICIES = ("smaller_on_top", "later_on_top", "overlap")


@dataclass(frozen=True)
class RegionMasks:
    """Masks of one layout on one grid.

    ``regions``: ``[R, H, W]`` float32 in [0, 1]; ``background``: ``[H, W]``;
    ``boxes``: each region's half-open cell box ``(x1, y1, x2, y2)`` on this grid.
    """

    regions: torch.Tensor
    background: torch.Tensor
    boxes: list[tuple[int, int, int, int]]
    width: int
    height: int


def region_masks(
    layout: Layout,
    width: int,
    height: int,
    *,
    feather: float = 0.0,
    overlap: str = "smaller_on_top",
) -> RegionMasks:
    """Masks of every region of ``layout`` on a ``width`` x ``height`` grid (pixels or latent cells).

    ``feather`` is the blur radius in cells of this grid (0 = hard edges).
    Returns regions ``[R, H, W]`` and background ``[H, W]`` (float32).
    """
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap: unknown policy {overlap!r}; choose one of {', '.join(OVERLAP_POLICIES)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"mask size must be positive, got {width}x{height}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    boxes = [box_to_grid(r.box, width, height) for r in layout.regions]
    hard = torch.zeros((len(boxes), height, width), dtype=torch.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        hard[i, y1:y2, x1:x2] = 1.0

    if overlap != "overlap" and len(boxes) > 1:
        hard = _resolve_owner(hard, boxes, overlap)

    covered = hard.amax(dim=0) if len(boxes) else torch.zeros((height, width))
    background = 1.0 - covered
    radius = int(round(feather))
    if radius > 0:
        stacked = torch.cat([hard, background[None]], dim=0)
        stacked = _box_blur(stacked, radius)
        hard, background = stacked[:-1], stacked[-1]
    return RegionMasks(hard, background, boxes, width, height)


def _resolve_owner(hard: torch.Tensor, boxes: list[tuple[int, int, int, int]], policy: str) -> torch.Tensor:
    """Give each covered cell to exactly one region; ``hard`` is ``[R, H, W]`` in {0, 1}."""
    n = len(boxes)
    if policy == "later_on_top":
        paint_order = list(range(n))
    else:
        # Largest first so smaller boxes are painted over them; equal areas keep list order.
        paint_order = sorted(range(n), key=lambda i: -_area(boxes[i]))
    owner = torch.full(hard.shape[1:], -1, dtype=torch.int64)
    for i in paint_order:
        x1, y1, x2, y2 = boxes[i]
        owner[y1:y2, x1:x2] = i
    return (owner[None] == torch.arange(n)[:, None, None]).to(hard.dtype)


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _box_blur(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable box blur of ``[C, H, W]`` masks with edge replication (keeps partitions of unity)."""
    size = 2 * radius + 1
    x = masks[None]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.avg_pool2d(x, (1, size), stride=1)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.avg_pool2d(x, (size, 1), stride=1)
    return x[0].clamp_(0.0, 1.0)
