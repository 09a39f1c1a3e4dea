"""One style vocabulary for layouts and experts, so a region's style finds the expert tagged for it.

Region styles (from the planner, the editor or hand-written JSON) and expert tags (typed by people or
guessed from file names) name the same styles in different words: ``photorealistic``, ``realism``,
``photo``. :func:`canonical_style` maps each to one word of the planner's vocabulary;
:func:`style_family` groups close styles (oil painting and watercolor are both painting) for the
fallback when no expert carries the exact style.
"""

from __future__ import annotations

from .planner.lexicon import STYLE_PHRASES

# Words seen in expert tags and checkpoint names that the planner's phrase list does not hold.
_TAG_ALIASES = {
    "realism": "photo", "real": "photo", "photography": "photo", "cinematic": "photo",
    "painted": "painting", "paint": "painting", "gouache": "painting",
    "illustrated": "illustration", "ink": "illustration",
    "render": "3d render", "3d-render": "3d render",
}

_FAMILY = {
    "photo": "photo",
    "anime": "anime", "cartoon": "anime",
    "painting": "painting", "oil painting": "painting", "watercolor": "painting", "impressionist": "painting",
    "digital art": "painting",
    "illustration": "illustration", "sketch": "illustration", "line art": "illustration", "comic": "illustration",
    "vector": "illustration", "ukiyo-e": "illustration",
    "3d render": "3d", "3d": "3d", "low poly": "3d", "clay": "3d",
    "pixel art": "pixel art",
}


def canonical_style(text: str | None) -> str:
    """``"Photo-Realistic style"`` → ``"photo"``; unknown words come back lower-cased and trimmed."""
    if not text:
        return ""
    words = " ".join(text.strip().lower().replace("_", " ").split())
    for suffix in (" style", "-style"):
        if words.endswith(suffix) and len(words) > len(suffix):
            words = words[: -len(suffix)].strip()
    found = STYLE_PHRASES.get(words) or _TAG_ALIASES.get(words)
    if found:
        return found
    # A phrase as people write it ("food photography", "watercolor painting"): its longest known part.
    tokens = words.split()
    for n in range(min(3, len(tokens)), 0, -1):
        for i in range(len(tokens) - n + 1):
            part = " ".join(tokens[i:i + n])
            hit = STYLE_PHRASES.get(part) or _TAG_ALIASES.get(part)
            if hit:
                return hit
    return words


def style_family(text: str | None) -> str | None:
    """The family of a style (``"watercolor"`` → ``"painting"``); ``None`` for styles outside the vocabulary."""
    return _FAMILY.get(canonical_style(text))
