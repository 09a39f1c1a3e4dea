"""Score layouts against GenEval-style metadata, the way GenEval scores images, but on the plan.

A plan is the upper bound of what the picture can get right, so we check it the way GenEval checks a
generated image, with the layout's regions standing in for detected objects:

- objects: regions are matched to a class by label (lower case, spaces collapsed, singular, a few exact
  synonyms such as "sofa" = "couch"); each ``include`` class needs exactly ``count`` regions (GenEval
  asks for at least ``count`` and uses ``exclude`` for "not more"; the plan contract is exact). Every
  ``exclude`` entry fails the prompt when ``count`` or more regions of that class exist.
- colour: every matching region's prompt names the required colour, and no other of GenEval's ten
  colour words (the class name itself is removed first, so "an orange orange" is orange). A region
  whose prompt names two colours is ambiguous, as GenEval's colour classifier would find it.
- position: ``[relation, i]`` asks every matching region to stand in ``relation`` to every region of
  the ``i``-th include entry, under GenEval's rule (:mod:`.relations`) on the canvas in pixels; the
  ``i``-th entry must itself have matched.
- style (an extension, not in GenEval): ``"style": "anime"`` asks every matching region for that style.

Per tag the accuracy is the share of prompts that pass; overall is the mean of the per-tag accuracies
(as GenEval reports it). ``strict_count=False`` gives GenEval's own counting (at least ``count``;
colour and position checked on the first ``count`` regions).

Command line (prints per-tag and overall scores; ``--json`` also writes every prompt's result)::

    python -m mepg_core.planner.scoring --layouts LAYOUTS.jsonl [--metadata META.jsonl] [--json OUT]
        [--lenient-count] [--show-failures N]

``LAYOUTS.jsonl`` has one layout per line, in the order of the metadata lines (what
``python -m mepg_core.planner`` writes). ``--metadata`` defaults to the GenEval file shipped in
``mepg_core/planner/data/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..layout import Layout, LayoutError, parse_layout
from .lexicon import GENEVAL_COLORS, singular
from .relations import relative_position

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GENEVAL_METADATA = os.path.join(DATA_DIR, "geneval_metadata.jsonl")

# Exact synonyms only: merging a hypernym ("man" -> "person") would let a prompt that names both
# ("two men and a person") be scored wrong.
LABEL_SYNONYMS = {
    "television": "tv", "tv set": "tv", "television set": "tv", "sofa": "couch", "motorbike": "motorcycle",
    "aeroplane": "airplane", "plane": "airplane", "bike": "bicycle", "mobile phone": "cell phone",
    "cellphone": "cell phone", "smartphone": "cell phone", "hair dryer": "hair drier",
    "hairdryer": "hair drier", "doughnut": "donut", "remote": "tv remote", "remote control": "tv remote",
    "keyboard": "computer keyboard", "fridge": "refrigerator", "tennis racquet": "tennis racket",
    "racket": "tennis racket", "racquet": "tennis racket", "ski": "skis", "pair of skis": "skis",
    "pair of scissors": "scissors", "wineglass": "wine glass", "hotdog": "hot dog", "teddy": "teddy bear",
    "mouse (computer)": "computer mouse", "stop-sign": "stop sign", "firehydrant": "fire hydrant",
    "houseplant": "potted plant", "pot plant": "potted plant", "handbag purse": "handbag", "purse": "handbag",
    "dinner table": "dining table", "cup of coffee": "cup", "football": "sports ball", "soccer ball": "sports ball",
}
_ARTICLES = ("a ", "an ", "the ")


def normalize_label(label: str) -> str:
    """Canonical class name for matching: lower case, no article, singular, exact synonyms merged."""
    text = " ".join(str(label).lower().replace("-", " ").replace("_", " ").split())
    for art in _ARTICLES:
        if text.startswith(art):
            text = text[len(art):]
    if text in LABEL_SYNONYMS:
        return LABEL_SYNONYMS[text]
    text = singular(text)[0] if text else text
    return LABEL_SYNONYMS.get(text, text)


_STYLE_SYNONYMS = {"photorealistic": "photo", "realistic": "photo", "photograph": "photo",
                   "photography": "photo", "watercolour": "watercolor", "pixel-art": "pixel art",
                   "manga": "anime", "3d": "3d render"}


def normalize_style(style: str | None) -> str | None:
    """One spelling per style: "Pixel art style", "pixel-art" and "pixel art" are the same style."""
    if style is None:
        return None
    from ..styles import canonical_style  # the pack's style vocabulary; imported late (it imports lexicon)

    return canonical_style(str(style)) or None


@dataclass
class PromptResult:
    index: int
    tag: str
    prompt: str
    correct: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class ScoreReport:
    per_tag: dict[str, float]
    counts: dict[str, tuple[int, int]]   # tag -> (correct, total)
    overall: float
    prompts: list[PromptResult]

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall, "per_tag": self.per_tag,
                "counts": {k: list(v) for k, v in self.counts.items()},
                "prompts": [asdict(p) for p in self.prompts]}

    def summary(self) -> str:
        lines = [f"{'tag':<16}{'accuracy':>9}{'correct':>10}"]
        for tag in sorted(self.per_tag):
            ok, total = self.counts[tag]
            lines.append(f"{tag:<16}{self.per_tag[tag]:>9.4f}{f'{ok}/{total}':>10}")
        lines.append(f"{'overall':<16}{self.overall:>9.4f}{'':>10}  (mean of the per-tag accuracies)")
        return "\n".join(lines)


def _colour_words(region_prompt: str, class_name: str) -> set[str]:
    text = " " + " ".join(re.findall(r"[a-z]+", region_prompt.lower())) + " "
    name = " ".join(re.findall(r"[a-z]+", class_name.lower()))
    # Drop the last mention of the class name ("an orange orange" keeps the colour word).
    matches = list(re.finditer(rf" {re.escape(name)}(?:e?s)? ", text)) if name else []
    if matches:
        m = matches[-1]
        text = text[:m.start()] + " " + text[m.end():]
    words = set(text.split())
    return {c for c in GENEVAL_COLORS if c in words}


def _region_boxes(regions: Sequence[Any]) -> list[tuple[float, float, float, float]]:
    return [tuple(r.box) for r in regions]


def score_layout(layout: Layout | dict | str, meta: dict[str, Any], *, strict_count: bool = True,
                 index: int = 0) -> PromptResult:
    """Score one layout against one metadata entry; ``correct`` is False with reasons when it fails."""
    tag = str(meta.get("tag", "untagged"))
    prompt = str(meta.get("prompt", ""))
    result = PromptResult(index=index, tag=tag, prompt=prompt, correct=True)
    try:
        if not isinstance(layout, Layout):
            layout = parse_layout(layout, require_regions=False)[0]
    except LayoutError as exc:
        result.correct = False
        result.reasons.append(f"invalid layout: {exc.problems}")
        return result
    width, height = layout.canvas.width, layout.canvas.height
    by_class: dict[str, list[Any]] = {}
    for region in layout.regions:
        by_class.setdefault(normalize_label(region.label), []).append(region)

    matched: list[list[Any] | None] = []
    for k, req in enumerate(meta.get("include", [])):
        cls = normalize_label(req["class"])
        need = int(req.get("count", 1))
        found = by_class.get(cls, [])
        ok = True
        if (strict_count and len(found) != need) or (not strict_count and len(found) < need):
            ok = False
            result.reasons.append(f"include[{k}] {req['class']}: expected {'exactly ' if strict_count else '>='}"
                                  f"{need}, found {len(found)}")
        checked = found if strict_count else found[:need]
        if ok and "color" in req:
            colour = str(req["color"]).lower()
            for r in checked:
                named = _colour_words(r.prompt, req["class"])
                if named != {colour}:
                    ok = False
                    shown = ", ".join(sorted(named)) or "none"
                    result.reasons.append(f"include[{k}] {req['class']}: colour {colour} expected, "
                                          f"region prompt {r.prompt!r} names {shown}")
                    break
        if ok and "style" in req:
            want = normalize_style(req["style"])
            for r in checked:
                if normalize_style(r.style) != want:
                    ok = False
                    result.reasons.append(f"include[{k}] {req['class']}: style {want!r} expected, got {r.style!r}")
                    break
        if ok and "position" in req:
            relation, target = req["position"][0], int(req["position"][1])
            targets = matched[target] if 0 <= target < len(matched) else None
            if targets is None:
                ok = False
                result.reasons.append(f"include[{k}] {req['class']}: no matched target include[{target}] "
                                      f"to be {relation}")
            else:
                for r in checked:
                    for t in targets:
                        found_rel = relative_position(r.box, t.box, width, height)
                        if relation not in found_rel:
                            ok = False
                            result.reasons.append(
                                f"include[{k}] {req['class']} {list(r.box)} is not {relation} "
                                f"{t.label} {list(t.box)} (found {sorted(found_rel) or 'no relation'})")
                            break
                    if not ok:
                        break
        if not ok:
            result.correct = False
        matched.append(checked if ok else None)

    for k, req in enumerate(meta.get("exclude", [])):
        cls = normalize_label(req["class"])
        limit = int(req.get("count", 1))
        found = by_class.get(cls, [])
        if len(found) >= limit:
            result.correct = False
            result.reasons.append(f"exclude[{k}] {req['class']}: fewer than {limit} expected, found {len(found)}")
    return result


def score_layouts(layouts: Iterable[Layout | dict | str], metadata: Iterable[dict[str, Any]], *,
                  strict_count: bool = True) -> ScoreReport:
    """Score layouts against metadata entries in the same order; per tag, overall and per prompt."""
    layouts = list(layouts)
    metadata = list(metadata)
    if len(layouts) != len(metadata):
        raise ValueError(f"{len(layouts)} layouts for {len(metadata)} metadata entries; "
                         "they must be in the same order, one per line")
    results = [score_layout(lay, meta, strict_count=strict_count, index=i)
               for i, (lay, meta) in enumerate(zip(layouts, metadata))]
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(r.tag, [0, 0])
        c[0] += int(r.correct)
        c[1] += 1
    per_tag = {tag: ok / total for tag, (ok, total) in counts.items()}
    overall = sum(per_tag.values()) / len(per_tag) if per_tag else 0.0
    return ScoreReport(per_tag=per_tag, counts={k: (v[0], v[1]) for k, v in counts.items()},
                       overall=overall, prompts=results)


def load_jsonl(path: str) -> list[dict[str, Any]]:
    """Objects from a JSON-lines file (blank lines skipped); errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{no}: not valid JSON ({exc})") from None
    return rows


