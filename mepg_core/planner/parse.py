"""Read a prompt into a scene: the objects it names, how many, what each looks like, and how they relate.

No grammar model is used: the reader walks the words once, recognising framing ("a photo of"),
counts ("three", "3", "a pair of", "half a dozen"), noun phrases (modifiers + a head noun, multi-word
nouns from the lexicon, unknown nouns taken as the phrase's head), relation phrases ("to the left of",
"on top of", "between ... and ..."), absolute places ("on the left", "in the sky"), styles ("an anime
girl", "in pixel art style") and negations ("without cars"). Anything it cannot place is skipped; the
full prompt text stays the layout's global prompt, so skipping loses nothing from the picture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import lexicon as lx
from .scene import Mention, Relation, Scene

MAX_TOKENS = 400  # a 10,000-character prompt is read up to here; the rest stays in the global prompt
_TOKEN_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[,;.:!?&()]")
_SENTENCE_END = frozenset({".", ";", "!", "?", ":"})
_PRONOUNS = frozenset({"it", "they", "them", "itself", "themselves", "him", "her", "he", "she"})
_POSITION_WORDS = {
    "left": ("x", 0), "right": ("x", 2), "left-hand": ("x", 0), "right-hand": ("x", 2),
    "lefthand": ("x", 0), "righthand": ("x", 2), "top": ("y", 0), "upper": ("y", 0), "bottom": ("y", 2),
    "lower": ("y", 2), "middle": ("c", 1), "center": ("c", 1), "centre": ("c", 1), "sky": ("y", 0),
    "air": ("y", 0), "foreground": ("d", 2), "background": ("d", 0), "distance": ("d", 0),
    "front": ("d", 2), "back": ("d", 0), "rear": ("d", 0), "corner": ("n", 0), "side": ("n", 0),
    "half": ("n", 0), "part": ("n", 0), "edge": ("n", 0), "far": ("n", 0), "very": ("n", 0),
}
_ABS_PREPS = frozenset({"on", "in", "at", "to", "toward", "towards", "near"})
_ABS_DETS = frozenset({"the", "a"})
_POSSESSIVES = frozenset({"its", "their", "his", "her"})  # "on its left": relative to an object
_ORDER_PHRASES = {
    ("from", "left", "to", "right"): ("x", False), ("left", "to", "right"): ("x", False),
    ("from", "right", "to", "left"): ("x", True), ("right", "to", "left"): ("x", True),
    ("from", "top", "to", "bottom"): ("y", False), ("top", "to", "bottom"): ("y", False),
    ("from", "bottom", "to", "top"): ("y", True), ("bottom", "to", "top"): ("y", True),
}
_EACH_OTHER = (("each", "other"), ("one", "another"))
_SURFACES = frozenset({"table", "dining table", "desk", "bench", "shelf", "bed", "couch", "sofa", "tray",
                       "plate", "counter", "coffee table", "nightstand", "stool", "chair", "board",
                       "cutting board", "platter", "windowsill", "dresser", "cabinet", "bookshelf"})
# Words that open a relation phrase with a verb ("sitting on"): the verb describes the subject's pose.
_VERB_LED = ("sitting", "standing", "lying", "resting", "perched", "riding", "rides", "holding", "holds",
             "carrying", "carries", "hugging", "grabbing", "clutching", "playing", "hovering", "floating",
             "hanging", "flying", "mounted", "wearing", "wears", "dressed", "facing", "surrounding",
             "encircling", "circling")
# Relations that may come before both objects ("To the left of the barn stands a horse").
_INVERTIBLE = frozenset({"left", "right", "above", "below", "on", "under", "beside", "front", "behind",
                         "between", "inside"})
# "on the moon", "on Mars": a setting, not an object below the subject.
_CELESTIAL_GROUNDS = frozenset({"moon", "mars", "planet", "earth", "venus", "jupiter"})
# "a bowl with apples" puts the apples in the bowl; "a house with a tree" does not.
_HOLDS_WITH = frozenset({"bowl", "box", "basket", "vase", "cup", "mug", "jar", "bucket", "cage", "pot",
                         "glass", "nest", "tank", "aquarium", "crate", "bag", "wine glass", "teacup",
                         "fishbowl", "cart", "wagon", "pan", "bottle", "barrel", "tub", "bathtub"})
_MEDIUM_STYLE_WORDS = frozenset({"painting", "drawing", "illustration", "art", "artwork", "render",
                                 "rendering", "style", "styled", "sketch", "image", "picture"})


@dataclass
class _NounPhrase:
    start: int
    end: int
    label: str | None           # None: no head (a style or framing phrase only)
    count: int = 1
    count_explicit: bool = False
    definite: bool = False
    negated: bool = False
    plural: bool = False
    pair: bool = False
    modifiers: list[str] = field(default_factory=list)
    head_text: str = ""
    head_written: str = ""
    determiner: str = ""
    post: list[str] = field(default_factory=list)
    style: str | None = None
    size_mult: float = 1.0
    frame_style: str | None = None   # "an oil painting of ...": style for what follows
    is_frame: bool = False
    text: str = ""


_COUNT_TAG_RE = re.compile(r"^(\d{1,2})([a-z]+)$")


def tokenize(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    toks = []
    for tok in _TOKEN_RE.findall(text)[:MAX_TOKENS]:
        # Tag-style counts ("1girl", "2cats") split into number and noun; "8k" and "3d" stay whole.
        m = _COUNT_TAG_RE.match(tok)
        if m and lx.singular(m.group(2))[0] in lx.known_nouns():
            toks += [m.group(1), m.group(2)]
        else:
            toks.append(tok)
    return toks


def _is_number(tok: str) -> bool:
    return tok.isdigit() or tok in lx.NUMBER_WORDS or _hyphen_number(tok) is not None


def _hyphen_number(tok: str) -> int | None:
    if "-" not in tok:
        return None
    parts = tok.split("-")
    if len(parts) == 2 and parts[0] in lx.NUMBER_WORDS and parts[1] in lx.NUMBER_WORDS:
        a, b = lx.NUMBER_WORDS[parts[0]], lx.NUMBER_WORDS[parts[1]]
        if a >= 20 and a % 10 == 0 and 0 < b < 10:
            return a + b
    return None


def _number_value(toks: list[str], i: int) -> tuple[int, int] | None:
    """(value, next index) for a number at ``toks[i]``: "3", "three", "twenty-one", "twenty one"."""
    tok = toks[i]
    if tok.isdigit():
        return min(int(tok[:6]), 10**6), i + 1
    hyph = _hyphen_number(tok)
    if hyph is not None:
        return hyph, i + 1
    if tok in lx.NUMBER_WORDS:
        val = lx.NUMBER_WORDS[tok]
        j = i + 1
        if val >= 20 and val % 10 == 0 and val < 100 and j < len(toks) and toks[j] in lx.NUMBER_WORDS:
            unit = lx.NUMBER_WORDS[toks[j]]
            if 0 < unit < 10:
                return val + unit, j + 1
        return val, j
    return None


def _is_participle(tok: str) -> bool:
    if tok in lx.ING_ED_NOUNS or tok in lx.known_nouns():
        return False
    return (tok.endswith("ing") and len(tok) > 4) or (tok.endswith("ed") and len(tok) > 4)


def _is_adverb(tok: str) -> bool:
    if tok in lx.ADVERBS:
        return True
    return tok.endswith("ly") and len(tok) > 4 and tok not in lx.known_nouns() and tok not in (
        "butterfly", "dragonfly", "firefly", "lily", "jelly", "belly", "family", "holly", "bully")


def _adjective_like(tok: str) -> bool:
    if tok in lx.ADJECTIVES or tok in lx.COLOR_WORDS or tok in lx.SIZE_WORDS:
        return True
    if tok in lx.known_nouns():
        return False
    return tok.endswith(("ful", "ous", "less", "ish", "ive", "able", "ible", "esque", "y")) and len(tok) > 4


def match_phrase(toks: list[str], i: int, words: tuple[str, ...]) -> bool:
    return tuple(toks[i:i + len(words)]) == words


def match_relation(toks: list[str], i: int) -> tuple[str, int] | None:
    for words, kind in lx.RELATION_INDEX.get(toks[i], ()):
        if match_phrase(toks, i, words):
            end = i + len(words)
            if len(words) > 1:
                # "sitting on top of": the verb leads into a longer phrase that decides the relation.
                longer = match_relation(toks, end - 1)
                if longer and longer[1] > end:
                    return longer
            return kind, end
    return None


def match_style(toks: list[str], i: int) -> tuple[str, int] | None:
    """A style phrase at ``i`` ("pixel art", "watercolor", "3d render") -> (canonical tag, next index)."""
    tok = toks[i]
    if tok not in lx.STYLE_FIRST_WORDS and not tok.endswith("-style"):
        return None
    for n in (3, 2, 1):
        phrase = " ".join(toks[i:i + n])
        if len(toks[i:i + n]) == n and phrase in lx.STYLE_PHRASES:
            return lx.STYLE_PHRASES[phrase], i + n
    if tok.endswith("-style") and tok[:-6] in lx.STYLE_PHRASES:
        return lx.STYLE_PHRASES[tok[:-6]], i + 1
    return None


def _compound_at(toks: list[str], i: int) -> tuple[str, str, int, bool] | None:
    """A multi-word lexicon noun at ``i`` -> (singular name, text as written, next index, plural)."""
    options = lx.compound_nouns().get(toks[i])
    if not options:
        return None
    for name in options:
        words = name.split()
        n = len(words)
        if len(toks) < i + n or tuple(toks[i:i + n - 1]) != tuple(words[:-1]):
            continue
        last = toks[i + n - 1]
        if last == words[-1]:
            return name, name, i + n, False
        for cand in _singular_candidates(last):
            if cand == words[-1]:
                return name, name, i + n, True
    return None


def _singular_candidates(word: str) -> list[str]:
    cands = [lx.singular(word)[0]]
    if word.endswith("es"):
        cands.append(word[:-2])
    if word.endswith("s"):
        cands.append(word[:-1])
    if word.endswith("ves"):
        cands += [word[:-3] + "f", word[:-3] + "fe"]
    return cands


def _color_phrase(toks: list[str], i: int) -> tuple[str, int] | None:
    """A colour phrase at ``i``: "red", "light blue", "black and white", "blue-green"."""
    n = len(toks)
    tok = toks[i]
    start = i
    if tok in lx.COLOR_MODIFIERS and i + 1 < n and toks[i + 1] in lx.COLOR_WORDS:
        i += 1
    elif "-" in tok and all(p in lx.COLOR_WORDS or p in lx.COLOR_MODIFIERS for p in tok.split("-")):
        return tok, i + 1
    if toks[i] not in lx.COLOR_WORDS:
        return None
    i += 1
    # "black and white cow": a compound colour when another colour and then no determiner follow.
    if (i + 2 < n and toks[i] == "and" and toks[i + 1] in lx.COLOR_WORDS
            and toks[i + 2] not in lx.DETERMINERS and toks[i + 2] not in lx.CONJUNCTIONS
            and toks[i + 2] not in _SENTENCE_END and toks[i + 2] != ","):
        i += 2
    return " ".join(toks[start:i]), i


def _is_noun_capable(tok: str) -> bool:
    """Could this unknown word be the head noun of a phrase?"""
    if tok in lx.known_nouns() or tok in lx.SCENE_NOUNS or tok in lx.PART_NOUNS:
        return True
    if tok.isdigit() or _is_number(tok):
        return False
    if tok in lx.DETERMINERS or tok in lx.CONJUNCTIONS or tok in lx.PREPOSITIONS:
        return False
    if tok in lx.COPULAS_AND_FILLERS:
        return False
    if _is_participle(tok) or _is_adverb(tok) or _adjective_like(tok):
        return False
    return tok.isalpha() or "-" in tok or "'" in tok


def _ends_phrase(tok: str) -> bool:
    return (tok in _SENTENCE_END or tok in {",", "(", ")", "&"} or tok in lx.CONJUNCTIONS
            or tok in lx.DETERMINERS or tok in lx.COPULAS_AND_FILLERS or tok in _PRONOUNS)


@dataclass
class _Quantity:
    end: int
    count: int | None = None   # None: not said
    explicit: bool = False     # a number was written ("three", "3", "a pair of")
    definite: bool = False     # "the", "these"
    negated: bool = False      # "no"
    pair: bool = False         # "a pair of"
    saw_det: bool = False


def _read_quantity(toks: list[str], i: int) -> _Quantity:
    """Determiners and counts at ``i``: "a", "the", "three", "a pair of", "half a dozen", "lots of", "no"."""
    n = len(toks)
    j = i
    count: int | None = None
    explicit = False
    definite = False
    negated = False
    pair = False
    saw_det = False
    for _ in range(6):
        if j >= n:
            break
        t = toks[j]
        nxt = toks[j + 1] if j + 1 < n else ""
        nxt2 = toks[j + 2] if j + 2 < n else ""
        if t in ("a", "an"):
            if nxt in lx.COLLECTIVE_NOUNS and nxt2 == "of":
                count, explicit = lx.COLLECTIVE_NOUNS[nxt], nxt in ("pair", "couple", "trio", "quartet", "dozen")
                pair = pair or nxt == "pair"
                j += 3
            elif nxt in ("dozen", "couple"):
                count, explicit = (12 if nxt == "dozen" else 2), True
                j += 3 if nxt2 == "of" else 2
            elif nxt == "few":
                count = lx.VAGUE_FEW
                j += 2
            elif nxt in ("lot", "lots") and nxt2 == "of":
                count = lx.VAGUE_MANY
                j += 3
            elif nxt in lx.NUMBER_WORDS and nxt not in ("one",) and _number_value(toks, j + 1):
                count, j = _number_value(toks, j + 1)
                explicit = True
            else:
                count = 1 if count is None else count
                j += 1
            saw_det = True
            continue
        if t == "half" and nxt == "a" and nxt2 == "dozen":
            count, explicit = 6, True
            j += 4 if j + 3 < n and toks[j + 3] == "of" else 3
            continue
        if t == "no" or t == "zero":
            negated = True
            j += 1
            continue
        if t in ("the", "this", "that", "these", "those"):
            definite = True
            saw_det = True
            j += 1
            continue
        if t in ("my", "your", "his", "her", "its", "our", "their", "another", "each", "every", "any"):
            saw_det = True
            if t == "another" and count is None:
                count = 1
            j += 1
            continue
        if t in lx.VAGUE_WORDS:
            count = lx.VAGUE_WORDS[t]
            j += 2 if nxt == "of" else 1
            saw_det = True
            continue
        num = _number_value(toks, j) if _is_number(t) else None
        if num is not None:
            count, j = num
            explicit = True
            saw_det = True
            if j < n and toks[j] == "of":  # "two of the dogs", "dozens of birds"
                j += 1
            continue
        if t in lx.COLLECTIVE_NOUNS and nxt == "of" and (saw_det or count is not None):
            coll = lx.COLLECTIVE_NOUNS[t]
            if t in ("pair", "couple", "trio", "quartet") and count:
                count = count * coll          # "two pairs of shoes"
            elif t in ("pair", "couple", "trio", "quartet", "dozen"):
                count = coll
            elif count is None or count == 1:
                count = coll
            explicit = explicit or t in ("pair", "couple", "trio", "quartet", "dozen")
            pair = pair or t == "pair"
            j += 2
            continue
        if t in lx.COLLECTIVE_NOUNS and t.endswith("s") and nxt == "of":  # "pairs of", "rows of"
            j += 2
            continue
        break
    return _Quantity(j, count, explicit, definite, negated, pair, saw_det)


def parse_noun_phrase(toks: list[str], i: int) -> _NounPhrase | None:
    """Parse determiner, count, modifiers and head starting at ``i``; None if no phrase starts here."""
    n = len(toks)
    q = _read_quantity(toks, i)
    j, count, explicit, definite = q.end, q.count, q.explicit, q.definite
    negated, pair, saw_det = q.negated, q.pair, q.saw_det

    # Modifiers and the head.
    items: list[tuple[str, str, str]] = []  # (kind, text as written, singular/canonical)
    style = None
    size_mult = 1.0
    head_idx = -1
    plural = False
    while j < n:
        t = toks[j]
        if _ends_phrase(t) and not (t == "and" and items and items[-1][0] in ("adj", "color")
                                    and j + 1 < n and (_adjective_like(toks[j + 1]) or toks[j + 1] in lx.COLOR_WORDS)):
            break
        if t == "and":
            items.append(("join", "and", "and"))
            j += 1
            continue
        if j + 1 < n and toks[j + 1] == "than":
            break  # "taller than a tree": a comparison, not a noun
        if t in lx.VERBS_3RD and (head_idx >= 0 or not (saw_det or count is not None)):
            break  # "a cat sleeps"; but "two towers" are towers
        if t in lx.PREPOSITIONS and not (t in lx.compound_nouns() and _compound_at(toks, j)):
            if head_idx >= 0 or t not in ("top", "back", "front", "left", "right", "bottom"):
                break
        if head_idx >= 0 and match_relation(toks, j):
            break
        if head_idx < 0 and match_relation(toks, j) and toks[j] in _VERB_LED and items:
            break
        comp = _compound_at(toks, j)
        if comp:
            name, _, j2, was_plural = comp
            items.append(("noun", " ".join(toks[j:j2]), name))
            head_idx, plural = len(items) - 1, was_plural
            j = j2
            continue
        st = match_style(toks, j)
        if st and head_idx < 0:
            style = st[0]
            items.append(("style", " ".join(toks[j:st[1]]), st[0]))
            j = st[1]
            continue
        if head_idx >= 0:
            # After a known head only another noun (compound), a pose word or an adverb may follow.
            if _is_participle(t) or _is_adverb(t):
                items.append(("post", t, t))
                j += 1
                continue
            known_head = items[head_idx][0] == "noun"
            if t in lx.known_nouns() and not _adjective_like(t):
                sing, was_plural = lx.singular(t)
                items.append(("noun", t, sing))
                head_idx, plural = len(items) - 1, bool(was_plural)
                j += 1
                continue
            if known_head and _is_noun_capable(t) and (j + 1 >= n or not _continues_np(toks, j + 1)):
                # "cherry blossoms": an unknown noun closing the phrase is the head of a compound,
                # unless "a cat purrs" reads better (one object, then a verb in -s).
                sing, was_plural = lx.singular(t)
                if not (was_plural and count == 1 and not explicit):
                    items.append(("word", t, sing))
                    head_idx, plural = len(items) - 1, bool(was_plural)
                    j += 1
                    continue
            if known_head or not _is_noun_capable(t):
                break
        col = _color_phrase(toks, j)
        # "orange" is a colour before a noun ("an orange cat") and the noun itself at the end.
        colour_is_head = toks[j] in lx.known_nouns() and col is not None and col[1] == j + 1 \
            and (j + 1 >= n or not _continues_np(toks, j + 1))
        if col and not colour_is_head:
            items.append(("color", col[0], col[0]))
            j = col[1]
            continue
        if t in lx.SIZE_WORDS:
            size_mult *= lx.SIZE_WORDS[t]
        if t in lx.known_nouns() or t in lx.SCENE_NOUNS or t in lx.PART_NOUNS:
            # A word that is both an adjective and a noun ("glass", "toy", "baby") is the head only
            # when nothing noun-like follows it.
            if _adjective_like(t) and j + 1 < n and _continues_np(toks, j + 1):
                items.append(("adj", t, t))
                j += 1
                continue
            sing, was_plural = lx.singular(t)
            items.append(("noun", t, sing))
            head_idx, plural = len(items) - 1, bool(was_plural)
            j += 1
            continue
        if _is_participle(t) or _is_adverb(t) or _adjective_like(t) or t in lx.MEDIUM_NOUNS:
            kind = "medium" if t in lx.MEDIUM_NOUNS and not _adjective_like(t) else "adj"
            if kind == "medium" and not (j + 1 < n and _continues_np(toks, j + 1)):
                items.append(("word", t, lx.singular(t)[0]))
                head_idx, plural = len(items) - 1, bool(lx.singular(t)[1])
                j += 1
                continue
            items.append((kind, t, t))
            j += 1
            continue
        if _is_noun_capable(t):
            sing, was_plural = lx.singular(t)
            items.append(("word", t, sing))
            head_idx, plural = len(items) - 1, bool(was_plural)
            j += 1
            continue
        break

    while items and items[-1][0] == "join":
        items.pop()
        j -= 1
    if not items and count is None and not negated:
        return None
    phrase = _NounPhrase(start=i, end=j, label=None, definite=definite, negated=negated, pair=pair)
    phrase.style = style
    phrase.size_mult = size_mult
    phrase.text = " ".join(toks[i:j])

    # "an oil painting of ...", "a photo of ...": a framing phrase, its style for what follows.
    if j < n and toks[j] == "of":
        medium_style = _frame_style(items)
        if medium_style is not False:
            phrase.is_frame = True
            phrase.frame_style = medium_style
            phrase.end = j + 1
            return phrase
    if head_idx < 0:
        # "a cat and a dog, watercolor": a style with no object.
        return phrase if (style or negated) else None

    kind, head_written, head_sing = items[head_idx]
    label = head_sing
    if head_written == "glasses":
        label = "glass" if (explicit and (count or 1) >= 2 and not pair) else "glasses"
    if label in lx.PLURALIA_TANTUM:
        plural = False
        if pair:
            count = 1 if count == 2 else (count or 2) // 2 or 1
    phrase.label = label
    phrase.plural = plural
    phrase.head_written = head_written
    phrase.determiner = "the" if definite and toks[i] == "the" else ""
    phrase.head_text = label if label not in lx.PLURALIA_TANTUM else head_written
    phrase.modifiers = _tidy_joins([text for _, text, _ in items[:head_idx]])
    phrase.post = [text for k, text, _ in items[head_idx + 1:] if k == "post"]
    if count is None:
        count = lx.VAGUE_FEW if plural else 1  # "apples", "the cats": a few
    phrase.count = max(0, count)
    phrase.count_explicit = explicit

    # "a slice of pizza", "a cup of coffee": what follows "of" names or describes the object.
    if j < n and toks[j] == "of" and not phrase.is_frame:
        inner = parse_noun_phrase(toks, j + 1)
        if inner is not None and inner.label and not inner.is_frame:
            if label in lx.PORTION_NOUNS:
                # "a slice of pizza" is the pizza's region; its prompt keeps the whole phrase.
                inner_words = " ".join([*inner.modifiers, inner.head_written or inner.label])
                phrase.head_text = f"{lx.singular(head_written)[0]} of {inner_words}"
                phrase.label = inner.label
            else:
                phrase.post.append("of " + inner.text)
            phrase.end = inner.end
    return phrase


def _tidy_joins(words: list[str]) -> list[str]:
    while words and words[0] == "and":
        words.pop(0)
    return words


def _continues_np(toks: list[str], j: int) -> bool:
    """Does a noun phrase continue at ``j`` (another noun or modifier rather than a boundary)?"""
    t = toks[j]
    if _ends_phrase(t) or t in lx.PREPOSITIONS or t in lx.VERBS_3RD or match_relation(toks, j):
        return bool(_compound_at(toks, j))
    if t == "of":
        return False
    return t in lx.known_nouns() or _is_noun_capable(t) or _adjective_like(t) or t in lx.COLOR_WORDS \
        or bool(match_style(toks, j)) or t in lx.MEDIUM_NOUNS


def _frame_style(items: list[tuple[str, str, str]]) -> str | None | bool:
    """Style of a framing phrase made of ``items``, None for a style-less frame, False if not a frame."""
    style = None
    medium = False
    for kind, text, canon in items:
        if kind == "style":
            style = style or canon
        elif text in lx.MEDIUM_NOUNS:
            medium = True
            if style is None and lx.MEDIUM_NOUNS[text]:
                style = lx.MEDIUM_NOUNS[text]
        elif kind in ("adj", "color", "join"):
            continue
        else:
            return False
    if not medium and style is None:
        return False
    return style


def match_absolute(toks: list[str], i: int) -> tuple[int | None, int | None, int | None, int] | None:
    """"on the left", "in the top right corner", "in the background" -> (hint_x, hint_y, depth, next)."""
    n = len(toks)
    j = i
    if toks[j] not in _ABS_PREPS:
        return None
    j += 1
    if j < n and (toks[j] in _ABS_DETS or toks[j] in _POSSESSIVES):
        j += 1
    hx = hy = depth = None
    core = False
    start = j
    while j < n and toks[j] in _POSITION_WORDS:
        axis, val = _POSITION_WORDS[toks[j]]
        if axis == "x":
            hx, core = val, True
        elif axis == "y":
            hy, core = val, True
        elif axis == "c":
            core = True
            hx = 1 if hx is None else hx
            hy = 1 if hy is None else hy
        elif axis == "d":
            depth, core = val, True
        j += 1
    if not core or j == start:
        return None
    if j < n and toks[j] in ("of", "side") and not (toks[j] == "side" and (j + 1 >= n or toks[j + 1] != "of")):
        if toks[j] == "side":
            j += 1
        else:
            return None
    if j < n and toks[j] == "of":
        return None
    if toks[i] == "to" and hx is None:
        return None
    if toks[start - 1] == "a" and toks[i] != "in":
        return None
    # "a cat in the center" centres both axes only when no axis was named.
    if hx == 1 and hy is not None and hy != 1:
        hx = None
    return hx, hy, depth, j


def _match_style_suffix(toks: list[str], i: int) -> tuple[str, int] | None:
    """"in pixel art style", "in the style of ukiyo-e", "anime style", "as a watercolor", "drawn in ink"."""
    n = len(toks)
    j = i
    if toks[j] in ("drawn", "painted", "rendered", "done", "made", "depicted", "illustrated", "styled"):
        j += 1
        if j < n and toks[j] in ("in", "as", "like"):
            j += 1
    elif toks[j] in ("in", "as", "like"):
        j += 1
    if j < n and toks[j] in ("a", "an", "the"):
        j += 1
    if match_phrase(toks, j, ("style", "of")):
        k = j + 2
        st = match_style(toks, k) if k < n else None
        if st:
            return st[0], _skip_medium(toks, st[1])
        words = []
        while k < n and len(words) < 4 and toks[k] not in _SENTENCE_END and toks[k] not in (",", "and"):
            words.append(toks[k])
            k += 1
        if words:
            return " ".join(words), k
        return None
    st = match_style(toks, j) if j < n else None
    if not st:
        return None
    end = _skip_medium(toks, st[1])
    has_frame_word = end > st[1] or j > i
    # A bare style word is a style suffix only if nothing noun-like follows ("..., watercolor").
    if not has_frame_word and end < n and toks[end] not in _SENTENCE_END and toks[end] not in (",",):
        return None
    if end < n and toks[end] == "of":
        return None
    if j > i and end < n and _continues_np(toks, end) and end == st[1]:
        return None
    return st[0], end


def _skip_medium(toks: list[str], j: int) -> int:
    while j < len(toks) and toks[j] in _MEDIUM_STYLE_WORDS:
        j += 1
    return j


class _Reader:
    """Walks the tokens once and builds a :class:`Scene`."""

    def __init__(self, toks: list[str]):
        self.toks = toks
        self.scene = Scene()
        self.clause: list[int] = []        # mentions in the current clause
        self.sentence: list[int] = []      # mentions in the current sentence
        self.sentence_no = 0
        self.mention_sentence: list[int] = []
        self.pending: dict | None = None   # a relation waiting for its target or subject
        self.last_relation_subject: int | None = None
        self.after_relation_target = False
        self.pending_abs: tuple | None = None
        self.next_style: str | None = None
        self.style_events: list[tuple[str, int, int]] = []  # (style, mentions so far, sentence no)
        self.last_attribute: tuple[int, str] | None = None  # (subject, "wearing"/"with") for "and a hat"
        self.last_np_end = -1  # token index just after the latest object's phrase

    # -- helpers -----------------------------------------------------------------------------------
    def _add_mention(self, np: _NounPhrase) -> int:
        sc = self.scene
        if np.definite and not np.count_explicit:
            for m in reversed(sc.mentions):
                if m.label == np.label:
                    for mod in np.modifiers:
                        if mod not in m.modifiers:
                            m.modifiers.append(mod)
                    return m.index
        m = Mention(index=len(sc.mentions), label=np.label or "", count=np.count,
                    count_explicit=np.count_explicit, modifiers=list(np.modifiers),
                    head_text=np.head_text or (np.label or ""), post=list(np.post), style=np.style,
                    size_mult=np.size_mult, determiner=np.determiner)
        if self.next_style and not m.style:
            m.style = self.next_style
        self.next_style = None
        if self.pending_abs is not None:
            self._apply_abs(m, self.pending_abs)
            self.pending_abs = None
        sc.mentions.append(m)
        self.mention_sentence.append(self.sentence_no)
        return m.index

    @staticmethod
    def _apply_abs(m: Mention, hint: tuple) -> None:
        hx, hy, depth = hint
        if hx is not None:
            m.hint_x = hx
        if hy is not None:
            m.hint_y = hy
        if depth is not None:
            m.depth = depth

    def _relate(self, kind: str, subject: int, targets: tuple[int, ...], explicit: bool = True) -> None:
        if subject in targets:
            return
        self.scene.relations.append(Relation(kind, subject, targets, explicit))
        self.last_relation_subject = subject
        self.after_relation_target = True

    def _subject(self) -> int | None:
        if self.clause:
            return self.clause[-1]
        return None

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> Scene:
        toks = self.toks
        n = len(toks)
        i = self._skip_framing(0)
        while i < n:
            t = toks[i]
            if t in _SENTENCE_END:
                self._end_sentence()
                i += 1
                continue
            if t == ",":
                self.clause = []
                i += 1
                continue
            if t in ("and", "&", "plus", "while", "but", "or", "then", "also"):
                keep = self.after_relation_target
                self.clause = []
                i += 1
                if i < n and match_relation(toks, i) and keep and self.last_relation_subject is not None:
                    self.clause = [self.last_relation_subject]
                continue
            step = (self._order_phrase(i) or self._formation(i) or self._style_suffix(i)
                    or self._absolute(i) or self._negation(i) or self._relation(i) or self._noun(i))
            if step:
                i = step
                continue
            if t in _PRONOUNS and self.scene.mentions:
                self._pronoun(t)
            i += 1
        self._finish()
        return self.scene

    def _pronoun(self, token: str) -> None:
        """"it", "him", "them": the subject of what follows, or the target of a waiting relation."""
        pend = self.pending
        if pend is not None and pend["subject"] is not None:
            # "a dog running beside him": the most recent other object, a person for him/her.
            candidates = [m for m in reversed(self.scene.mentions) if m.index != pend["subject"]]
            if token in ("him", "her", "he", "she"):
                candidates.sort(key=lambda m: m.label not in lx.PEOPLE_NOUNS)
            for m in candidates:
                if m.index != pend["subject"]:
                    self.pending = None
                    self._resolve(pend["kinds"], pend["subject"], m.index, None, pend.get("phrase", ""))
                    return
            return
        self.clause = [self.sentence[-1] if self.sentence else self.scene.mentions[-1].index]

    def _end_sentence(self) -> None:
        self.clause = []
        self.sentence = []
        self.sentence_no += 1
        self.pending = None
        self.pending_abs = None
        self.after_relation_target = False
        self.last_attribute = None

    def _skip_framing(self, i: int) -> int:
        toks = self.toks
        n = len(toks)
        # Leading instructions to an image model: "generate", "please draw", "create an image of".
        while i < n and toks[i] in ("please", "generate", "create", "draw", "make", "render", "paint",
                                    "show", "imagine", "me", "depict", "illustrate", "design"):
            i += 1
        np = parse_noun_phrase(toks, i) if i < n else None
        if np is not None and np.is_frame:
            self.scene.framing_style = np.frame_style
            return np.end
        return i

    def _order_phrase(self, i: int) -> int | None:
        for words, (axis, reverse) in _ORDER_PHRASES.items():
            if match_phrase(self.toks, i, words):
                seq = list(self.sentence)
                if reverse:
                    seq.reverse()
                kind = "left" if axis == "x" else "above"
                for a, b in zip(seq, seq[1:]):
                    self._relate(kind, a, (b,))
                return i + len(words)
        return None

    def _formation(self, i: int) -> int | None:
        toks = self.toks
        subject = self._subject()
        if subject is None and self.sentence:
            subject = self.sentence[-1]
        if match_phrase(toks, i, ("side", "by", "side")):
            self._arrange_last(subject, "row")
            return i + 3
        rel = match_relation(toks, i)
        if rel:
            kind, j = rel
            for words in _EACH_OTHER:
                if match_phrase(toks, j, words) or (toks[j:j + 1] == ["the"] and match_phrase(toks, j + 1, words)):
                    end = j + 2 + (toks[j] == "the")
                    self._arrange_last(subject, "column" if kind in ("on", "above", "below", "under") else "row")
                    return end
        if toks[i] == "in":
            j = i + 1
            if j < len(toks) and toks[j] in ("a", "an", "one", "two", "three", "the"):
                j += 1
            if j < len(toks) and toks[j] in lx.FORMATION_NOUNS and (j + 1 >= len(toks) or toks[j + 1] != "of"):
                self._arrange_last(subject, lx.FORMATION_NOUNS[toks[j]])
                return j + 1
        return None

    def _arrange_last(self, subject: int | None, how: str) -> None:
        if subject is not None:
            self.scene.mentions[subject].arrangement = how

    def _style_suffix(self, i: int) -> int | None:
        st = _match_style_suffix(self.toks, i)
        if st is None:
            return None
        style, end = st
        self.style_events.append((style, len(self.scene.mentions), self.sentence_no))
        return end

    def _absolute(self, i: int) -> int | None:
        ab = match_absolute(self.toks, i)
        if ab is None:
            return None
        hx, hy, depth, end = ab
        target = self.clause[-1] if self.clause else None
        if i + 1 < len(self.toks) and self.toks[i + 1] in _POSSESSIVES and target is not None:
            # "a plate with a fork on its left": left of the object "its" points back to.
            # The sentence's topic (its first object), else the latest other object.
            topic = [m for m in self.sentence if m != target]
            referent = topic[0] if topic else next(
                (m.index for m in reversed(self.scene.mentions) if m.index != target), None)
            kind = {0: "left", 2: "right"}.get(hx) or {0: "above", 2: "below"}.get(hy)
            if referent is not None and kind:
                self._relate(kind, target, (referent,))
                return end
        if target is not None:
            self._apply_abs(self.scene.mentions[target], (hx, hy, depth))
        else:
            self.pending_abs = (hx, hy, depth)
        return end

    def _negation(self, i: int) -> int | None:
        toks = self.toks
        j = i
        if toks[j] == "without" or match_phrase(toks, j, ("with", "no")) or match_phrase(toks, j, ("and", "no")):
            j += 1 if toks[j] == "without" else 2
        elif toks[j] in ("no", "not"):
            j += 1
            if toks[j - 1] == "not" and j < len(toks) and toks[j] in ("a", "an", "any"):
                j += 1
        else:
            return None
        np = parse_noun_phrase(self.toks, j)
        if np is None or not np.label:
            return None
        self.scene.negatives.append(" ".join(self.toks[j:np.end]).removeprefix("any ").strip())
        return np.end

    def _relation(self, i: int) -> int | None:
        rel = match_relation(self.toks, i)
        if rel is None:
            return None
        kind, j = rel
        # "above and to the left of": several relations to one target.
        kinds = [kind]
        while j + 1 < len(self.toks) and self.toks[j] == "and":
            more = match_relation(self.toks, j + 1)
            if not more or more[0] in ("with", "wearing"):
                break
            kinds.append(more[0])
            j = more[1]
        subject = self._subject()
        if subject is None and kind in ("with", "wearing", "holding") and self.scene.mentions:
            subject = self.sentence[-1] if self.sentence else None
        phrase = " ".join(self.toks[i:j])
        if subject is not None and self.toks[i] in _VERB_LED and kind not in ("wearing", "holding"):
            verb = self.toks[i]
            m = self.scene.mentions[subject]
            if verb not in m.post and verb not in ("riding", "rides"):
                m.post.append(verb)
        if subject is None and kind not in _INVERTIBLE:
            return j  # "with ..." at the start of a clause: read what follows as plain objects
        self.pending = {"kinds": kinds, "subject": subject, "target": None, "phrase": phrase}
        self.after_relation_target = False
        return j

    def _noun(self, i: int) -> int | None:
        np = parse_noun_phrase(self.toks, i)
        if np is None:
            return None
        if np.is_frame:
            self.next_style = np.frame_style or self.next_style
            return np.end
        if np.label is None:
            if np.style:
                self.style_events.append((np.style, len(self.scene.mentions), self.sentence_no))
            return max(np.end, i + 1)
        if np.negated:
            self.scene.negatives.append(" ".join(self.toks[i:np.end]).split(" ", 1)[-1])
            return np.end
        label = np.label
        pend = self.pending
        if label in lx.META_NOUNS or np.head_written in lx.META_NOUNS:
            self.pending = None
            return np.end
        is_scene = (label in lx.SCENE_NOUNS or np.head_written in lx.SCENE_NOUNS) and label not in lx.known_nouns() \
            or label in (
            "sky", "ground", "floor", "wall", "water", "grass", "snow", "sand", "field", "background")
        is_part = label in lx.PART_NOUNS or np.head_written in lx.PART_NOUNS
        if label in lx.FORMATION_NOUNS and not np.count_explicit and pend and "inside" in pend["kinds"]:
            self._arrange_last(pend["subject"], lx.FORMATION_NOUNS[label])
            self.pending = None
            return np.end
        if pend is not None and pend["subject"] is not None and label in _CELESTIAL_GROUNDS \
                and any(k in ("on", "inside") for k in pend["kinds"]):
            is_scene = True
        if is_scene:
            self.scene.scene_words.append(label)
            if pend is not None:
                if pend["subject"] is not None and "inside" in pend["kinds"] and label == "sky":
                    self.scene.mentions[pend["subject"]].hint_y = 0
                self.pending = None
            return np.end
        if pend is None and is_part and self.last_attribute is not None:
            # "wearing a red scarf and a black hat": the list of clothes goes on.
            subj = self.scene.mentions[self.last_attribute[0]]
            det = self.toks[i] if self.toks[i] in lx.DETERMINERS else ""
            words = [det, *np.modifiers, np.head_written or np.head_text or label]
            subj.extras[-1] += " and " + " ".join(w for w in words if w)
            return np.end
        if pend is not None and pend["subject"] is not None:
            subject = pend["subject"]
            kinds = pend["kinds"]
            if "wearing" in kinds or (("with" in kinds or "inside" in kinds) and is_part):
                # Clothing and parts describe the subject ("a man wearing a red hat"): no region.
                word = "wearing" if "wearing" in kinds else ("in" if "inside" in kinds else "with")
                det = self.toks[i] if self.toks[i] in lx.DETERMINERS else ""
                words = [det, *np.modifiers, np.head_written or np.head_text or label]
                subj = self.scene.mentions[subject]
                subj.extras.append(" ".join([word, *[w for w in words if w]]))
                subj.post.extend(np.post)
                self.pending = None
                self.last_attribute = (subject, kinds[0] if kinds[0] in ("wearing", "with") else "with")
                return np.end
        bare = self.toks[i] not in lx.DETERMINERS and not _is_number(self.toks[i])
        if bare and pend is None and i == self.last_np_end and np.end == i + 1 and self.sentence \
                and label not in lx.known_nouns():
            # "a cat purrs on a mat": an unknown word right after an object is more likely its verb.
            self.scene.mentions[self.sentence[-1]].post.append(self.toks[i])
            return np.end
        if pend is None and is_part and bare and self.scene.mentions and not (
                np.end < len(self.toks) and match_relation(self.toks, np.end)):
            # "1girl, long hair, smile": a bare part on its own describes the object before it.
            owner = self.scene.mentions[self.sentence[-1] if self.sentence else -1]
            owner.extras.append("with " + " ".join(self.toks[i:np.end]))
            return np.end
        self.last_attribute = None
        self.last_np_end = np.end
        idx = self._add_mention(np)
        if pend is not None:
            self.pending = None
            if pend["subject"] is not None:
                self._resolve(pend["kinds"], pend["subject"], idx, np, pend.get("phrase", ""))
                end = np.end
                # "between a sofa and a chair": the second target.
                if "between" in pend["kinds"] and end + 1 < len(self.toks) and self.toks[end] == "and":
                    second = parse_noun_phrase(self.toks, end + 1)
                    if second is not None and second.label and not second.is_frame:
                        idx2 = self._add_mention(second)
                        self._replace_between(pend["subject"], idx, idx2)
                        self._push_clause(idx2)
                        return second.end
                self._push_clause(idx)
                return end
            if pend.get("target") is None:
                # "To the left of the barn stands a horse": the target comes first, the subject next.
                pend["target"] = idx
                self.pending = pend
                self._push_clause(idx, clause=False)
                return np.end
            if pend["target"] != idx:
                self._resolve(pend["kinds"], idx, pend["target"], np, pend.get("phrase", ""))
        self._push_clause(idx)
        return np.end

    def _push_clause(self, idx: int, clause: bool = True) -> None:
        if idx not in self.sentence:
            self.sentence.append(idx)
        if clause:
            self.clause.append(idx)
        else:
            self.after_relation_target = False

    def _resolve(self, kinds: list[str], subject: int, target: int, np: _NounPhrase | None,
                 phrase: str = "") -> None:
        ms = self.scene.mentions
        for kind in kinds:
            if kind == "with":
                tgt_label = ms[subject].label
                if tgt_label in _HOLDS_WITH:
                    self._relate("inside", target, (subject,), explicit=False)
                elif tgt_label in _SURFACES:
                    self._relate("on", target, (subject,), explicit=False)
                else:
                    self._relate("beside", subject, (target,), explicit=False)
            elif kind == "contains":
                self._relate("inside", target, (subject,))
            elif kind == "flanked":
                self._relate("between", subject, (target,))
            elif kind == "surrounded":
                self._relate("around", target, (subject,))
            elif kind == "holding":
                # The holder's prompt names what it holds, without that object's own attributes.
                self._relate("holding", subject, (target,))
                verb = phrase if phrase.split()[:1] and phrase.split()[0] in _VERB_LED else "holding"
                ms[subject].post.append(f"{verb} {_article(ms[target].label)} {ms[target].label}")
            elif kind == "on" and phrase.split()[:1] in (["riding"], ["rides"]):
                self._relate("on", subject, (target,))
                ms[subject].post.append(f"riding {_article(ms[target].label)} {ms[target].label}")
            elif kind == "inside":
                self._relate("inside", subject, (target,))
            else:
                self._relate(kind, subject, (target,))

    def _replace_between(self, subject: int, first: int, second: int) -> None:
        rels = self.scene.relations
        for k in range(len(rels) - 1, -1, -1):
            r = rels[k]
            if r.kind in ("between", "flanked") and r.subject == subject and r.targets == (first,):
                rels[k] = Relation("between", subject, (first, second), r.explicit)
                return
        self._relate("between", subject, (first, second))

    def _finish(self) -> None:
        sc = self.scene
        total = len(sc.mentions)
        last_sentence = self.sentence_no
        for style, seen, sent_no in self.style_events:
            later = [m for m in range(seen, total)]
            in_sentence = [m for m in range(total) if self.mention_sentence[m] == sent_no]
            if seen == 0 and not later:
                sc.global_style = style
            elif later and self.mention_sentence[later[0]] == sent_no and seen > 0:
                # "a dog in anime style next to a cat": the style belongs to the dog.
                target = sc.mentions[seen - 1]
                target.style = target.style or style
            elif not later and len(in_sentence) == 1 and total > 1 and sent_no == last_sentence:
                target = sc.mentions[in_sentence[0]]
                target.style = target.style or style
            elif not later or seen == 0:
                sc.global_style = style
            else:
                target = sc.mentions[seen - 1]
                target.style = target.style or style


def _article(word: str) -> str:
    return "an" if word[:1] in "aeio" or word.startswith(("u", "hour", "honest")) and not word.startswith(
        ("uni", "use", "usu", "ukulele", "utensil")) else "a"


def article(word: str) -> str:
    """"a" or "an" before ``word`` (by spelling, which is right for the nouns a prompt names)."""
    return _article(word)


def parse_prompt(text: str) -> Scene:
    """Read ``text`` into a :class:`Scene` (deterministic; at most :data:`MAX_TOKENS` tokens are read)."""
    toks = tokenize(text)
    reader = _Reader(toks)
    scene = reader.run()
    words = [t for t in toks if t[0].isalpha()]
    scene.word_count = len(words)
    scene.known_words = sum(1 for t in words if _is_english_word(t))
    return scene


def _is_english_word(tok: str) -> bool:
    return (tok in lx.known_nouns() or tok in lx.DETERMINERS or tok in lx.PREPOSITIONS
            or tok in lx.CONJUNCTIONS or tok in lx.COPULAS_AND_FILLERS or tok in lx.COLOR_WORDS
            or tok in lx.ADJECTIVES or tok in lx.NUMBER_WORDS or tok in lx.SCENE_NOUNS
            or tok in lx.PART_NOUNS or tok in lx.VERBS_3RD or tok in lx.STYLE_PHRASES
            or lx.singular(tok)[0] in lx.known_nouns() or tok in lx.MEDIUM_NOUNS
            or (tok.isascii() and tok.endswith(("ing", "ed", "ly", "s"))))
