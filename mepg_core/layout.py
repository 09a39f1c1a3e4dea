"""The layout: the one data structure every part of the pack shares (schema version 1).

A layout is a global prompt plus regions; each region has a box ``(x1, y1, x2, y2)`` of integers in
``[0, 1000]`` relative to the canvas (origin top-left), a label, a region prompt, a style, an optional
forced expert and a fusion weight. Reading a layout never executes anything: JSON is parsed, every
problem is collected with its path (``regions[2].box``), repairable problems are fixed with a warning,
and unrepairable ones raise :class:`LayoutError` listing all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
COORD_MAX = 1000
MAX_REGIONS = 64
MAX_CANVAS = 16384
MAX_TEXT_CHARS = 2000
# A layout is 4 levels deep and an editor state 5; anything far deeper is hostile or broken.
MAX_JSON_DEPTH = 32
# Numbers larger than this are never meant (boxes are 0-1000, canvases at most 16384 px).
MAX_MAGNITUDE = 10**15
# CLIP reads 77 tokens including start/end; about 0.75 words per token is typical for plain English.
LONG_PROMPT_WORDS = 55

_REGION_KEYS = ("label", "prompt", "box", "style", "expert", "weight")
_TOP_KEYS = ("version", "canvas", "global_prompt", "negative_prompt", "regions")


class LayoutError(ValueError):
    """A layout that cannot be used. ``problems`` lists each one as ``"path: message"``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid layout ({len(self.problems)} problem(s)):\n{shown}")


@dataclass(frozen=True)
class Canvas:
    width: int = 1024
    height: int = 1024


@dataclass(frozen=True)
class Region:
    """One object instance. ``box`` is ``(x1, y1, x2, y2)`` in layout units ``[0, 1000]``."""

    label: str
    prompt: str
    box: tuple[int, int, int, int]
    style: str | None = None
    expert: str | None = None
    weight: float = 1.0

    @property
    def area(self) -> int:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "prompt": self.prompt,
            "box": list(self.box),
            "style": self.style,
            "expert": self.expert,
            "weight": self.weight,
        }


@dataclass(frozen=True)
class Layout:
    global_prompt: str = ""
    regions: tuple[Region, ...] = ()
    canvas: Canvas = field(default_factory=Canvas)
    negative_prompt: str = ""
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "canvas": {"width": self.canvas.width, "height": self.canvas.height},
            "global_prompt": self.global_prompt,
            "negative_prompt": self.negative_prompt,
            "regions": [r.to_dict() for r in self.regions],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def with_canvas(self, width: int, height: int) -> Layout:
        return Layout(self.global_prompt, self.regions, Canvas(int(width), int(height)),
                      self.negative_prompt, self.version)

    def with_regions(self, regions: Iterable[Region]) -> Layout:
        return Layout(self.global_prompt, tuple(regions), self.canvas, self.negative_prompt, self.version)

    def pixel_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Each region's box in pixels of a ``width`` x ``height`` image (see :func:`box_to_grid`)."""
        return [box_to_grid(r.box, width, height) for r in self.regions]

    def latent_boxes(self, width: int, height: int, factor: int = 8) -> list[tuple[int, int, int, int]]:
        """Each region's box in cells of the latent of a ``width`` x ``height`` image (``factor`` px per cell)."""
        lw, lh = latent_size(width, height, factor)
        return [box_to_grid(r.box, lw, lh) for r in self.regions]


def latent_size(width: int, height: int, factor: int = 8) -> tuple[int, int]:
    """Latent grid size of an image; ComfyUI's empty latents floor the pixel size by ``factor``."""
    if width < factor or height < factor:
        raise ValueError(f"image {width}x{height} is smaller than one latent cell ({factor} px)")
    return width // factor, height // factor


