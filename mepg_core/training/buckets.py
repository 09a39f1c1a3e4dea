"""Training sizes of images: SDXL-style aspect buckets or a square centre crop (pure PIL + torch).

Images of mixed sizes are normal. ``"bucket"`` puts each image in the :func:`aspect_buckets` bucket of
the resolution whose aspect ratio is nearest its own (in log scale), scales it (Lanczos) to just cover the
bucket and centre-crops it: little is cropped, nothing is distorted, and batches never mix buckets.
``"center_crop"`` scales every image to cover ``resolution × resolution`` and centre-crops it.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_MODES = ("bucket", "center_crop")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def aspect_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """SDXL-style buckets ``(width, height)``: multiples of ``step`` with ``w·h ≤ resolution²`` (the
    largest such ``h`` for each ``w``) and aspect ratio within ``1/max_aspect … max_aspect``."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    area = resolution * resolution
    buckets = set()
    for width in range(step, 4 * resolution + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


class Sizing:
    """How images are sized for training (see the module docstring)."""

    def __init__(self, resolution: int = 1024, mode: str = "bucket", bucket_step: int = 64):
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
        self.resolution = int(resolution)
        self.mode = mode
        self.bucket_step = int(bucket_step)
        self.buckets = aspect_buckets(self.resolution, self.bucket_step)

    def settings(self) -> dict:
        return {"resolution": self.resolution, "resize": self.mode, "bucket_step": self.bucket_step}

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image of this size is trained at."""
        if self.mode == "center_crop":
            return (self.resolution, self.resolution)
        aspect = math.log(width / height)
        return min(self.buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))

    def pixels(self, opened) -> torch.Tensor:
        """An opened PIL image → ``[H, W, 3]`` float32 in [0, 1] (ComfyUI IMAGE layout without the batch
        axis) at its training size (EXIF orientation applied)."""
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(opened).convert("RGB")
        width, height = self.target_size(*image.size)
        scale = max(width / image.size[0], height / image.size[1])
        resized = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
        image = image.resize(resized, Image.LANCZOS)
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        return pixels.float() / 255.0


def image_size(source: str | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` of an image file as shown (EXIF rotation applied) from its header only."""
    from PIL import Image

    with Image.open(source) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in _ROTATED:
            width, height = height, width
    return width, height
