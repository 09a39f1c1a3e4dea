"""Read a prompt into a :class:`~.scene.Scene` with a real English parse.

spaCy (:mod:`.reading`) gives each word its part of speech, lemma and syntactic head. From that:

1. :func:`_noun_phrases` finds the noun phrases (modifiers + head noun; a known compound such as
   "wine glass" or "palm tree" becomes the label);
2. :func:`_classify` keeps what can be boxed (:mod:`.vocabulary`): people, animals, plants, objects;
   worn things and body parts become their wearer's words, scenery and abstractions go to the global prompt;
3. :mod:`.linking` folds repeated mentions, possessives and pronouns into the thing already read;
4. :func:`_relations` reads where things are from prepositions and verbs (:mod:`.relation_words`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import lexicon as lx
from . import linking, reading, vocabulary
from .prompt_text import prepare, strip_weights
from .relation_words import HOLD_VERBS, PLACE_PREPS, PLACE_WORDS, RIDE_VERBS, WEAR_VERBS, match_relation
from .scene import Mention, Relation, Scene

_NOUN_POS = ("NOUN", "PROPN")
_PHRASE_POS = ("DET", "NUM", "ADJ", "NOUN", "PROPN", "ADV")
_DEFINITE = frozenset({"the", "this", "that", "these", "those", "its", "his", "her", "their", "our", "my",
                       "your", "each", "both", "either"})
_PRONOUN_SUBJECTS = frozenset({"it", "they", "he", "she", "them", "him", "her", "itself", "themselves",
                               "which", "that", "who"})
_VAGUE = {"few": 3, "several": 3, "some": 3, "many": 5, "numerous": 5, "multiple": 3, "various": 3,
          "countless": 5, "lots": 5, "couple": 2}
# Style words: the lexicon's, and media people write in prompts.
STYLE_PHRASES = {**lx.STYLE_PHRASES, "photography": "photo", "concept art": "concept art",
                 "fantasy art": "concept art", "kawaii": "cartoon", "sticker": "cartoon", "illustration":
                 "illustration", "illustrated": "illustration", "ink drawing": "sketch", "gouache": "painting",
                 "acrylic painting": "painting", "cel shading": "anime", "cel-shaded": "anime", "film photo": "photo",
                 "polaroid": "photo", "cinematic still": "photo", "film still": "photo", "isometric": "3d render",
                 "vaporwave": "digital art", "synthwave": "digital art", "art nouveau": "illustration",
                 "art deco": "illustration", "studio ghibli": "anime", "ghibli": "anime", "pop art": "comic",
                 "papercut": "illustration", "paper cut": "illustration", "tilt-shift": "photo", "macro": "photo",
                 "surreal": "painting", "surrealism": "painting", "surrealist": "painting", "tapestry": "illustration",
                 "sumi-e": "illustration", "ink painting": "illustration", "ink wash": "illustration",
                 "gopro": "photo", "fisheye": "photo", "blender": "3d render", "pixar": "3d render",
                 "octane render": "3d render", "raw photo": "photo", "analog photo": "photo",
                 "long exposure": "photo", "double exposure": "photo", "bokeh": "photo"}
_STYLE_WORDS = sorted(STYLE_PHRASES, key=lambda s: -len(s.split()))
# Words that widen a style phrase to what the user wrote ("food photography", "watercolor painting").
_STYLE_LEFT = frozenset({"food", "product", "beauty", "fashion", "street", "wildlife", "portrait", "fantasy",
                         "moody", "raw", "90s", "80s", "retro", "vintage", "analog", "kawaii", "dark", "soft",
                         "flat", "digital", "traditional", "japanese", "chinese", "classic", "modern"})
_STYLE_RIGHT = frozenset({"painting", "photography", "photo", "photograph", "style", "art", "illustration",
                          "render", "screenshot", "drawing", "sketch", "aesthetic", "artwork", "print",
                          "design", "shot", "still", "look"})
_VESSELS = frozenset({"glass", "cup", "mug", "bowl", "bottle", "jar", "plate", "pot", "bucket", "basket", "box",
                      "bag", "can", "carton", "pitcher", "jug", "vase", "teacup", "tray", "pan", "kettle", "flask",
                      "barrel", "sack", "tub", "spoon", "ladle"})
# "a slice of pizza", "five rolls of toilet paper": the portion names how much of the thing there is.
_PORTIONS = lx.PORTION_NOUNS | {"roll", "sheet", "stick", "bar", "clove", "spoonful", "scoop", "handful"}
_ORDER = {("from", "left", "to", "right"): False, ("left", "to", "right"): False,
          ("from", "right", "to", "left"): True, ("right", "to", "left"): True}


@dataclass
class Phrase:
    """A noun phrase of the parse: tokens ``start..head`` (inclusive) and what the reader made of it."""

    start: int
    head: int
    label: str
    cls: str
    count: int = 1
    count_explicit: bool = False
    plural: bool = False
    definite: bool = False
    negated: bool = False
    modifiers: list[str] = field(default_factory=list)
    style: str | None = None
    size_mult: float = 1.0
    mention: int | None = None      # index into the scene's mentions once linked
    via_surface: bool = False       # reached as "the surface / top of" it
    alias_of: int | None = None     # "a school of fish": the phrase that names the things
    owner: int | None = None        # phrase index of the wearer / owner for worn things and parts
    skip: bool = False


def read_scene(text: str) -> Scene:
    """The things ``text`` names, their counts, words and styles, and the relations between them."""
    prepared = prepare(text)
    doc = reading.read(prepared)
    words = [t.text.lower() for t in doc]
    scene = Scene()
    scene.word_count = sum(1 for t in doc if t.is_alpha)
    scene.stop_words = sum(1 for t in doc if t.is_alpha and t.is_stop)
    scene.known_words = sum(1 for t in doc if t.is_alpha and (vocabulary.wordnet_codes(t.lemma_.lower())
                                                              or t.is_stop or vocabulary.is_not_noun(t.text)))
    styles = _style_spans(words)
    phrases = _noun_phrases(doc, words, styles)
    by_head = {p.head: k for k, p in enumerate(phrases)}
    _attach_of_phrases(doc, phrases, by_head)
    _attach_worn(doc, phrases, by_head)
    linking.link(doc, phrases, scene)
    _global_style(doc, words, styles, phrases, scene)
    if scene.global_style is None:
        # quality and camera tags are not read for objects, but "octane render" or "RAW photo" is a style
        raw = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", strip_weights(text).lower())
        for _start, (_end, style) in sorted(_style_spans(raw).items()):
            scene.global_style = style
            break
    _relations(doc, words, phrases, by_head, scene)
    _predicates(doc, phrases, by_head, scene)
    _descriptions(doc, phrases, scene)
    _drop_spelled_out_groups(doc, scene, phrases)
    _choose_main(doc, scene, phrases)
    scene.negatives = [" ".join(t.text for t in doc[p.start:p.head + 1] if t.pos_ != "DET").lower()
                       for p in phrases if p.negated and p.cls in vocabulary.BOXABLE]
    scene.scene_words = [p.label for p in phrases if p.cls == "scenery" and not p.negated]
    return scene


# --------------------------------------------------------------------------------------------------
# Noun phrases


def _verb_read_as_noun(doc: Any, i: int) -> bool:
    """"A red lighter rests atop a desk", "a crab clings tightly": the small model sometimes tags a verb
    after a noun as a plural noun."""
    tok = doc[i]
    low = tok.text.lower()
    if i == 0:
        return False
    nxt = doc[i + 1] if i + 1 < len(doc) else None
    before_verb_context = nxt is None or nxt.pos_ in ("ADP", "ADV", "DET", "PUNCT", "PART", "SCONJ", "PRON")
    if low in lx.VERBS_3RD or low in _VERBS_AFTER_NOUNS:
        return before_verb_context and doc[i - 1].pos_ in (*_NOUN_POS, "ADJ")
    if tok.tag_ == "NNS" and low.endswith("s") and not low.endswith("ss") and nxt is not None and \
            before_verb_context and doc[i - 1].tag_ == "NN" and doc[i - 1].text.lower() not in _QUANTITY_NOUNS \
            and _singular_article_before(doc, i):
        return True   # "a majestic white swan glides across": "a" never heads a plural
    return False


_QUANTITY_NOUNS = frozenset({"dozen", "couple", "few", "lot", "hundred", "thousand", "score", "handful", "pair"})


def _singular_article_before(doc: Any, i: int) -> bool:
    """Whether "a" / "an" opens the run of modifiers and nouns that ends at word ``i``."""
    j = i - 1
    while j >= 0 and doc[j].pos_ in ("NOUN", "PROPN", "ADJ", "ADV", "NUM") and i - j < 6:
        j -= 1
    return j >= 0 and doc[j].text.lower() in ("a", "an")


# Present-tense verbs the small model reads as plural nouns after a noun ("a crab clings tightly").
_VERBS_AFTER_NOUNS = frozenset({
    "clings", "perches", "sparkles", "gleams", "looms", "dangles", "lounges", "basks", "wanders", "roams",
    "drifts", "flows", "reflects", "casts", "catches", "features", "displays", "contains", "boasts", "shows",
    "adds", "sways", "bobs", "blooms", "spills", "pours", "drips", "glistens", "shimmers", "twinkles",
    "nestles", "sprawls", "rests", "sits", "stands", "lies", "hangs", "floats", "leans", "glows", "shines",
    "hovers", "peeks", "towers", "stretches", "rises", "grazes", "sleeps", "waits", "swims", "gazes"})


def _noun_read_as_adjective(doc: Any, i: int) -> bool:
    """...and the noun before it as an adjective ("lighter" as a comparative)."""
    tok = doc[i]
    return (i + 1 < len(doc) and tok.pos_ == "ADJ" and _verb_read_as_noun(doc, i + 1)
            and vocabulary.classify(tok.text.lower()) in vocabulary.BOXABLE - {"unknown"})


def _known_noun_mistagged(doc: Any, i: int) -> bool:
    """"two cacti in pots", "a white stop sign", "a brown teddy bear to the left": the small model tags some
    nouns as adjectives or verbs; a known noun after a determiner, number or adjective and before no
    other noun is read as a noun."""
    tok = doc[i]
    if tok.pos_ not in ("ADJ", "VERB", "ADV"):
        return False
    low = tok.text.lower()
    sing = lx.singular(low)[0]
    prev = doc[i - 1] if i > 0 else None
    if prev is not None and f"{prev.text.lower()} {sing}" in lx.known_nouns():
        return True    # "a white stop sign", "a brown teddy bear"
    if tok.pos_ == "VERB" and (tok.tag_ != "VB" or not (prev is None or prev.text in (",", ";", "(", ".")
                                                        or prev.pos_ == "DET")):
        return False   # an inflected verb is a verb
    alive = vocabulary.classify(sing) in ("person", "animal")
    if tok.pos_ == "ADJ" and alive and prev is not None and prev.pos_ in ("DET", "ADJ", "NUM") and \
            i + 1 < len(doc) and doc[i + 1].text.lower().endswith("ing"):
        return True    # "a hummingbird drinking from a flower"
    living = alive and tok.pos_ == "ADV"
    if low not in lx.known_nouns() and sing not in lx.known_nouns() and not living:
        return False
    nxt = doc[i + 1] if i + 1 < len(doc) else None
    if nxt is not None and (nxt.pos_ in _NOUN_POS and not _gerund(nxt) or nxt.pos_ == "ADJ" and nxt.dep_ == "amod"):
        return False
    if low in lx.COLOR_WORDS or low.endswith(("ing", "ed")):
        return prev is not None and prev.pos_ == "DET"
    if prev is None or prev.text in (",", ";", "(", ".") or living or low in lx.NOUN_SHAPES:
        return True   # "knight in silver armor, ...", "castle in the background", "a watercolor hummingbird"
    return prev.pos_ in ("DET", "NUM", "ADJ") or f"{prev.text.lower()} {sing}" in lx.known_nouns()


def _gerund(tok: Any) -> bool:
    low = tok.text.lower()
    return low.endswith("ing") and vocabulary.wordnet_codes(low) is None


def _is_head(doc: Any, i: int) -> bool:
    tok = doc[i]
    if tok.text.lower() in lx.NUMBER_WORDS:
        return False
    if _noun_read_as_adjective(doc, i) or _known_noun_mistagged(doc, i):
        return True
    if tok.pos_ == "ADJ" and tok.dep_ in ("pobj", "nsubj", "dobj", "conj", "ROOT", "appos") and \
            (tok.text.lower() in lx.known_nouns() or tok.dep_ in ("dobj", "pobj") and i > 0 and
             doc[i - 1].pos_ == "DET" and (i + 1 == len(doc) or doc[i + 1].pos_ in ("ADP", "PUNCT")) and
             vocabulary.classify(lx.singular(tok.text.lower())[0]) in vocabulary.BOXABLE - {"unknown"} and
             not vocabulary.is_not_noun(tok.text.lower())):
        return True   # "a pink oven" with the noun tagged as an adjective
    if tok.pos_ not in _NOUN_POS and not (tok.tag_.startswith("NN") and tok.pos_ != "PUNCT"):
        return False
    if not any(ch.isalpha() for ch in tok.text) or _verb_read_as_noun(doc, i):
        return False
    if i + 1 < len(doc) and doc[i + 1].text == "-":
        return False   # "crystal-clear", "oak-framed": a modifier
    if i + 1 < len(doc) and f"{tok.text.lower()} {lx.singular(doc[i + 1].text.lower())[0]}" in lx.known_nouns():
        return False   # "fire hydrant" even when parsed as two phrases
    if i + 2 < len(doc) and doc[i + 1].text.lower() in ("left", "right") and doc[i + 2].text.lower() == "of":
        return True    # "a suitcase right of a boat"
    if i + 1 < len(doc):
        nxt = doc[i + 1]
        gerund = _gerund(nxt) or _verb_read_as_noun(doc, i + 1)
        if nxt.pos_ in _NOUN_POS and tok.dep_ in ("compound", "amod", "nmod") and tok.head.i > i \
                and nxt.is_alpha and not gerund:
            return False
        if nxt.text == "-" and i + 2 < len(doc) and doc[i + 2].pos_ in _NOUN_POS:
            return False
    return True


def _singular(tok: Any) -> tuple[str, bool]:
    low = tok.text.lower()
    plural = tok.tag_ in ("NNS", "NNPS") or tok.morph.get("Number") == ["Plur"]
    if low in lx.PLURALIA_TANTUM:
        return low, False
    if low in lx.INVARIANT_NOUNS:
        return low, False
    lemma = tok.lemma_.lower() if tok.pos_ == "NOUN" else low
    sing, was_plural = lx.singular(low)
    if sing in lx.known_nouns():
        return sing, bool(was_plural)
    if lemma != low and vocabulary.is_known_noun(lemma):
        return lemma, True
    if was_plural and (vocabulary.is_known_noun(sing) or tok.tag_ == "NNS"):
        return sing, True
    return (lemma if vocabulary.is_known_noun(lemma) else low), plural and lemma != low


def _noun_phrases(doc: Any, words: list[str], styles: dict[int, tuple[int, str]]) -> list[Phrase]:
    phrases: list[Phrase] = []
    style_tokens = {i for s, (e, _) in styles.items() for i in range(s, e)}
    i = 0
    n = len(doc)
    while i < n:
        if not _is_head(doc, i) or i in style_tokens and not _boxable_word(doc[i]):
            i += 1
            continue
        doc[i]
        start = i
        while start > 0:
            prev = doc[start - 1]
            if f"{prev.text.lower()} {lx.singular(doc[start].text.lower())[0]}" in lx.known_nouns() or \
                    (start - 1) in style_tokens:
                start -= 1
                continue
            if prev.pos_ in _PHRASE_POS or prev.text == "-" or (prev.pos_ == "VERB" and prev.tag_ in ("VBN", "VBG")
                                                                and prev.dep_ in ("amod", "compound")):
                if prev.pos_ == "ADV" and not (doc[start].pos_ in ("ADJ", "ADV", "NUM") or doc[start].text == "-"
                                               or doc[start].tag_ == "VBN"):
                    break
                if _verb_read_as_noun(doc, start - 1):
                    break
                if prev.pos_ in _NOUN_POS and prev.dep_ not in ("compound", "amod", "nmod", "nummod", "quantmod") \
                        and prev.text.lower() not in lx.NUMBER_WORDS and doc[start].text != "-":
                    break
                if prev.text.lower() in ("that", "which", "who", "there", "here"):
                    break
                start -= 1
            else:
                break
        phrases.append(_make_phrase(doc, words, start, i, styles))
        i += 1
    return phrases


def _boxable_word(tok: Any) -> bool:
    return vocabulary.classify(tok.lemma_.lower()) in ("person", "animal")


def _make_phrase(doc: Any, words: list[str], start: int, head: int, styles: dict[int, tuple[int, str]]) -> Phrase:
    tok = doc[head]
    sing, plural = _singular(tok)
    if tok.text.lower() == "glasses" and head + 1 < len(doc) and doc[head + 1].text.lower() == "of":
        sing, plural = "glass", True   # "two glasses of milk": drinking glasses
    label = sing
    # A known compound names the thing: "wine glass", "palm tree", "teddy bear", "pickup truck".
    for k in (3, 2):
        if head - k + 1 < start:
            continue
        last = words[head][:-2] if words[head] in lx.PLURALIA_TANTUM and words[head].endswith("sses") else sing
        parts = [w for w in words[head - k + 1:head]] + [last]
        if any(not p.isalpha() for p in parts[:-1]) or parts[0] in lx.COLOR_WORDS:
            continue
        cand = " ".join(parts)
        head_cls = vocabulary.classify(sing)
        if cand in lx.known_nouns() and last != sing:
            label, sing, plural = cand, last, True
            break
        if cand in lx.known_nouns() or (vocabulary.wordnet_codes(cand) is not None and head_cls in
                                         (*vocabulary.BOXABLE, "worn", "part", "abstract")
                                         and vocabulary.classify(cand) in vocabulary.BOXABLE):
            label = cand
            break
    cls = vocabulary.classify(label) if label != sing else vocabulary.classify(sing)
    if label == sing and cls == "unknown" and (sing in lx.COLOR_WORDS or sing in lx.ADJECTIVES or
                                                 sing.endswith(("ing", "ed", "ive", "ous", "ful", "al", "ic",
                                                                "ible", "able", "less", "ish"))):
        cls = "abstract"
    if sing in lx.COLOR_WORDS and label == sing and sing not in lx.known_nouns():
        cls = "abstract"
    if sing in vocabulary.SKY_THINGS and label == sing and (
            tok.dep_ == "pobj" and tok.head.text.lower() in ("of", "on") or tok.dep_ == "poss"):
        cls = "scenery"   # "the glow of the setting sun", "under the moon": light, not a thing to place
    if cls in ("thing", "person", "animal", "food", "plant", "unknown") and label in vocabulary.GENERIC:
        cls = "generic"
    if cls == "unknown" and tok.pos_ == "PROPN" and start > 0 and \
            words[start - 1] in ("in", "at", "over", "across", "from", "near", "of", "above", "around", "through"):
        cls = "scenery"   # "over Cappadocia", "in San Francisco": a place
    if tok.pos_ == "PROPN" and _after_artist_words(words, start):
        cls = "meta"   # "in the style of Van Gogh", "inspired by Salvador Dali": a name, not a thing
    p = Phrase(start=start, head=head, label=label, cls=cls, plural=plural)
    count: int | None = None
    for j in range(start, head):
        w = words[j]
        t = doc[j]
        if t.pos_ == "DET" or w in ("a", "an", "the"):
            if w in _DEFINITE:
                p.definite = True
            if w in ("no",):
                p.negated = True
            if w in ("both",):
                count = 2
            continue
        value = _number(words, j)
        if w == "-" and j > start and words[j - 1] in lx.NUMBER_WORDS:
            continue
        if value is None and j >= 2 and words[j - 1] == "-" and words[j - 2] in lx.NUMBER_WORDS:
            continue
        if value is not None and (t.pos_ == "NUM" or w in lx.NUMBER_WORDS) and j not in styles:
            count = value if count is None or w == "dozen" and words[j - 1] in ("a", "half") else \
                count * value if w == "dozen" else value
            continue
        if w == "half" and j + 2 <= head and words[j + 1] == "a" and words[j + 2] == "dozen":
            continue
        if w in _VAGUE and t.pos_ in ("ADJ", "DET", "NUM", "ADV"):
            count = _VAGUE[w]
            continue
        if w in lx.SIZE_WORDS:
            p.size_mult *= lx.SIZE_WORDS[w]
        if j in styles and not p.style and styles[j][0] <= head:
            p.style = styles[j][1]
        p.modifiers.append(doc[j].text)
    if head > 0 and words[head - 1] not in ("a", "an", "the") and start > 0:
        prev = words[start - 1]
        if prev in ("without", "no", "nor"):
            p.negated = True
    if start > 1 and words[start - 1] == "of" and words[start - 2] in ("none", "free"):
        p.negated = True
    if count is not None:
        p.count, p.count_explicit = max(count, 0), True
    elif plural:
        p.count = vocabulary.DEFAULT_PLURAL_COUNT
    return p


def _after_artist_words(words: list[str], start: int) -> bool:
    before = words[max(0, start - 3):start]
    return (before[-2:] == ["style", "of"] or before[-2:] == ["inspired", "by"] or before[-1:] == ["by"]
            or before[-2:] == ["works", "of"] or before[-3:] == ["in", "the", "manner"])


def _number(words: list[str], j: int) -> int | None:
    w = words[j]
    if w == "dozen" and j >= 2 and words[j - 2:j] == ["half", "a"]:
        return 6
    if j >= 2 and words[j - 1] == "-" and words[j - 2] in lx.NUMBER_WORDS and lx.NUMBER_WORDS[words[j - 2]] >= 20:
        return None   # the "one" of "twenty-one"
    if w.isdigit():
        return min(int(w[:4]), 1000)
    if w in lx.NUMBER_WORDS:
        val = lx.NUMBER_WORDS[w]
        if val >= 20 and val % 10 == 0 and val < 100 and j + 1 < len(words) and words[j + 1] in lx.NUMBER_WORDS:
            return None  # "twenty one": the second word completes it
        if j > 0 and words[j - 1] in lx.NUMBER_WORDS and lx.NUMBER_WORDS[words[j - 1]] >= 20:
            return lx.NUMBER_WORDS[words[j - 1]] + val
        return val
    if j + 2 < len(words) and words[j + 1] == "-" and w in lx.NUMBER_WORDS and words[j + 2] in lx.NUMBER_WORDS:
        return lx.NUMBER_WORDS[w] + lx.NUMBER_WORDS[words[j + 2]]   # "twenty-one" read as three tokens
    if j >= 2 and words[j - 1] == "-" and words[j - 2] in lx.NUMBER_WORDS and lx.NUMBER_WORDS[words[j - 2]] >= 20:
        return None
    if "-" in w:
        a, _, b = w.partition("-")
        if a in lx.NUMBER_WORDS and b in lx.NUMBER_WORDS:
            return lx.NUMBER_WORDS[a] + lx.NUMBER_WORDS[b]
    return None


# --------------------------------------------------------------------------------------------------
# "a pair of", "a slice of", "a cup of coffee"; worn things


def _attach_of_phrases(doc: Any, phrases: list[Phrase], by_head: dict[int, int]) -> None:
    for k, p in enumerate(phrases):
        nxt = p.head + 1
        if nxt >= len(doc) or doc[nxt].text.lower() != "of":
            continue
        later = [j for j in range(k + 1, len(phrases)) if phrases[j].start > nxt][:1]
        if not later or phrases[later[0]].start - nxt > 4:
            continue
        later_index = later[0]
        q = phrases[later_index]
        head_word = doc[p.head].text.lower()
        if head_word in lx.COLLECTIVE_NOUNS or p.label in lx.COLLECTIVE_NOUNS:
            value = lx.COLLECTIVE_NOUNS.get(head_word, lx.COLLECTIVE_NOUNS.get(p.label, 3))
            if not q.count_explicit:
                exact = head_word in ("pair", "couple", "trio", "quartet", "dozen")
                q.count = value * (p.count if p.count_explicit and head_word == "dozen" else 1)
                q.count_explicit = exact
                if p.count_explicit and head_word == "dozen":
                    q.count = p.count * 12 if p.count < 12 else p.count
            if head_word == "pair" and q.label in lx.PLURALIA_TANTUM:
                q.count, q.count_explicit = 1, True
            q.negated = q.negated or p.negated
            p.skip = True
            p.alias_of = later_index
        elif head_word == "half" and doc[nxt + 1].text.lower() in ("a", "an") and q.label:
            q.count = 6 if doc[q.head - 1].text.lower() == "dozen" else q.count
            p.skip = True
        elif head_word in _PORTIONS or p.label in _PORTIONS:
            if q.cls not in vocabulary.BOXABLE:
                q.cls = "thing"   # "five rolls of toilet paper", "a bar of soap"
            q.modifiers = [*p.modifiers, f"{doc[p.head].text} of", *q.modifiers]
            q.count, q.count_explicit = p.count, p.count_explicit
            p.skip = True
        elif p.cls in ("meta", "abstract", "scenery"):
            continue
        elif p.cls in vocabulary.BOXABLE and not q.plural and (
                q.cls in ("food", "abstract", "scenery", "unknown") or p.label.split()[-1] in _VESSELS):
            q.skip = True   # "a cup of coffee", "two glasses of milk": what is in it is the vessel's words
            q.owner = k
        elif p.cls in ("worn", "part") or doc[p.head].lemma_.lower() in vocabulary.WORN:
            p.owner = by_head.get(q.head)   # "the surface of the table", "the bark of a pine"
            p.cls = "worn"


_WEAR_PREPS = frozenset({"in", "with", "wearing", "featuring", "sporting", "boasting", "having", "of",
                         "dressed", "clad", "adorned", "donning"})


def _attach_worn(doc: Any, phrases: list[Phrase], by_head: dict[int, int]) -> None:
    """Worn things, parts and body parts give their words to their owner: a possessor ("its keys", "the
    truck's paint"), the noun they hang from through "with / in / wearing", a wear verb's subject; for
    clothing and body parts the nearest person or animal before them. Unowned clothing is a thing;
    unowned body parts are dropped."""
    for k, p in enumerate(phrases):
        if p.skip or p.owner is not None:
            continue
        tok = doc[p.head]
        if p.cls not in ("person", "animal") and tok.head.text.lower() in ("of", "in", "with") and \
                _verb_lemma(tok.head.head, _DESCRIBING_VERBS) in _DESCRIBING_VERBS and \
                not tok.head.head.text.lower().endswith("ing") and \
                tok.head.head.dep_ in ("acl", "relcl", "amod", "advcl") and tok.head.head.i > 0:
            p.skip = True   # "a bed covered in white linen", "a dragon made of autumn leaves": its looks
            continue
        owner = _possessor(tok, phrases, by_head, conj=p.cls in ("worn", "part")) \
            if p.cls not in ("person", "animal") else None
        if owner is None and p.cls in ("worn", "part"):
            owner = _syntactic_owner(tok, phrases, by_head)
        if owner is None and p.cls == "thing" and vocabulary.is_clothing(p.label):
            wearer = _syntactic_owner(tok, phrases, by_head)   # "a girl in a white sundress"
            if wearer is not None and phrases[wearer].cls in ("person", "animal", "worn"):
                owner = wearer
            elif p.start > 0 and doc[p.start - 1].text.lower() in ("in", "wearing"):
                near = _wearer_before(phrases, k)   # the parse hung "in a white dress" on "painting of"
                if near is not None and p.head - phrases[near].head <= 6:
                    owner = near
        if owner is None and p.cls not in ("worn", "part") and p.cls in vocabulary.BOXABLE and \
                p.cls not in ("person", "animal"):
            owner = _possessor(tok, phrases, by_head, any_kind=True)
        if owner is not None and p.cls not in ("worn", "part") and phrases[owner].cls in ("person", "animal") \
                and not vocabulary.is_clothing(p.label):
            owner = None   # "a child's bed", "her umbrella": a thing of its own
        if owner is None and p.cls == "worn" and _standalone_chunk(doc, tok):
            owner = _wearer_before(phrases, k)
            if owner is None:   # tags may name the clothing first: "(red hat:1.3), 1girl"
                after = [j for j in range(k + 1, len(phrases))
                         if phrases[j].cls in ("person", "animal") and not phrases[j].skip]
                if after and phrases[after[0]].head - p.head < 12:
                    owner = after[0]
        if owner is not None:
            seen = {k}   # ownership chains end at a wearer; a cycle ("a beard wearing a raincoat") is cut
            while owner not in seen and phrases[owner].owner is not None and phrases[owner].cls in ("worn", "part"):
                seen.add(owner)
                owner = phrases[owner].owner
            if owner in seen:
                owner = _wearer_before(phrases, k)
        if owner is not None:
            p.owner = owner
            p.cls = "worn"
        elif p.cls in ("worn", "part"):
            body = (vocabulary.wordnet_codes(p.label) or "x")[0] == "B" or p.label in _BODY
            subject = tok.dep_ in ("ROOT", "nsubj", "nsubjpass") or p.count_explicit
            part_only = p.cls == "part" and p.label not in lx.NOUN_SHAPES
            p.cls = "abstract" if (body or part_only) and not subject else "thing"


def _wearer_before(phrases: list[Phrase], k: int) -> int | None:
    """The nearest person or animal read before phrase ``k`` (within 40 tokens), or None."""
    before = [j for j in range(k - 1, -1, -1) if phrases[j].cls in ("person", "animal") and not phrases[j].skip]
    return before[0] if before and phrases[k].head - phrases[before[0]].head < 40 else None


def _standalone_chunk(doc: Any, tok: Any) -> bool:
    """A comma-separated tag ("1girl, red kimono, ..."): the phrase is its chunk's whole content."""
    left = tok.i
    while left > 0 and doc[left - 1].text not in (",", ";", ".", "|"):
        left -= 1
    right = tok.i
    while right + 1 < len(doc) and doc[right + 1].text not in (",", ";", ".", "|"):
        right += 1
    chunk = doc[left:right + 1]
    return len(chunk) <= 5 and not any(t.pos_ in ("VERB", "AUX", "ADP") for t in chunk)


_BODY = frozenset({"hair", "eye", "eyes", "face", "hand", "hands", "arm", "leg", "foot", "finger", "skin",
                   "head", "ear", "nose", "mouth", "lip", "tail", "paw", "wing", "fur", "beard", "body"})


def _possessor(tok: Any, phrases: list[Phrase], by_head: dict[int, int], any_kind: bool = False,
               conj: bool = True) -> int | None:
    for child in tok.children:
        if child.dep_ == "poss":
            if child.i in by_head:
                return by_head[child.i]
            if child.text.lower() in ("its", "their", "his", "her") and not any_kind:
                return _salient_before(phrases, tok.i, tok.doc)
    # conj of an owned part ("its green flesh and brown pit")
    if conj and tok.dep_ == "conj" and tok.head.i in by_head:
        owner = phrases[by_head[tok.head.i]].owner
        if owner is not None:
            return owner
    return None


def _nearest_before(phrases: list[Phrase], pos: int) -> int | None:
    for j in range(len(phrases) - 1, -1, -1):
        q = phrases[j]
        if q.head < pos and not q.skip and q.cls in vocabulary.BOXABLE:
            return j
    return None


def _salient_before(phrases: list[Phrase], pos: int, doc: Any) -> int | None:
    """What "its" refers to: the subject of its sentence if that is a thing, else the first thing of the
    prompt if it came earlier, else the nearest thing before."""
    sent = doc[pos].sent
    for j, q in enumerate(phrases):
        if q.head < pos and not q.skip and q.cls in vocabulary.BOXABLE and doc[q.head].sent == sent and \
                doc[q.head].dep_ in ("nsubj", "nsubjpass"):
            return j
    firsts = [j for j, q in enumerate(phrases) if q.head < pos and not q.skip and q.cls in vocabulary.BOXABLE]
    if firsts and doc[phrases[firsts[0]].head].sent != sent:
        return firsts[0]
    return _nearest_before(phrases, pos)


def _syntactic_owner(tok: Any, phrases: list[Phrase], by_head: dict[int, int]) -> int | None:
    """Up the parse through "with / in / wearing" and wear verbs to the noun that has it."""
    anc, via = tok.head, tok
    for _ in range(4):
        if anc.i == via.i:
            return None
        if anc.i in by_head and phrases[by_head[anc.i]].cls in (*vocabulary.BOXABLE, "worn", "part") \
                and via.text.lower() in _WEAR_PREPS:
            return by_head[anc.i]
        if anc.pos_ == "ADP":
            if anc.text.lower() not in _WEAR_PREPS:
                return None
        elif anc.pos_ in ("VERB", "AUX"):
            if anc.lemma_.lower() in WEAR_VERBS | {"have", "feature", "sport", "boast", "dress", "clothe",
                                                   "adorn", "dust", "cover", "decorate"}:
                subj = [c for c in anc.children if c.dep_ in ("nsubj", "nsubjpass") and c.i in by_head]
                if subj:
                    return by_head[subj[0].i]
                if anc.dep_ in ("acl", "relcl") and anc.head.i in by_head:
                    return by_head[anc.head.i]
                if anc.lemma_.lower() in WEAR_VERBS:   # "an old sailor ..., wearing a navy cap"
                    people = [j for j, q in enumerate(phrases) if q.head < anc.i and q.cls in ("person", "animal")
                              and not q.skip]
                    return people[-1] if people else None
            return None
        via, anc = anc, anc.head
    return None


# --------------------------------------------------------------------------------------------------
# Styles


_STYLE_INDEX: dict[str, list[list[str]]] = {}
for _phrase in _STYLE_WORDS:
    _STYLE_INDEX.setdefault(_phrase.split()[0], []).append(_phrase.split())
    if "-" in _phrase and " " not in _phrase:
        _STYLE_INDEX.setdefault(_phrase.split("-")[0], []).append(_phrase.replace("-", " - ").split())


def _style_spans(words: list[str]) -> dict[int, tuple[int, str]]:
    """start -> (end, style as written) for every style phrase in the words ("pixel art", "food
    photography", "watercolor painting"); :func:`mepg_core.styles.canonical_style` maps them to tags."""
    spans: dict[int, tuple[int, str]] = {}
    i = 0
    while i < len(words):
        for parts in _STYLE_INDEX.get(words[i], ()):
            if words[i:i + len(parts)] != parts:
                continue
            s, e = i, i + len(parts)
            while s > 0 and words[s - 1] in _STYLE_LEFT and s - 1 not in spans:
                s -= 1
            while e < len(words) and words[e] in _STYLE_RIGHT:
                e += 1
            spans[s] = (e, " ".join(words[s:e]).replace(" - ", "-"))
            i = e - 1
            break
        i += 1
    return spans


def _global_style(doc: Any, words: list[str], styles: dict[int, tuple[int, str]], phrases: list[Phrase],
                  scene: Scene) -> None:
    """A style not bound to one thing's noun phrase is the picture's ("in watercolor", "anime style")."""
    owned = {j for p in phrases if p.style and not p.skip and p.mention is not None
             for j in range(p.start, p.head)}
    for start, (end, style) in sorted(styles.items()):
        if start in owned:
            continue
        if words[end - 1] in ("photo", "photograph") and end < len(words) and words[end] == "of":
            scene.framing_style = scene.framing_style or style   # "a photo of": framing only
            continue
        if scene.global_style is None or STYLE_PHRASES.get(scene.global_style) == "photo":
            scene.global_style = style
    for p in phrases:
        if p.mention is not None and p.style and not scene.mentions[p.mention].style:
            scene.mentions[p.mention].style = p.style
    # "painting"/"drawing" as framing nouns: "an oil painting of a ship" already matched as a style
    for t in doc:
        low = t.text.lower()
        if low in lx.MEDIUM_NOUNS and lx.MEDIUM_NOUNS[low] and t.i + 1 < len(doc) and \
                doc[t.i + 1].text.lower() == "of" and scene.global_style is None:
            scene.global_style = lx.MEDIUM_NOUNS[low] if low not in ("photo", "photograph", "shot",
                                                                      "snapshot", "close-up", "closeup") else None
            scene.framing_style = scene.framing_style or lx.MEDIUM_NOUNS[low]


# --------------------------------------------------------------------------------------------------
# Relations and places


def _mention_of_token(tok: Any, phrases: list[Phrase], by_head: dict[int, int]) -> int | None:
    k = by_head.get(tok.i)
    if k is None:
        return None
    p = phrases[k]
    if p.mention is not None:
        return p.mention
    if p.alias_of is not None:
        return phrases[p.alias_of].mention
    if p.owner is not None and phrases[p.owner].mention is not None:
        return phrases[p.owner].mention
    return None


def _subject_of(tok: Any, doc: Any, phrases: list[Phrase], by_head: dict[int, int], before: int,
                exclude: set[int]) -> int | None:
    """The mention a relation phrase starting at ``tok`` describes: up the parse to a noun or a verb's
    subject; failing that, the nearest mention before it in the sentence."""
    anc = tok.head
    steps = 0
    while steps < 6:
        m = _mention_of_token(anc, phrases, by_head)
        if m is not None and m not in exclude and anc.i != tok.i:
            return m
        if anc.pos_ in ("VERB", "AUX") or anc.dep_ == "ROOT":
            kids = list(anc.children)
            if any(c.dep_ == "expl" for c in kids) or (tok.i < anc.i and not any(
                    c.dep_ in ("nsubj", "nsubjpass") for c in kids)):
                # "there is a handbag", "To the right of the tree stands a deer"
                kids = [c for c in kids if c.dep_ in ("attr", "dobj") and c.i > anc.i] + kids
                for c in kids:
                    if c.dep_ in ("attr", "dobj"):
                        m = _mention_of_token(c, phrases, by_head)
                        if m is not None and m not in exclude:
                            return m
            for c in kids:
                if c.dep_ in ("nsubj", "nsubjpass", "expl", "attr"):
                    m = _mention_of_token(c, phrases, by_head)
                    if m is None and c.text.lower() in _PRONOUN_SUBJECTS:
                        m = linking.last_mention_before(phrases, c.i, exclude)
                    if m is not None and m not in exclude:
                        return m
            if anc.dep_ in ("acl", "relcl", "advcl") and anc.head.i != anc.i:
                anc = anc.head
                steps += 1
                continue
        if anc.head.i == anc.i:
            break
        anc = anc.head
        steps += 1
    sent_start = tok.sent.start
    return linking.last_mention_before(phrases, before, exclude, floor=sent_start)


def _target_after(doc: Any, phrases: list[Phrase], j: int, limit: int = 6) -> tuple[int | None, int | None]:
    """(phrase index, mention) of the first noun phrase starting within ``limit`` words after ``j``."""
    for k, p in enumerate(phrases):
        if p.start >= j and p.start - j <= limit and not any(doc[x].text in (".", ";", "!", "?")
                                                             for x in range(j, p.start)):
            if p.mention is None and p.owner is not None:
                return k, phrases[p.owner].mention
            if p.mention is None and p.definite and p.label in _RIM_WORDS:
                for q in reversed(phrases[:k]):   # "a spoon resting on the rim": the bowl's rim
                    if q.mention is not None and (q.label in lx.CONTAINER_NOUNS or _is_surface(q.label)):
                        return k, q.mention
            if p.mention is None and p.head + 1 < len(doc) and doc[p.head + 1].text.lower() == "of":
                # "upon the polished surface of an oak desk", "on the back of the sofa"
                for q in phrases[k + 1:k + 3]:
                    if q.start - p.head <= 4 and q.mention is not None:
                        if p.label in _TOP_WORDS:
                            q.via_surface = True
                        return k, q.mention
            return k, p.mention
        if p.start > j + limit:
            break
    return None, None


def _relations(doc: Any, words: list[str], phrases: list[Phrase], by_head: dict[int, int], scene: Scene) -> None:
    rels: list[Relation] = []
    n = len(words)
    hits = tuple(j for j in range(n) if match_relation(words, j))
    i = 0
    while i < n:
        tok = doc[i]
        # "a fork on its left", "to her right": relative to the possessor
        if words[i] in PLACE_PREPS and i + 2 < n and words[i + 1] in ("its", "his", "her", "their") and \
                words[i + 2] in ("left", "right"):
            subj = _subject_of(tok, doc, phrases, by_head, i, set())
            owner = linking.last_mention_before(phrases, i, {subj} if subj is not None else set())
            if subj is not None and owner is not None and subj != owner:
                rels.append(Relation("left" if words[i + 2] == "left" else "right", subj, (owner,)))
            i += 3
            continue
        if words[i] in ("on", "at") and i + 1 < n and words[i + 1] == "top" and (i + 2 >= n or words[i + 2] != "of"):
            # "two mugs on top": on the thing they were named with
            subj = _subject_of(tok, doc, phrases, by_head, i, set())
            holder = _holder_of(subj, phrases, doc, by_head) if subj is not None else None
            if subj is not None and holder is not None:
                rels.append(Relation("on", subj, (holder,)))
                i += 2
                continue
        place = _absolute_place(words, i)
        if place is not None:
            axis, value, end = place
            subj = None
            if i == 0 or words[i - 1] in (",", ":", ";", ".", "-"):
                # "on the left a watercolor fox": the place comes first in its part of the prompt
                subj = _first_mention_in_chunk(doc, phrases, end)
            if subj is None:
                subj = _subject_of(tok, doc, phrases, by_head, i, set())
            if subj is not None:
                for s_ in [subj, *[c for c in _conj_subjects(subj, phrases, doc, by_head)
                                   if _shares(c, i, hits, phrases)]]:
                    _set_place(scene.mentions[s_], axis, value)
            i = end
            continue
        if words[i] in ("overhead", "aloft", "skyward", "airborne") or words[i:i + 2] in (["high", "above"],
                                                                                        ["high", "up"]):
            subj = _subject_of(tok, doc, phrases, by_head, i, set())
            if subj is not None and scene.mentions[subj].hint_y is None and (
                    words[i] != "high" or not _target_after(doc, phrases, i + 2, 3)[1]):
                scene.mentions[subj].hint_y = 0   # "seagulls overhead", "mounted high up on the wall"
        order = next((rev for ph, rev in _ORDER.items() if tuple(words[i:i + len(ph)]) == ph), None)
        if order is not None:
            ms = [p.mention for p in phrases if p.mention is not None and p.head < i and
                  p.start >= tok.sent.start]
            ms = list(dict.fromkeys(ms))
            if order:
                ms.reverse()
            rels += [Relation("left", a, (b,)) for a, b in zip(ms, ms[1:])]
            i += 3
            continue
        hit = match_relation(words, i) if tok.pos_ != "PUNCT" else None
        if hit is not None:
            kind, end = hit
            if end < n and words[end] in ("it", "them", "him", "her", "itself", "themselves") and \
                    doc[end].dep_ != "poss":   # "on her lap" is the lap's
                # "a coffee table in front of it": the pronoun's thing
                subj = _subject_of(tok, doc, phrases, by_head, i, set())
                target = _pronoun_target(doc, phrases, i, subj)
                if subj is not None and target is not None and subj != target:
                    _add_relation(rels, scene, kind, subj, (target,), phrases, doc, by_head, i, hits)
                i = end + 1
                continue
            if kind == "on" and i > 0 and doc[i - 1].pos_ == "VERB" and \
                    _verb_lemma(doc[i - 1], _GRIP_VERBS) in _GRIP_VERBS:
                kind = "holding"   # "a puppy chewing on a frisbee", "tugging on a rope"
            k, target = _target_after(doc, phrases, end)
            if target is not None and kind in ("beside", "above", "inside") and words[i] not in ("under", "below",
                                                                                            "beneath"):
                via = any(q.via_surface and q.mention == target for q in phrases)
                if via or (words[i] in ("across", "along", "over", "atop") and _is_surface(
                        scene.mentions[target].label)):
                    kind = "on"   # "strewn across the surface of a table"
            if target is None and k is not None and kind in _BACKDROP_RELATIONS and \
                    phrases[k].label in vocabulary.BACKDROPS and not phrases[k].negated:
                target = _backdrop_mention(doc, phrases[k], scene)   # "a dragon above the village"
            if target is not None:
                subj = _subject_of(tok, doc, phrases, by_head, i, {target})
                if subj is not None and subj != target:
                    targets = [target]
                    if kind == "between" and k is not None:
                        second = _conj_mention(doc, phrases, by_head, phrases[k])
                        if second is not None and second != target:
                            targets.append(second)
                    _add_relation(rels, scene, kind, subj, tuple(targets), phrases, doc, by_head, i, hits)
            elif kind in ("inside", "on") and k is not None:
                _scenery_place(scene, phrases[k], _subject_of(tok, doc, phrases, by_head, i, set()))
            elif kind == "between" and words[i:i + 3] in (["in", "the", "middle"], ["in", "the", "center"],
                                                           ["in", "the", "centre"], ["at", "the", "center"]):
                subj = _subject_of(tok, doc, phrases, by_head, i, set())   # "in the middle of the ballroom"
                if subj is not None:
                    for s_ in [subj, *_conj_subjects(subj, phrases, doc, by_head)]:
                        _set_place(scene.mentions[s_], "c", 1)
            i = end
            continue
        if tok.pos_ == "VERB":
            _verb_relation(tok, doc, phrases, by_head, rels, scene)
        i += 1
    rels += _listed_contents(doc, phrases, scene, rels)
    scene.relations = _dedupe(rels)


def _listed_contents(doc: Any, phrases: list[Phrase], scene: Scene, rels: list[Relation]) -> list[Relation]:
    """"a bowl of fruit on a counter: 3 bananas, 2 apples", "a wooden table set for two, two plates, two
    wine glasses": things listed after a container or a table, with no place of their own, are in it or on
    it (implicit relations)."""
    placed = {r.subject for r in rels if r.explicit} | {r.targets[0] for r in rels if r.kind == "holding" and r.targets}
    out: list[Relation] = []
    for sent in doc.sents:
        ms = [(p.head, p.mention) for p in phrases if p.mention is not None and sent.start <= p.head < sent.end]
        if len(ms) < 2:
            continue
        first_head, holder_i = ms[0]
        holder = scene.mentions[holder_i]
        container = holder.label in lx.CONTAINER_NOUNS and not _is_surface(holder.label)
        if not (container or _is_surface(holder.label)):
            continue
        colon = next((t.i for t in sent if t.text == ":" and t.i > first_head), None)
        hsize = lx.noun_shape(holder.label, holder.kind)[0]
        for head, m in ms[1:]:
            thing = scene.mentions[m]
            if m == holder_i or m in placed or thing.kind in ("person", "animal") or \
                    lx.noun_shape(thing.label, thing.kind)[0] > 2 * hsize:
                continue
            after_colon = colon is not None and head > colon
            listed = doc[head].dep_ in ("appos", "conj", "ROOT", "npadvmod", "dobj") and head - first_head < 40
            if after_colon or (not container and listed):
                out.append(Relation("inside" if container and after_colon else "on", m, (holder_i,), explicit=False))
                placed.add(m)
    return out


_BACKDROP_RELATIONS = frozenset({"above", "below", "behind", "front", "beside", "left", "right"})


def _backdrop_mention(doc: Any, p: Phrase, scene: Scene) -> int:
    """Scenery a thing is placed against ("a spaceship above the city") becomes a background region so the
    relation can be drawn."""
    if p.mention is None:
        p.mention = len(scene.mentions)
        scene.mentions.append(Mention(index=p.mention, label=p.label.lower(), count=1, count_explicit=False,
                                      modifiers=list(p.modifiers), head_text=doc[p.head].text, depth=0,
                                      determiner="the" if doc[p.start].text.lower() == "the" else ""))
    return p.mention


def _pronoun_target(doc: Any, phrases: list[Phrase], i: int, subj: int | None) -> int | None:
    """What "it" / "them" at word ``i`` refers to: the sentence's grammatical subject named before it (not
    the relation's own subject), else the nearest mention before it."""
    exclude = {subj} if subj is not None else set()
    start = doc[i].sent.start
    for p in phrases:
        if p.head >= i:
            break
        if p.head >= start and p.mention is not None and p.mention not in exclude and \
                doc[p.head].dep_ in ("ROOT", "nsubj", "nsubjpass"):
            return p.mention
    return linking.last_mention_before(phrases, i, exclude)


def _holder_of(subj: int, phrases: list[Phrase], doc: Any, by_head: dict[int, int]) -> int | None:
    """The thing a mention was introduced with ("a table with two mugs"), else the one named before it."""
    for p in phrases:
        if p.mention != subj:
            continue
        tok = doc[p.head]
        if tok.head.text.lower() in ("with", "of") and tok.head.head.i in by_head:
            m = _mention_of_token(tok.head.head, phrases, by_head)
            if m is not None and m != subj:
                return m
        return linking.last_mention_before(phrases, p.start, {subj})
    return None


def _first_mention_in_chunk(doc: Any, phrases: list[Phrase], start: int) -> int | None:
    for p in phrases:
        if p.head < start:
            continue
        if any(doc[x].text in (",", ";", ":", ".") for x in range(start, p.head)):
            return None
        m = p.mention if p.mention is not None else (phrases[p.alias_of].mention if p.alias_of is not None
                                                     else None)
        if m is not None:
            return m
    return None


def _conj_mention(doc: Any, phrases: list[Phrase], by_head: dict[int, int], p: Phrase) -> int | None:
    for c in doc[p.head].children:
        if c.dep_ == "conj":
            m = _mention_of_token(c, phrases, by_head)
            if m is not None:
                return m
    later = [q for q in phrases if q.start > p.head and q.start - p.head <= 3 and
             any(doc[x].text.lower() in ("and", "&") for x in range(p.head, q.start))]
    return later[0].mention if later else None


def _add_relation(rels: list[Relation], scene: Scene, kind: str, subj: int, targets: tuple[int, ...],
                  phrases: list[Phrase], doc: Any, by_head: dict[int, int], at: int = -1,
                  hits: tuple[int, ...] = ()) -> None:
    if kind == "with":
        target = targets[0]
        holder, content = scene.mentions[subj], scene.mentions[target]
        if holder.label in lx.CONTAINER_NOUNS and content.kind in ("food", "plant", "thing", "animal"):
            rels.append(Relation("inside", target, (subj,), explicit=False))
        elif _is_surface(holder.label) or holder.label.split()[-1] in _LANDS:
            rels.append(Relation("on", target, (subj,), explicit=False))   # "an island with a palm tree"
        elif holder.kind == "person" and content.kind in ("thing", "food") and \
                lx.noun_shape(content.label, content.kind)[0] <= 1.2 and not vocabulary.is_clothing(content.label):
            rels.append(Relation("holding", subj, (target,), explicit=False))   # "a man with a telescope"
        else:
            rels.append(Relation("beside", subj, (target,), explicit=False))
        return
    if kind == "contains":
        rels.append(Relation("inside", targets[0], (subj,)))
        return
    if kind == "between" and len(targets) == 1 and 0 <= at < len(doc) - 2 and \
            doc[at + 2].text.lower() in ("middle", "center", "centre"):
        # "at the center of a rustic table", "in the middle of the pond": on or in it, centred
        host = scene.mentions[targets[0]]
        _set_place(scene.mentions[subj], "c", 1)
        if not (_is_surface(host.label) or host.label in lx.CONTAINER_NOUNS):
            return
        kind = "on" if _is_surface(host.label) else "inside"
    if kind == "surrounded":
        rels.append(Relation("around", targets[0], (subj,)))
        return
    if kind == "flanked":
        rels.append(Relation("between", subj, targets))
        return
    if kind == "beside" and _is_surface(scene.mentions[targets[0]].label) and \
            doc[_phrase_head_of(phrases, targets[0])].head.text.lower() in ("across", "along", "over", "atop"):
        kind = "on"   # "racing across a kitchen table"
    if kind == "inside" and scene.mentions[targets[0]].label not in lx.CONTAINER_NOUNS and \
            scene.mentions[targets[0]].kind in ("person", "animal"):
        kind = "beside"
    subjects = [subj, *[c for c in _conj_subjects(subj, phrases, doc, by_head)
                        if _shares(c, at, hits, phrases)]]
    for s in subjects:
        if s not in targets:
            rels.append(Relation(kind, s, targets))


_RIM_WORDS = frozenset({"rim", "edge", "lid", "top", "side", "handle", "brim", "lip", "corner", "ledge"})
_LANDS = frozenset({"island", "islet", "hill", "hilltop", "cliff", "rock", "boulder", "mountain", "mound", "dune",
                    "log", "stump", "iceberg", "raft"})
_TOP_WORDS = frozenset({"surface", "top", "tabletop", "countertop", "face", "lid", "seat", "back", "deck"})
_SURFACES = frozenset({"table", "dining table", "desk", "shelf", "bed", "couch", "sofa", "tray", "plate",
                       "counter", "coffee table", "nightstand", "stool", "bench", "board", "cutting board",
                       "platter", "dresser", "cabinet", "bookshelf", "windowsill", "mantel", "mantelpiece",
                       "workbench", "altar", "pedestal", "stand", "table top", "countertop"})


def _shares(conj: int, at: int, hits: tuple[int, ...], phrases: list[Phrase]) -> bool:
    """"a cat and a dog on a sofa": both are on it; "a bird above a tree, and a dog below it": each has its own."""
    if at < 0:
        return True
    pos = _phrase_head_of(phrases, conj)
    return pos < at and not any(pos < h < at for h in hits)


def _phrase_head_of(phrases: list[Phrase], mention: int) -> int:
    return next((p.head for p in phrases if p.mention == mention), 0)


def _conj_subjects(subj: int, phrases: list[Phrase], doc: Any, by_head: dict[int, int]) -> list[int]:
    """"a cat and a dog on a sofa": the dog shares the cat's relation (and the cat the dog's)."""
    out: list[int] = []
    heads = [p for p in phrases if p.mention == subj]
    if not heads:
        return out
    top = doc[heads[0].head]
    while top.dep_ == "conj" and top.head.i != top.i:   # "an apple, a pear and a lemon": the whole list
        top = top.head
    todo, seen = [top], {heads[0].head}
    while todo:
        tok = todo.pop()
        m = _mention_of_token(tok, phrases, by_head)
        if m is not None and m != subj and m not in out:
            out.append(m)
        for c in tok.children:
            if c.dep_ == "conj" and c.i not in seen and len(seen) < 12:
                seen.add(c.i)
                todo.append(c)
    return out


def _verb_lemma(verb: Any, *sets: frozenset) -> str:
    """The verb's lemma, checked against its written form too ("riding" -> ride when lemmatised "rid")."""
    low = verb.text.lower()
    forms = [verb.lemma_.lower(), low, low[:-3], low[:-3] + "e", low[:-1], low[:-2], low[:-4] if low.endswith(
        ("dding", "gging", "nning", "pping", "tting")) else low]
    for f in forms:
        if any(f in st for st in sets):
            return f
    return forms[0]


def _verb_relation(verb: Any, doc: Any, phrases: list[Phrase], by_head: dict[int, int], rels: list[Relation],
                   scene: Scene) -> None:
    lemma = _verb_lemma(verb, HOLD_VERBS, RIDE_VERBS, WEAR_VERBS, _SUPPORT_VERBS)
    objs = [c for c in verb.children if c.dep_ in ("dobj", "obj")]
    if not objs:
        return
    target = _mention_of_token(objs[0], phrases, by_head)
    subj = _subject_of(verb, doc, phrases, by_head, verb.i, {target} if target is not None else set())
    if subj is None:
        for c in verb.children:
            if c.dep_ in ("nsubj", "nsubjpass"):
                subj = _mention_of_token(c, phrases, by_head)
        if subj is None and verb.dep_ in ("acl", "relcl"):
            subj = _mention_of_token(verb.head, phrases, by_head)
    if target is None or subj is None or subj == target:
        return
    if scene.mentions[subj].kind not in ("person", "animal") and verb.dep_ == "acl" and \
            verb.head.dep_ == "pobj" and verb.head.head.dep_ == "prep":
        # "the knight on the left cliff holding a sword": the one on the cliff holds it
        rider = _mention_of_token(verb.head.head.head, phrases, by_head)
        if rider is not None and rider != target and scene.mentions[rider].kind in ("person", "animal"):
            subj = rider
    holder, thing = scene.mentions[subj], scene.mentions[target]
    if holder.kind not in ("person", "animal") and lemma in HOLD_VERBS | _SUPPORT_VERBS:
        # "the nightstand holds a lamp", "its surface hosting a kettle": resting on or inside it
        kind = "on" if _is_surface(holder.label) or holder.label not in lx.CONTAINER_NOUNS else "inside"
        rels.append(Relation(kind, target, (subj,)))
    elif lemma in RIDE_VERBS:
        rels.append(Relation("on", subj, (target,)))
    elif lemma in WEAR_VERBS:
        pass
    elif lemma in HOLD_VERBS or (holder.kind in ("person", "animal") and thing.kind not in ("person", "animal")
                                 and lemma not in _AT_A_DISTANCE_VERBS):
        rels.append(Relation("holding", subj, (target,)))   # "mending a net", "eating bamboo", "reading a book"
    else:
        rels.append(Relation("beside", subj, (target,), explicit=False))


_GRIP_VERBS = frozenset({"chew", "nibble", "munch", "gnaw", "tug", "pull", "suck", "bite", "hang", "cling",
                         "grip", "hold", "tap", "pluck", "strum", "knock", "pound"})
_SUPPORT_VERBS = frozenset({"feature", "host", "support", "display", "bear", "hold", "carry", "showcase",
                            "contain", "have", "boast", "present", "house", "cradle"})
# Verbs whose object is seen or met, not handled.
_AT_A_DISTANCE_VERBS = frozenset({"look", "watch", "see", "face", "chase", "follow", "race", "approach", "pass",
                                  "cross", "leave", "enter", "visit", "greet", "admire", "observe", "overlook",
                                  "guard", "ignore", "eye", "stare", "hunt", "stalk", "pursue", "circle",
                                  "fly", "walk", "climb", "jump", "reach", "explore", "overhang", "shade",
                                  "illuminate", "light", "frame", "surround", "flank", "block", "share"})


def _is_surface(label: str) -> bool:
    return label in _SURFACES or label.split()[-1] in _SURFACES


def _absolute_place(words: list[str], i: int) -> tuple[str, int, int] | None:
    """("x"|"y"|"d"|"c"|"xy", value, end) for "on the left", "in the background", "in the top left corner"."""
    if words[i] not in PLACE_PREPS:
        return None
    j = i + 1
    if j < len(words) and words[j] in ("the", "a"):
        j += 1
    got: list[tuple[str, int]] = []
    while j < len(words) and words[j] in PLACE_WORDS or (j < len(words) and words[j] in ("far", "upper", "lower",
                                                                                         "very", "side", "corner",
                                                                                         "half", "part", "-")):
        w = words[j]
        if w in PLACE_WORDS:
            got.append(PLACE_WORDS[w])
        elif w == "upper":
            got.append(("y", 0))
        elif w == "lower":
            got.append(("y", 2))
        j += 1
    if not got:
        return None
    if j < len(words) and words[j] == "of":
        return None   # "to the left of X" is a relation
    if words[i] == "in" and got == [("d", 2)] and j < len(words) and words[j] != ",":
        return None   # "in front" handled as a relation when followed by "of"
    if len(got) == 1:
        return got[0][0], got[0][1], j
    axis = "".join(a for a, _ in got)
    return axis, got[0][1] * 3 + got[1][1], j


def _set_place(m: Mention, axis: str, value: int) -> None:
    if axis == "x":
        m.hint_x = value
    elif axis == "y":
        m.hint_y = value
    elif axis == "d":
        m.depth = value
    elif axis == "c":
        m.hint_x = 1
        m.hint_y = 1
    elif len(axis) == 2:
        for a, v in zip(axis, divmod(value, 3)):
            _set_place(m, a, v)


def _scenery_place(scene: Scene, p: Phrase, subj: int | None) -> None:
    """"in the sky": high; "on the beach", "in the grass": on the ground."""
    if subj is None:
        return
    m = scene.mentions[subj]
    if p.label in ("sky", "air", "clouds", "heavens", "space", "outer space") and m.hint_y is None:
        m.hint_y = 0


def _predicates(doc: Any, phrases: list[Phrase], by_head: dict[int, int], scene: Scene) -> None:
    """"the cat is black", "the one in the middle is black": the adjective belongs to the subject."""
    for tok in doc:
        if tok.dep_ != "acomp" or tok.pos_ != "ADJ":
            continue
        verb = tok.head
        subj = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
        if not subj:
            continue
        s = subj[0]
        m = _mention_of_token(s, phrases, by_head)
        words = [c.text for c in tok.subtree if c.dep_ != "punct"]
        if m is None and s.text.lower() in ("one", "other", "it", "they", "she", "he"):
            m = linking.last_mention_before(phrases, s.i, set())
            if m is not None and s.text.lower() in ("one", "other") and scene.mentions[m].count > 1:
                where = next((w.text.lower() for w in s.subtree if w.text.lower() in
                              ("middle", "center", "centre", "left", "right", "front", "back")), "first")
                scene.mentions[m].one_of.append((where if s.text.lower() == "one" else "last", " ".join(words)))
                continue
        if m is not None:
            scene.mentions[m].post.append(" ".join(words))


def _drop_spelled_out_groups(doc: Any, scene: Scene, phrases: list[Phrase]) -> None:
    """"three kids on a bench, a boy ..., a girl ... and a toddler ...": the group is the people listed
    after it, not more people."""
    for p in phrases:
        if p.mention is None or p.cls != "person" or p.count < 2:
            continue
        m = scene.mentions[p.mention]
        sent = doc[p.head].sent
        later = {q.mention for q in phrases if q.mention not in (None, p.mention) and q.head > p.head
                 and doc[q.head].sent == sent and q.cls == "person" and q.count == 1}
        if len(later) >= 2 and (not m.count_explicit or len(later) >= m.count - 1):
            m.count = 0
            p.mention = None


_DESCRIBING_VERBS = frozenset({"paint", "make", "cover", "dress", "carve", "craft", "color", "colour", "adorn", "drape",
                               "dust", "sculpt", "mold", "mould", "form", "fashion", "construct",
                               "decorate", "coat", "dye", "clad", "trim", "wrap", "upholster", "tint", "build",
                               "forge", "knit", "weave", "stitch", "finish", "glaze", "shade"})


def _descriptions(doc: Any, phrases: list[Phrase], scene: Scene) -> None:
    """"a carriage, painted in deep red", "a dragon made of autumn leaves", "three cows, a mix of white and
    brown patches": words after the noun that say what it looks like go into its region prompt."""
    for p in phrases:
        if p.mention is None or p.skip:
            continue
        m = scene.mentions[p.mention]
        for child in doc[p.head].children:
            if child.i <= p.head:
                continue
            words = None
            if child.dep_ in ("acl", "relcl") and child.lemma_.lower() in _DESCRIBING_VERBS:
                words = [t.text for t in child.subtree][:8]
            elif child.dep_ in ("appos", "amod") and any(t.text.lower() in lx.COLOR_WORDS for t in child.subtree) \
                    and child.text.lower() not in ("one", "other", "ones", "others") \
                    and not any(q.mention is not None and q.mention != p.mention and child.i <= q.head <=
                                max(t.i for t in child.subtree) for q in phrases):
                words = [t.text for t in child.subtree if t.dep_ != "punct"][:8]
            if words and len(" ".join(m.post).split()) < 16:
                text = " ".join(words)
                if text not in m.post:
                    m.post.append(text)


def _choose_main(doc: Any, scene: Scene, phrases: list[Phrase]) -> None:
    """Main subjects: the first thing named, the subjects of the first sentence (and what they are joined
    to by "and"), and the people and animals named first."""
    if not scene.mentions:
        return
    scene.mentions[0].main = True
    first_sent = doc[phrases[0].head].sent if phrases else None
    for p in phrases:
        if p.mention is None or first_sent is None:
            continue
        tok = doc[p.head]
        if tok.sent != first_sent:
            continue
        if tok.dep_ in ("nsubj", "nsubjpass", "ROOT", "attr", "appos", "npadvmod") or \
                (tok.dep_ == "conj" and doc[tok.head.i].dep_ in ("nsubj", "ROOT", "dobj", "pobj", "appos")):
            scene.mentions[p.mention].main = True
    for m in scene.mentions[1:4]:
        if m.kind in ("person", "animal"):
            m.main = True
    for r in scene.relations:
        # "a round table supports six baozi", "on a wooden table, three eggplants": what the main support
        # holds is what the picture is about
        host = scene.mentions[r.targets[0]] if r.targets else None
        if r.kind in ("on", "inside") and r.explicit and host is not None and host.main and (
                _is_surface(host.label) or host.label in lx.CONTAINER_NOUNS):
            scene.mentions[r.subject].main = True


def _dedupe(rels: list[Relation]) -> list[Relation]:
    seen: set[tuple] = set()
    out = []
    for r in rels:
        key = (r.kind, r.subject, r.targets)
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out