def box_to_grid(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Map a layout box onto a ``width`` x ``height`` grid of cells; returns half-open cell edges.

    Each edge is rounded on its own (``round(v * size / 1000)``, halves up), so two boxes that share an
    edge in layout units share it on every grid and a tiling layout tiles every grid exactly. A box
    that would cover no cell keeps one cell, placed inside the grid.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"grid size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    gx1, gx2 = _edge(x1, width), _edge(x2, width)
    gy1, gy2 = _edge(y1, height), _edge(y2, height)
    gx1, gx2 = _at_least_one(gx1, gx2, width)
    gy1, gy2 = _at_least_one(gy1, gy2, height)
    return gx1, gy1, gx2, gy2


def _edge(value: int, size: int) -> int:
    return min(size, max(0, (int(value) * size + COORD_MAX // 2) // COORD_MAX))


def _at_least_one(a: int, b: int, size: int) -> tuple[int, int]:
    if b > a:
        return a, b
    a = min(a, size - 1)
    return a, a + 1


# --------------------------------------------------------------------------------------------------
# Parsing, validation and repair


@dataclass
class _Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{path}: {msg}")


def parse_layout(
    source: str | bytes | dict[str, Any] | Layout,
    *,
    require_regions: bool = True,
    max_regions: int = MAX_REGIONS,
) -> tuple[Layout, list[str]]:
    """Read a layout from JSON text or a decoded object; repair what can be repaired.

    Returns ``(layout, warnings)``; each warning says what was repaired and where. Raises
    :class:`LayoutError` listing every unrepairable problem with its path.
    """
    if isinstance(source, Layout):
        source = source.to_dict()
    if isinstance(source, (bytes, bytearray)):
        source = source.decode("utf-8", errors="replace")
    if isinstance(source, str):
        text = source.strip()
        if not text:
            raise LayoutError(["$: empty text; expected a layout JSON object"])
        try:
            source = load_json(text)
        except ValueError as exc:
            raise LayoutError([f"$: {exc}"]) from None
    if not isinstance(source, dict):
        raise LayoutError([f"$: expected a JSON object, got {type(source).__name__}"])
    try:
        check_json_depth(source)
    except ValueError as exc:
        raise LayoutError([f"$: {exc}"]) from None

    rep = _Report()
    obj = source
    for key in obj:
        if key not in _TOP_KEYS:
            rep.warn(str(key), "unknown key ignored")

    version = obj.get("version", None)
    if version is None:
        rep.warn("version", f"missing; assumed {SCHEMA_VERSION}")
    elif isinstance(version, bool) or not isinstance(version, int):
        rep.error("version", f"must be the integer {SCHEMA_VERSION}, got {version!r}")
    elif version != SCHEMA_VERSION:
        rep.error("version", f"unsupported schema version {version} (this pack reads version {SCHEMA_VERSION})")

    canvas = _parse_canvas(obj.get("canvas"), rep)
    global_prompt = _text(obj.get("global_prompt", ""), "global_prompt", rep, allow_empty=True)
    negative = _text(obj.get("negative_prompt", ""), "negative_prompt", rep, allow_empty=True)

    raw_regions = obj.get("regions", None)
    regions: list[Region] = []
    if raw_regions is None:
        raw_regions = []
    if not isinstance(raw_regions, list):
        rep.error("regions", f"must be a list, got {type(raw_regions).__name__}")
        raw_regions = []
    if len(raw_regions) > max_regions:
        rep.error("regions", f"{len(raw_regions)} regions; at most {max_regions} are allowed")
        raw_regions = []
    if require_regions and not raw_regions and not any(e.startswith("regions:") for e in rep.errors):
        rep.error("regions", "no regions; a layout needs at least one")
    for i, raw in enumerate(raw_regions):
        region = _parse_region(raw, f"regions[{i}]", canvas, rep)
        if region is not None:
            regions.append(region)

    if rep.errors:
        raise LayoutError(rep.errors)
    return Layout(global_prompt or "", tuple(regions), canvas, negative or "", SCHEMA_VERSION), rep.warnings


def layout_from_json(source: str | bytes | dict[str, Any], **kwargs: Any) -> Layout:
    """:func:`parse_layout` without the warnings."""
    return parse_layout(source, **kwargs)[0]


def reject_json_constant(name: str) -> float:
    """``parse_constant`` for ``json.loads``: NaN and ±Infinity are not JSON data we accept anywhere."""
    raise ValueError(f"{name} is not allowed")


def load_json(text: str | bytes) -> Any:
    """``json.loads`` for text from outside: NaN/Infinity refused and nesting limited to
    :data:`MAX_JSON_DEPTH`. Raises ValueError with a message ready to follow a path (``"$: ..."``)."""
    try:
        value = json.loads(text, parse_constant=reject_json_constant)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    check_json_depth(value)
    return value


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ValueError if lists/objects in ``value`` nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            raise ValueError(f"nested more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))


def short_repr(value: Any, limit: int = 60) -> str:
    """A value for an error message: huge integers by their digit count, long reprs cut to ``limit``."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_MAGNITUDE:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"
        return f"{'a negative' if value < 0 else 'an'} integer with {digits} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a real, finite number of sensible size (``|v| <= 1e15``), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= MAX_MAGNITUDE else None
    return value if math.isfinite(value) and abs(value) <= MAX_MAGNITUDE else None


def _parse_canvas(raw: Any, rep: _Report) -> Canvas:
    if raw is None:
        rep.warn("canvas", "missing; assumed 1024x1024")
        return Canvas()
    if not isinstance(raw, dict):
        rep.error("canvas", f"must be an object with width and height, got {type(raw).__name__}")
        return Canvas()
    dims = []
    for key in ("width", "height"):
        v = raw.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not math.isfinite(v) \
                or v <= 0 or v != int(v):
            rep.error(f"canvas.{key}", f"must be a positive integer, got {short_repr(v)}")
            dims.append(1024)
        elif v > MAX_CANVAS:
            rep.error(f"canvas.{key}", f"{short_repr(v)} exceeds the maximum {MAX_CANVAS}")
            dims.append(1024)
        else:
            dims.append(int(v))
    return Canvas(dims[0], dims[1])


def _text(value: Any, path: str, rep: _Report, *, allow_empty: bool) -> str | None:
    if value is None:
        value = ""
    if not isinstance(value, str):
        rep.error(path, f"must be a string, got {type(value).__name__}")
        return None
    value = " ".join(value.split())
    if len(value) > MAX_TEXT_CHARS:
        rep.error(path, f"{len(value)} characters; at most {MAX_TEXT_CHARS}")
        return None
    if not value and not allow_empty:
        return ""
    return value


def _parse_region(raw: Any, path: str, canvas: Canvas, rep: _Report) -> Region | None:
    if not isinstance(raw, dict):
        rep.error(path, f"must be an object, got {type(raw).__name__}")
        return None
    for key in raw:
        if key not in _REGION_KEYS:
            rep.warn(f"{path}.{key}", "unknown key ignored")
    n_errors = len(rep.errors)

    label = _text(raw.get("label", ""), f"{path}.label", rep, allow_empty=True)
    prompt = _text(raw.get("prompt", ""), f"{path}.prompt", rep, allow_empty=True)
    if label is not None and prompt is not None:
        if not label and not prompt:
            rep.error(f"{path}", "label and prompt are both empty")
        elif not prompt:
            rep.warn(f"{path}.prompt", f"empty; set to the label {label!r}")
            prompt = label
        elif not label:
            label = _label_from_prompt(prompt)
            rep.warn(f"{path}.label", f"empty; set to {label!r} from the prompt")
        if prompt and len(prompt.split()) > LONG_PROMPT_WORDS:
            rep.warn(f"{path}.prompt", f"{len(prompt.split())} words; CLIP reads about 75 tokens, the rest is lost")

    box = _parse_box(raw.get("box"), f"{path}.box", canvas, rep)

    style = raw.get("style")
    if style is not None:
        style = _text(style, f"{path}.style", rep, allow_empty=True) or None
    expert = raw.get("expert")
    if expert is not None:
        expert = _text(expert, f"{path}.expert", rep, allow_empty=True) or None

    weight = raw.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            isinstance(weight, float) and not math.isfinite(weight):
        rep.error(f"{path}.weight", f"must be a finite number, got {short_repr(weight)}")
    elif weight < 0 or weight > 10:
        rep.error(f"{path}.weight", f"{short_repr(weight)} is outside [0, 10]")

    if len(rep.errors) > n_errors or box is None:
        return None
    return Region(label=label or "", prompt=prompt or "", box=box, style=style, expert=expert,
                  weight=float(weight))


def _label_from_prompt(prompt: str) -> str:
    words = prompt.split()
    return " ".join(words[:3])


def _parse_box(raw: Any, path: str, canvas: Canvas, rep: _Report) -> tuple[int, int, int, int] | None:
    if raw is None:
        rep.error(path, "missing; expected [x1, y1, x2, y2]")
        return None
    if isinstance(raw, dict) and all(k in raw for k in ("x1", "y1", "x2", "y2")):
        raw = [raw["x1"], raw["y1"], raw["x2"], raw["y2"]]
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        rep.error(path, f"expected 4 numbers [x1, y1, x2, y2], got {short_repr(raw)}")
        return None
    vals: list[float] = []
    for k, v in zip(("x1", "y1", "x2", "y2"), raw):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            rep.error(path, f"{k} is not a number ({short_repr(v)})")
            return None
        if isinstance(v, float) and not math.isfinite(v):
            rep.error(path, f"{k} is not finite ({v!r})")
            return None
        if finite_number(v) is None:
            rep.error(path, f"{k} is far out of range ({short_repr(v)}); coordinates are 0-1000")
            return None
        vals.append(float(v))

    hi = max(vals)
    lo = min(vals)
    scaled = True
    if hi <= 1.0 and lo >= 0.0 and any(v != int(v) for v in vals):
        rep.warn(path, f"{_fmt(vals)} looks like a 0-1 scale; scaled to 0-1000")
        vals = [v * COORD_MAX for v in vals]
    elif hi > COORD_MAX * 1.05 and lo >= 0 and _fits_canvas(vals, canvas):
        rep.warn(path, f"{_fmt(vals)} looks like pixels of the {canvas.width}x{canvas.height} canvas; "
                       "scaled to 0-1000")
        sx, sy = COORD_MAX / canvas.width, COORD_MAX / canvas.height
        vals = [vals[0] * sx, vals[1] * sy, vals[2] * sx, vals[3] * sy]
    else:
        scaled = False

    ints = [int(round(v)) for v in vals]
    if not scaled and any(abs(v - i) > 1e-6 for v, i in zip(vals, ints)):
        rep.warn(path, f"{_fmt(vals)} rounded to integers {ints}")
    clamped = [min(COORD_MAX, max(0, v)) for v in ints]
    if clamped != ints:
        rep.warn(path, f"{ints} out of range; clamped to {clamped}")
    x1, y1, x2, y2 = clamped
    if x1 > x2 or y1 > y2:
        fixed = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        rep.warn(path, f"corners swapped {clamped}; reordered to {fixed}")
        x1, y1, x2, y2 = fixed
    if x1 == x2 or y1 == y2:
        axis = "x1 == x2" if x1 == x2 else "y1 == y2"
        rep.error(path, f"zero area ({axis}) in {[x1, y1, x2, y2]}")
        return None
    return x1, y1, x2, y2


def _fits_canvas(vals: list[float], canvas: Canvas) -> bool:
    return max(vals[0], vals[2]) <= canvas.width and max(vals[1], vals[3]) <= canvas.height


def _fmt(vals: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in vals) + "]"
