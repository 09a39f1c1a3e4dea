"""One object, one identity: the reader's noun phrases become the scene's mentions.

A definite or bare repetition of a thing already read ("a red lighter ... the lighter", "the tub" after
"a bathtub", "the folders") is the same thing and adds its words to it; an indefinite one ("a cat ... a
cat") is another. Worn things and parts give their words to their wearer. Pronouns are resolved by
:func:`last_mention_before`.
"""

from __future__ import annotations

from typing import Any

from . import vocabulary
from .scene import Mention, Scene


def _same_thing(label: str, other: str) -> bool:
    if label == other:
        return True
    a, b = label.split()[-1], other.split()[-1]
    if a == b:
        return True
    # "the tub" for the bathtub, "the truck" for the pickup truck
    return (len(a) >= 3 and b.endswith(a) and _compound_of(b, a)) or \
        (len(b) >= 3 and a.endswith(b) and " " not in label and _compound_of(a, b))


def _compound_of(word: str, head: str) -> bool:
    """Whether ``word`` is ``head`` with a noun before it ("bath" + "tub"), not a word that merely ends
    like it ("wo" + "man")."""
    front = word[:-len(head)]
    return len(front) >= 3 and vocabulary.wordnet_codes(front) is not None


def link(doc: Any, phrases: list, scene: Scene) -> None:
    """Fill ``scene.mentions`` from the phrases; sets each phrase's ``mention``."""
    for p in phrases:
        if p.skip or p.negated:
            continue
        if p.cls == "worn" and p.owner is not None:
            continue
        if p.cls == "generic":
            # "the vehicle", "the animals": a kind of something already read refers back to it
            back = _generic_antecedent(doc, p, scene)
            if back is not None:
                p.mention = back
                continue
            if p.definite or p.head > 0 and doc[p.head].sent.start != 0:
                continue
            p.cls = "thing"
        if p.cls not in vocabulary.BOXABLE:
            continue
        if p.cls == "unknown" and doc[p.head].pos_ == "PROPN" and \
                p.head > 0 and doc[p.head - 1].text.lower() in ("by", "of") and _after_style(doc, p.head):
            continue
        earlier = _antecedent(doc, p, scene)
        if earlier is not None:
            m = scene.mentions[earlier]
            p.mention = earlier
            for w in p.modifiers:
                if w.lower() not in (x.lower() for x in m.modifiers) and len(m.modifiers) < 8:
                    m.modifiers.append(w)
            if p.count_explicit and not m.count_explicit:
                m.count, m.count_explicit = p.count, True
            continue
        p.mention = len(scene.mentions)
        head = doc[p.head]
        head_text = p.label.split()[-1] if p.count > 1 or head.tag_ in ("NNS", "NNPS") else head.text
        if p.cls == "unknown" and head.pos_ == "PROPN":
            head_text = head.text
        scene.mentions.append(Mention(
            index=p.mention, label=p.label.lower(), count=p.count, count_explicit=p.count_explicit,
            modifiers=list(p.modifiers), head_text=head_text, style=p.style, size_mult=p.size_mult,
            determiner="the" if doc[p.start].text.lower() == "the" else "",
            kind=p.cls if p.cls != "unknown" else "thing"))
    for p in phrases:
        if p.cls == "worn" and p.owner is not None and not p.skip and not p.negated:
            owner = phrases[p.owner]
            if owner.mention is None:
                continue
            prep = doc[p.start - 1].text.lower() if p.start > 0 else ""
            words = " ".join(t.text for t in doc[p.start:p.head + 1])
            if prep in ("in", "with", "wearing", "and", "holding") and doc[p.start - 1].i != owner.head:
                words = f"{prep} {words}" if prep != "and" else f"and {words}"
            m = scene.mentions[owner.mention]
            if len(" ".join(m.extras).split()) < 24 and words not in m.extras:
                m.extras.append(words)
        elif p.skip and p.owner is not None and phrases[p.owner].mention is not None:
            m = scene.mentions[phrases[p.owner].mention]
            m.extras.append("of " + " ".join(t.text for t in doc[p.start:p.head + 1]))


def _generic_antecedent(doc: Any, p, scene: Scene) -> int | None:
    if not scene.mentions:
        return None
    want = {"animal": ("animal",), "creature": ("animal", "person"), "beast": ("animal",), "bird": ("animal",),
            "pet": ("animal",), "mammal": ("animal",), "insect": ("animal",), "fruit": ("food", "plant"),
            "berry": ("food", "plant"), "plant": ("plant",), "flower": ("plant",),
            "companion": ("person", "animal"), "friend": ("person", "animal")}.get(p.label.split()[-1])
    for m in reversed(scene.mentions):
        if want is None or m.kind in want:
            return m.index
    return None


def _after_style(doc: Any, i: int) -> bool:
    return any(t.text.lower() in ("style", "art", "painting", "by") for t in doc[max(0, i - 4):i])


def _antecedent(doc: Any, p, scene: Scene) -> int | None:
    """The mention this phrase repeats, if it is a repetition."""
    if not scene.mentions:
        return None
    first_word = doc[p.start].text.lower()
    indefinite = first_word in ("a", "an", "another") or (p.count_explicit and not p.definite)
    if indefinite:
        return None
    for m in reversed(scene.mentions):
        if _same_thing(p.label, m.label):
            return m.index
    return None


def last_mention_before(phrases: list, pos: int, exclude: set, floor: int = 0) -> int | None:
    """The mention of the nearest phrase ending before token ``pos`` (not in ``exclude``, not before
    ``floor``): what "it", "its", "her" or "the one" refers to."""
    best = None
    for p in phrases:
        if p.head >= pos or p.head < floor:
            continue
        m = p.mention
        if m is None and p.owner is not None:
            m = phrases[p.owner].mention
        if m is not None and m not in exclude:
            best = m
    return best
