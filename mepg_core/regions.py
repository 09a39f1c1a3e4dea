"""The regions of one layout prepared for sampling: boxes and masks at pixel and latent scale.

A :class:`RegionSet` is what ``RegionMaskBuilder`` hands to the sampler (``MEPG_REGIONS``). It holds
no ComfyUI object except the opaque ``conditioning`` values (whatever the host's text encoder made),
so the core can build and test it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import Layout, latent_size
from .masks import RegionMasks, region_masks


@dataclass
class RegionSpec:
    """One region ready for sampling.

    ``pixel_box`` / ``latent_box``: half-open ``(x1, y1, x2, y2)`` on the image / latent grid.
    ``mask``: ``[H, W]`` pixel mask; ``latent_mask``: ``[H/f, W/f]`` latent mask (both after overlap
    resolution and feathering). ``conditioning``: the host's encoding of ``prompt`` (or ``None``).
    """

    index: int
    label: str
    prompt: str
    style: str | None
    expert: str | None
    weight: float
    box: tuple[int, int, int, int]
    pixel_box: tuple[int, int, int, int]
    latent_box: tuple[int, int, int, int]
    mask: torch.Tensor
    latent_mask: torch.Tensor
    conditioning: Any = None


@dataclass
class RegionSet:
    """All regions of a layout on a ``width`` x ``height`` image with a latent ``factor`` px per cell."""

    layout: Layout
    width: int
    height: int
    factor: int
    overlap: str
    feather_px: float
    regions: list[RegionSpec]
    background: torch.Tensor
    latent_background: torch.Tensor
    global_conditioning: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_width(self) -> int:
        return self.width // self.factor

    @property
    def latent_height(self) -> int:
        return self.height // self.factor

    def pixel_masks(self) -> torch.Tensor:
        """``[R, H, W]`` region masks at pixel scale."""
        if not self.regions:
            return torch.zeros((0, self.height, self.width))
        return torch.stack([r.mask for r in self.regions])

    def latent_masks(self) -> torch.Tensor:
        """``[R, H/f, W/f]`` region masks at latent scale."""
        if not self.regions:
            return torch.zeros((0, self.latent_height, self.latent_width))
        return torch.stack([r.latent_mask for r in self.regions])


def build_region_set(
    layout: Layout,
    width: int,
    height: int,
    *,
    factor: int = 8,
    feather_px: float = 0.0,
    overlap: str = "smaller_on_top",
) -> RegionSet:
    """Masks and boxes of every region at pixel and latent scale (conditioning left empty).

    The latent masks are computed on the latent grid itself (boxes mapped with the same edge rule),
    not by resizing pixel masks, so they are exact whatever the image size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    lw, lh = latent_size(width, height, factor)
    pixel: RegionMasks = region_masks(layout, width, height, feather=feather_px, overlap=overlap)
    latent: RegionMasks = region_masks(layout, lw, lh, feather=feather_px / factor, overlap=overlap)
    specs = []
    for i, r in enumerate(layout.regions):
        specs.append(RegionSpec(
            index=i, label=r.label, prompt=r.prompt, style=r.style, expert=r.expert, weight=r.weight,
            box=r.box, pixel_box=pixel.boxes[i], latent_box=latent.boxes[i],
            mask=pixel.regions[i], latent_mask=latent.regions[i],
        ))
    return RegionSet(layout=layout, width=width, height=height, factor=factor, overlap=overlap,
                     feather_px=feather_px, regions=specs, background=pixel.background,
                     latent_background=latent.background)
