"""Prompt syntax that is not English: prompt weights, embeddings, booru count tags, quality and artist tags.

:func:`prepare` turns what SD/ComfyUI users type into plain text for the English reader, keeping every
word that describes the picture: ``(red hat:1.2)`` -> ``red hat``, ``1girl`` -> ``a girl``,
``2girls`` -> ``two girls``; ``masterpiece, best quality, 8k, by Greg Rutkowski`` are dropped from what is
read (the global prompt keeps the user's text untouched).
"""

from __future__ import annotations

import re

_EMBEDDING_RE = re.compile(r"<[^<>]{0,200}>")                # <lora:name:0.8>, <embedding>
_WEIGHT_RE = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]}>]|,|$)")  # the ":1.2" of (word:1.2)
_BRACKETS_RE = re.compile(r"[()\[\]{}]")
_COUNT_TAG_RE = re.compile(r"^\s*(\d{1,2})\s*(girl|boy|man|woman|other|cat|dog|person|people|kid|child)s?\s*$",
                           re.IGNORECASE)
_NUMBER_NAMES = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_ARTIST_RE = re.compile(r"^\s*(?:(?:art|artwork|painting|illustration|style)\s+)?(?:by|from)\s+\S", re.IGNORECASE)
_ARTIST_STYLE_RE = re.compile(r"^\s*(?:in\s+)?the\s+style\s+of\s+[A-Z]", re.IGNORECASE)
# Tags about image quality, camera and render settings, not about what the picture shows.
QUALITY_TAGS = frozenset({
    "masterpiece", "best quality", "high quality", "highest quality", "top quality", "good quality",
    "ultra detailed", "ultra-detailed", "highly detailed", "extremely detailed", "very detailed",
    "insanely detailed", "hyper detailed", "hyperdetailed", "detailed", "intricate", "intricate details",
    "intricate detail", "sharp focus", "soft focus", "8k", "4k", "16k", "8k uhd", "uhd", "hd", "hdr", "fhd",
    "highres", "absurdres", "high resolution", "high res", "trending on artstation", "artstation",
    "award winning", "award-winning", "award winning photo", "award winning photograph", "octane render",
    "unreal engine", "unreal engine 5", "ray tracing", "raytracing", "volumetric lighting",
    "cinematic lighting", "studio lighting", "dramatic lighting", "soft lighting", "rim lighting",
    "natural lighting", "global illumination", "depth of field", "shallow depth of field", "bokeh", "dof",
    "professional", "professional photography", "professional photo", "solo", "looking at viewer",
    "looking at the viewer", "full body", "upper body", "cowboy shot", "close-up", "closeup",
    "wide shot", "wide angle", "wide-angle", "35mm", "50mm", "85mm", "film grain",
    "sharp", "crisp", "vivid colors", "vibrant colors", "beautiful", "stunning", "epic", "amazing",
    "aesthetic", "newest", "very aesthetic", "score_9", "score_8_up", "score_7_up", "safe", "sfw",
    "official art", "wallpaper", "cinematic", "dramatic", "atmospheric", "moody", "realistic lighting",
    "perfect composition", "rule of thirds", "symmetrical", "centered", "simple background",
})


def strip_weights(text: str) -> str:
    """``(red hat:1.2)`` -> ``red hat``; embeddings and LoRA tags removed; brackets dropped."""
    text = _EMBEDDING_RE.sub(" ", text)
    text = _WEIGHT_RE.sub("", text)
    text = _BRACKETS_RE.sub(" ", text)
    text = text.replace("_", " ").replace("\\", " ")
    return " ".join(text.split())


def _count_tag(chunk: str) -> str | None:
    m = _COUNT_TAG_RE.match(chunk)
    if not m:
        return None
    n, noun = int(m.group(1)), m.group(2).lower()
    if noun == "other":
        noun = "figure"
    word = _NUMBER_NAMES[n] if n < len(_NUMBER_NAMES) else str(n)
    return f"{word} {noun}" + ("s" if n != 1 and noun not in ("people", "child") else "")


def is_quality_tag(chunk: str) -> bool:
    low = chunk.strip().lower().rstrip(".")
    if low in QUALITY_TAGS:
        return True
    words = low.split()
    return bool(words) and all(w in QUALITY_TAGS or w in ("quality", "very", "ultra", "extremely", "and")
                               for w in words)


def is_artist_tag(chunk: str) -> bool:
    """"by Greg Rutkowski", "art by X", "in the style of Monet": a name, not a style the planner knows."""
    return bool(_ARTIST_RE.match(chunk) or _ARTIST_STYLE_RE.match(chunk))


def prepare(text: str) -> str:
    """Plain English to read for objects: weights stripped, count tags expanded, quality/artist tags out."""
    text = strip_weights(text)
    chunks = re.split(r"(?<=[,;|])|(?<=\.)\s", text)
    kept = []
    for raw in chunks:
        chunk = raw.strip()
        body = chunk.rstrip(",;|").strip()
        end = chunk[len(body):]
        if not body:
            continue
        tag = _count_tag(body)
        if tag is not None:
            kept.append(tag + ",")
            continue
        if is_quality_tag(body) or is_artist_tag(body):
            continue
        kept.append(body + (end.replace("|", ",") if end else ""))
    out = " ".join(kept).strip().rstrip(",")
    return re.sub(r"\s+([,.;])", r"\1", out)
