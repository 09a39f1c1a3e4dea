"""The hand-off from the LLM chain to the offline planner's arranger (``boxes_from="arranger"``).

Small models name the objects of a prompt, their counts, attributes and relations far better than they
place boxes. :func:`layout_from_elements` takes what the chain's step 1 wrote and lets the arranger (the
composition engine of the offline planner) place one box per instance so that every relation holds
under the shared scorer's geometry. This module is the one place that knows the arranger's interface:
when the arranger changes, only this module follows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..layout import MAX_CANVAS, MAX_REGIONS, MAX_TEXT_CHARS, Canvas, Layout, Region
from .compose import compose
from .scene import Mention, Relation

__all__ = ["RELATION_KINDS", "layout_from_elements"]

#: relation words (as step 1 writes them, :data:`.schemas.RELATION_WORDS`) -> the arranger's relation kinds
RELATION_KINDS = {
    "left of": "left", "right of": "right", "above": "above", "below": "below", "on": "on", "under": "under",
    "next to": "beside", "beside": "beside", "in front of": "front", "behind": "behind", "in": "inside",
    "inside": "inside", "holding": "holding",
}
_REGION_PROMPT_WORDS = 40


def _region_prompt(label: str, attrs: Sequence[str]) -> str:
    words = [*(a for a in attrs if a and a.lower() not in label.lower().split()), label]
    first = words[0]
    text = " ".join([("an" if first[:1].lower() in "aeiou" else "a"), *words])
    return " ".join(text.split()[:_REGION_PROMPT_WORDS])[:MAX_TEXT_CHARS]


def layout_from_elements(elements: Sequence[dict[str, Any]], relations: Sequence[Sequence[Any]], *,
                         global_prompt: str, width: int, height: int, seed: int = 0) -> Layout:
    """A layout with one region per instance of each element, placed by the arranger.

    ``elements``: ``[{"label", "count", "attrs": [...], "style"}]`` (``attrs`` and ``style`` optional);
    ``relations``: ``[(subject_index, relation_word, object_index)]`` with indices into ``elements`` and
    words from :data:`RELATION_KINDS`. Region prompts are the attributes and the label ("a red apple");
    regions come in element order. ``seed`` 0 gives the canonical placement, others jitter it.
    Raises ``ValueError`` naming the bad element or relation.
    """
    if not isinstance(global_prompt, str) or not global_prompt.strip():
        raise ValueError("global_prompt is empty")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= MAX_CANVAS:
            raise ValueError(f"{name} must be an integer in [8, {MAX_CANVAS}], got {value!r}")
    if not elements:
        raise ValueError("elements is empty; nothing to place")
    mentions: list[Mention] = []
    total = 0
    for i, e in enumerate(elements):
        label = e.get("label") if isinstance(e, dict) else None
        count = e.get("count", 1) if isinstance(e, dict) else None
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"elements[{i}].label must be a non-empty text")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"elements[{i}].count must be a positive integer, got {count!r}")
        attrs = [a for a in (e.get("attrs") or []) if isinstance(a, str) and a.strip()]
        total += count
        mentions.append(Mention(index=i, label=" ".join(label.lower().split()), count=count, count_explicit=True,
                                modifiers=attrs, head_text=label, style=e.get("style") or None))
    if total > MAX_REGIONS:
        raise ValueError(f"elements: {total} instances; a layout holds at most {MAX_REGIONS}")
    rels: list[Relation] = []
    for k, r in enumerate(relations):
        if len(r) != 3:
            raise ValueError(f"relations[{k}] must be (subject_index, relation, object_index)")
        s, word, o = r
        kind = RELATION_KINDS.get(str(word).strip().lower())
        if kind is None:
            raise ValueError(f"relations[{k}]: unknown relation {word!r}; use one of {', '.join(RELATION_KINDS)}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(mentions) for x in (s, o)) \
                or s == o:
            raise ValueError(f"relations[{k}]: {s!r} and {o!r} must be two different element indices "
                             f"0..{len(mentions) - 1}")
        rels.append(Relation(kind=kind, subject=s, targets=(o,)))
    rng = random.Random(f"{seed}\x00{global_prompt}") if seed else None
    boxes = compose(mentions, rels, width, height, rng)
    regions = []
    for m in mentions:
        prompt = _region_prompt(m.label, m.modifiers)
        for box in boxes.get(m.index, []):
            regions.append(Region(label=m.label, prompt=prompt, box=box, style=m.style))
    return Layout(global_prompt=global_prompt[:MAX_TEXT_CHARS], regions=tuple(regions),
                  canvas=Canvas(int(width), int(height)))
