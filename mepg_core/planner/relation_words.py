"""Relation and place phrases: the words that say where a thing is ("to the left of", "on top of",
"in the background"). Matched on the lower-cased words of the parsed prompt; longest phrase first."""

from __future__ import annotations

from . import lexicon as lx

# Phrase -> relation kind (see scene.Relation.kind). The lexicon's table, plus phrases read here.
RELATION_PHRASES: dict[str, str] = {
    **lx.RELATION_PHRASES,
    "in the middle of": "between", "at the center of": "between", "in the center of": "between",
    "on the side of": "beside", "at the edge of": "beside", "close by": "beside", "in front": "front",
    "just behind": "behind", "right behind": "behind", "far behind": "behind", "in the back of": "behind",
    "out of": "inside", "perched atop": "on", "sat on": "on", "seated on": "on", "placed on": "on",
    "next to each other": "beside", "through": "beside", "across": "beside", "toward": "beside",
    "towards": "beside", "past": "beside", "along": "beside", "around the": "around",
}
for _drop in ("at", "by", "against", "before", "facing", "amongst", "among", "together with", "along with",
              "riding", "rides", "holding", "holds", "carrying", "carries", "hugging", "grabbing",
              "clutching", "playing with", "sitting on", "standing on", "lying on", "resting on",
              "perched on", "riding on", "mounted on", "hovering over", "floating above", "hanging above",
              "flying over", "flying above", "hovering above", "wearing", "wears", "dressed in", "surrounding",
              "encircling", "circling"):
    RELATION_PHRASES.pop(_drop, None)   # verbs are read from the parse; "at"/"by" are too vague
_INDEX: dict[str, list[tuple[tuple[str, ...], str]]] = {}
for _phrase, _kind in RELATION_PHRASES.items():
    _words = tuple(_phrase.split())
    _INDEX.setdefault(_words[0], []).append((_words, _kind))
for _lst in _INDEX.values():
    _lst.sort(key=lambda item: -len(item[0]))

# Verbs whose object is held, ridden or worn by their subject.
HOLD_VERBS = frozenset({"hold", "carry", "grab", "clutch", "hug", "grip", "cradle", "wield", "clasp",
                        "brandish", "raise", "lift", "cuddle", "embrace", "balance", "juggle", "offer"})
RIDE_VERBS = frozenset({"ride", "mount", "straddle"})
WEAR_VERBS = frozenset({"wear", "don", "sport", "dress", "clothe", "adorn"})

# Absolute places: word after "on/to/in/at the" -> (axis, value); axis x: 0 left 2 right; y: 0 top 2
# bottom; d: depth 0 background 2 foreground; c: centre.
PLACE_WORDS = {
    "left": ("x", 0), "right": ("x", 2), "left-hand": ("x", 0), "right-hand": ("x", 2),
    "top": ("y", 0), "bottom": ("y", 2), "sky": ("y", 0), "air": ("y", 0), "heavens": ("y", 0),
    "foreground": ("d", 2), "background": ("d", 0), "distance": ("d", 0), "front": ("d", 2),
    "middle": ("c", 1), "center": ("c", 1), "centre": ("c", 1), "horizon": ("d", 0),
    "clouds": ("y", 0),
}
PLACE_PREPS = frozenset({"on", "to", "in", "at", "toward", "towards", "into", "across", "near", "up"})


def match_relation(words: list[str], i: int) -> tuple[str, int] | None:
    """(kind, index after the phrase) for a relation phrase starting at ``words[i]``, else None."""
    for phrase, kind in _INDEX.get(words[i], ()):
        if tuple(words[i:i + len(phrase)]) == phrase:
            return kind, i + len(phrase)
    return None
