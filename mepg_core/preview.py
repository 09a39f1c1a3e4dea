"""A picture of a layout: each region's box, label and style drawn over a blank canvas or an image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .layout import Layout, box_to_grid

# Distinct, readable colours for up to 12 regions, then repeated.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
]
BLANK = (24, 24, 28)


def region_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def region_caption(index: int, label: str, style: str | None, expert: str | None = None) -> str:
    parts = [f"{index + 1}. {label}"]
    if style:
        parts.append(f"[{style}]")
    if expert:
        parts.append(f"<{expert}>")
    return " ".join(parts)


def draw_layout(layout: Layout, width: int, height: int, background: np.ndarray | None = None) -> np.ndarray:
    """Draw ``layout`` on a ``width`` x ``height`` canvas.

    ``background``: optional ``[H', W', 3]`` float image in [0, 1] (resized to the canvas).
    Returns ``[height, width, 3]`` float32 in [0, 1].
    """
    if background is not None:
        arr = np.clip(np.asarray(background, dtype=np.float32), 0.0, 1.0)
        base = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)[..., :3]).convert("RGB")
        if base.size != (width, height):
            base = base.resize((width, height), Image.BILINEAR)
    else:
        base = Image.new("RGB", (width, height), BLANK)
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line = max(2, round(min(width, height) / 256))
    font = _font(max(12, round(min(width, height) / 40)))
    for i, region in enumerate(layout.regions):
        x1, y1, x2, y2 = box_to_grid(region.box, width, height)
        colour = region_colour(i)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour + (48,), outline=colour + (255,), width=line)
        caption = region_caption(i, region.label, region.style, region.expert)
        tx, ty = x1 + line + 2, y1 + line + 1
        left, top, right, bottom = draw.textbbox((tx, ty), caption, font=font)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0, 170))
        draw.text((tx, ty), caption, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    return np.asarray(out, dtype=np.float32) / 255.0


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()
