"""Contact sheets of planned layouts, so plans are reviewed by eye.

usage: python -m mepg_core.planner.contact_sheet PROMPTS(.jsonl|.txt) OUT_DIR [--engine rules|english]
       [--per-page 12] [--columns 4] [--tile 320]

PROMPTS is a JSONL file of {"prompt": ...} lines or a text file of one prompt per line. Writes
OUT_DIR/sheet-001.png, ...: each tile is the layout's box preview with the prompt's start printed under it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..preview import draw_layout
from .offline import plan_offline

CAPTION_LINES = 4


def read_prompts(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{path}:{n}: a line needs a string 'prompt'")
                line = obj["prompt"]
            out.append(line)
    return out


def tile(prompt: str, engine: str, size: int) -> Image.Image:
    """One tile: the layout preview (size x size) and the prompt under it."""
    font = ImageFont.load_default()
    cap_h = 12 * CAPTION_LINES + 8
    img = Image.new("RGB", (size, size + cap_h), (255, 255, 255))
    try:
        layout = plan_offline(prompt, engine=engine)
        arr = draw_layout(layout, size, size)
        img.paste(Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)), (0, 0))
    except (ValueError, TypeError) as exc:
        ImageDraw.Draw(img).text((6, size // 2), f"error: {exc}"[:60], fill=(200, 0, 0), font=font)
    lines = textwrap.wrap(prompt, width=max(20, size // 6))[:CAPTION_LINES]
    ImageDraw.Draw(img).multiline_text((4, size + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    return img


def write_sheets(prompts: list[str], out_dir: str, engine: str = "english", per_page: int = 12,
                 columns: int = 4, size: int = 320) -> list[str]:
    """Write the pages; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for page, start in enumerate(range(0, len(prompts), per_page), 1):
        tiles = [tile(p, engine, size) for p in prompts[start:start + per_page]]
        rows = -(-len(tiles) // columns)
        th = tiles[0].height
        sheet = Image.new("RGB", (columns * (size + 8), rows * (th + 8)), (230, 230, 230))
        for k, t in enumerate(tiles):
            r, c = divmod(k, columns)
            sheet.paste(t, (c * (size + 8) + 4, r * (th + 8) + 4))
        path = os.path.join(out_dir, f"sheet-{page:03d}.png")
        sheet.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts")
    ap.add_argument("out_dir")
    ap.add_argument("--engine", choices=("rules", "english"), default="english")
    ap.add_argument("--per-page", type=int, default=12)
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--tile", type=int, default=320)
    args = ap.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not prompts:
        print(f"error: {args.prompts} holds no prompts", file=sys.stderr)
        return 2
    for path in write_sheets(prompts, args.out_dir, args.engine, args.per_page, args.columns, args.tile):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
