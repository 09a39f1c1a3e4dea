"""A region's own prompt: the thing's words (colour, material, clothing, pose), never another thing's, and
short enough for CLIP's 77 tokens."""

from __future__ import annotations

from ..layout import MAX_TEXT_CHARS
from . import lexicon as lx
from .scene import Mention

REGION_PROMPT_WORDS = 40  # CLIP reads 77 tokens; a region prompt this short always fits


def article(word: str) -> str:
    """"a" or "an" before ``word`` (by spelling)."""
    w = word.lower()
    if w[:1] in "aeio" or (w[:1] == "u" and not w.startswith(("uni", "use", "usu", "ut"))) or \
            w.startswith(("hour", "honest", "heir")) or (len(w) == 1 and w in "aefhilmnorsx"):
        return "an"
    return "a"


def region_prompt(m: Mention, extra: str = "") -> str:
    """The prompt of one instance of ``m``; ``extra`` is that instance's own words ("black")."""
    words = [w for w in m.modifiers if w.lower() != "and"]
    if extra:
        words = [extra, *words] if len(extra.split()) == 1 else words
    noun = m.head_text or m.label
    if m.label in lx.PLURALIA_TANTUM:
        body = " ".join(["a pair of", *words, noun])
    else:
        first = words[0] if words else noun
        det = "the" if m.determiner == "the" and m.count == 1 else article(first)
        body = " ".join([det, *words, noun])
    tail = " ".join(m.post + m.extras)
    if extra and len(extra.split()) > 1:
        tail = f"{tail} {extra}".strip()
    text = f"{body} {tail}".strip() if tail else body
    text = text.replace(" - ", "-").replace(" 's", "'s").replace(" ,", ",")
    parts = text.split()
    if len(parts) > REGION_PROMPT_WORDS:
        text = " ".join(parts[:REGION_PROMPT_WORDS])
    if len(text) > MAX_TEXT_CHARS:
        cut = text[:MAX_TEXT_CHARS]
        text = cut[:cut.rfind(" ")] if " " in cut else cut
    return text
