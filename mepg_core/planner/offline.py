"""The offline planner: a deterministic, rule-based prompt -> layout planner (no model, no network).

:func:`plan_offline` reads the prompt (:mod:`.parse`), places the objects (:mod:`.arrange`) and writes a
schema-v1 :class:`~mepg_core.layout.Layout`: the cleaned prompt as the global prompt, one region per
object instance with the object's own words as its prompt, its style, and a box that satisfies the
prompt's spatial relations under GenEval's rule. Text that cannot be read as English objects (another
language, no nouns) gives one large region carrying the text, so every prompt gets a usable layout.
"""

from __future__ import annotations

import random
import re
import unicodedata

from ..layout import MAX_CANVAS, MAX_REGIONS, MAX_TEXT_CHARS, Canvas, Layout, Region
from . import lexicon as lx
from .arrange import arrange
from .compose import compose
from .parse import article, parse_prompt
from .region_text import REGION_PROMPT_WORDS, region_prompt
from .scene import Mention, Scene

ENGINES = ("rules", "english")

PARSE_CHARS = 2000        # characters read for objects; the global prompt keeps up to MAX_TEXT_CHARS
FALLBACK_BOX = (60, 60, 940, 940)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_prompt(text: str) -> str:
    """Whitespace collapsed, control characters removed, Unicode normalised (NFC)."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL_RE.sub(" ", text)
    return " ".join(text.split())


def _truncate_words(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def plan_offline(
    prompt: str,
    *,
    max_regions: int = 16,
    width: int = 1024,
    height: int = 1024,
    seed: int = 0,
    engine: str = "english",
) -> Layout:
    """Plan a layout for ``prompt`` with rules only; the same arguments always give the same layout.

    ``max_regions`` caps the number of regions (instances beyond it are dropped, later objects first
    once every object has one); ``width``/``height`` are the canvas in pixels (boxes keep believable
    aspect ratios on it); ``seed`` 0 gives the canonical layout, any other seed jitters sizes and
    positions reproducibly. ``engine`` picks the reading: ``"english"`` (the default: a real English parse with
    spaCy, :mod:`.reader`, and the composition arranger, :mod:`.compose`) or ``"rules"`` (the earlier
    word rules and constraint grid, kept for comparison). Raises
    ``ValueError`` for an empty prompt or bad arguments, :class:`.reading.EnglishPipelineMissing` when the
    English engine's pipeline is not installed.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    _check_int("max_regions", max_regions, 1, MAX_REGIONS)
    _check_int("width", width, 8, MAX_CANVAS)
    _check_int("height", height, 8, MAX_CANVAS)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    text = clean_prompt(prompt)
    if not text:
        raise ValueError("empty prompt: the planner needs text describing the picture")
    global_prompt = _truncate_words(text, MAX_TEXT_CHARS)
    canvas = Canvas(int(width), int(height))

    if engine == "english":
        from .reader import read_scene  # loads spaCy on first use

        scene = read_scene(_truncate_words(text, PARSE_CHARS))
    else:
        scene = parse_prompt(_truncate_words(text, PARSE_CHARS))
    mentions = [m for m in scene.mentions if m.count > 0 and m.label]
    foreign = _looks_foreign(text, scene)
    if not mentions or foreign:
        return _fallback_layout(global_prompt, scene, canvas, foreign)

    _match_container_counts(mentions, scene)
    _cap_counts(mentions, max_regions)
    mentions = [m for m in mentions if m.count > 0]
    kept = {m.index for m in mentions}
    relations = [r for r in scene.relations if r.subject in kept and all(t in kept for t in r.targets)]
    rng = random.Random(f"{seed}\x00{text}") if seed else None
    place = compose if engine == "english" else arrange
    boxes = place(mentions, relations, canvas.width, canvas.height, rng)

    default_style = scene.global_style or scene.framing_style
    regions = []
    for m in mentions:
        style = m.style or default_style
        instance_words = _instance_words(m, boxes.get(m.index, []))
        for box, extra in zip(boxes.get(m.index, []), instance_words):
            text = region_prompt(m, extra) if engine == "english" else region_text(m)
            regions.append(Region(label=m.label, prompt=text, box=box, style=style))
    negative = ", ".join(dict.fromkeys(scene.negatives))
    return Layout(global_prompt=global_prompt, regions=tuple(regions), canvas=canvas,
                  negative_prompt=_truncate_words(negative, MAX_TEXT_CHARS))


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _match_container_counts(mentions: list[Mention], scene: Scene) -> None:
    """"two cacti in pots": a vague plural holder gets as many instances as what it holds."""
    by_index = {m.index: m for m in mentions}
    for r in scene.relations:
        if r.kind != "inside" or len(r.targets) != 1:
            continue
        child, holder = by_index.get(r.subject), by_index.get(r.targets[0])
        if child and holder and child.count_explicit and not holder.count_explicit and holder.count > 1:
            holder.count = child.count