def load_metadata(path: str | None = None) -> list[dict[str, Any]]:
    """GenEval-style metadata entries; the shipped GenEval file when ``path`` is None."""
    rows = load_jsonl(path or GENEVAL_METADATA)
    for no, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "include" not in row:
            raise ValueError(f"{path or GENEVAL_METADATA}: entry {no} has no 'include' list")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mepg_core.planner.scoring",
                                 description="Score layouts against GenEval-style metadata (per tag and overall).")
    ap.add_argument("--layouts", required=True, help="JSONL, one layout per line, in metadata order")
    ap.add_argument("--metadata", default=None, help="GenEval-style JSONL (default: the shipped GenEval file)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the full report (every prompt) here")
    ap.add_argument("--lenient-count", action="store_true",
                    help="GenEval's counting: at least 'count' regions (default: exactly 'count')")
    ap.add_argument("--show-failures", type=int, default=10, metavar="N", help="print up to N failed prompts")
    args = ap.parse_args(argv)
    try:
        layouts = load_jsonl(args.layouts)
        metadata = load_metadata(args.metadata)
        report = score_layouts(layouts, metadata, strict_count=not args.lenient_count)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    failed = [p for p in report.prompts if not p.correct]
    for p in failed[:max(0, args.show_failures)]:
        print(f"FAIL [{p.index}] {p.tag}: {p.prompt}\n    " + "\n    ".join(p.reasons))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