def _cap_counts(mentions: list[Mention], max_regions: int) -> None:
    """Keep at most ``max_regions`` instances: one per object first (in order), then the counts."""
    budget = max_regions
    wanted = [m.count for m in mentions]
    for m in mentions:
        m.count = 0
    for m in mentions:
        if budget == 0:
            break
        m.count, budget = 1, budget - 1
    for m, want in zip(mentions, wanted):
        extra = min(want - m.count, budget) if m.count else 0
        m.count += max(0, extra)
        budget -= max(0, extra)


def region_text(m: Mention) -> str:
    """The rules engine's region prompt: its modifiers, its noun, its pose and attached details."""
    words = [w for w in m.modifiers if w != "and"]
    noun = m.head_text or m.label
    if m.label in lx.PLURALIA_TANTUM:
        body = " ".join(["a pair of", *words, noun])
    else:
        first = (words[0] if words else noun)
        det = "the" if m.determiner == "the" and m.count == 1 else article(first)
        body = " ".join([det, *words, noun])
    tail = " ".join(m.post + m.extras)
    text = f"{body} {tail}".strip() if tail else body
    parts = text.split()
    if len(parts) > REGION_PROMPT_WORDS:
        text = " ".join(parts[:REGION_PROMPT_WORDS])
    return _truncate_words(text, MAX_TEXT_CHARS)


def _instance_words(m: Mention, boxes: list) -> list[str]:
    """Words for single instances ("the one in the middle is black"), by where their box is."""
    extra = [""] * len(boxes)
    if not m.one_of or not boxes:
        return extra
    order = sorted(range(len(boxes)), key=lambda k: (boxes[k][0] + boxes[k][2], boxes[k][1]))
    for where, words in m.one_of:
        pick = {"left": order[0], "right": order[-1], "first": order[0], "last": order[-1]}.get(
            where, order[len(order) // 2])
        extra[pick] = f"{extra[pick]} {words}".strip()
    return extra


def _looks_foreign(text: str, scene: Scene) -> bool:
    """Mostly non-Latin letters, or Latin words of which too few are English."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return True
    non_ascii = sum(1 for ch in letters if not ch.isascii())
    if non_ascii > 0.3 * len(letters):
        return True
    if scene.word_count >= 3 and scene.known_words < 0.4 * scene.word_count:
        return True
    # no English function word at all and few English words: "un chat rouge à côté d'un chien"
    return scene.word_count >= 4 and scene.stop_words == 0 and scene.known_words < 0.7 * scene.word_count


def _fallback_layout(global_prompt: str, scene: Scene, canvas: Canvas, foreign: bool) -> Layout:
    """One large region carrying the whole text (the prompt names no object we can place)."""
    words = global_prompt.split()
    region_prompt = _truncate_words(" ".join(words[:REGION_PROMPT_WORDS]), MAX_TEXT_CHARS)
    if not foreign and scene.scene_words:
        label = scene.scene_words[0]   # "a forest at night": the setting is the picture
    else:
        label = " ".join(words[:3])[:40]
    x1, y1, x2, y2 = FALLBACK_BOX
    style = scene.global_style or scene.framing_style
    region = Region(label=label, prompt=region_prompt, box=(x1, y1, x2, y2), style=style)
    return Layout(global_prompt=global_prompt, regions=(region,), canvas=canvas,
                  negative_prompt=", ".join(dict.fromkeys(scene.negatives)))
