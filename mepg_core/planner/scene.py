"""The scene model the planner works on: the things a prompt names and the relations between them.

The reader (:mod:`.reader`) fills it from a prompt; the arranger (:mod:`.arrange`) turns it into boxes;
:mod:`.region_text` writes each thing's own region prompt. Nothing here reads text or places boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Mention:
    """One thing the prompt names (possibly several instances of it)."""

    index: int
    label: str                  # singular head noun, or a known compound ("wine glass")
    count: int
    count_explicit: bool        # a number was written ("two", "3", "a pair of")
    modifiers: list[str] = field(default_factory=list)  # words before the head, as written
    head_text: str = ""         # the head as it goes in the region prompt ("cats" for a count of 3)
    post: list[str] = field(default_factory=list)       # pose words after the head ("sleeping")
    extras: list[str] = field(default_factory=list)     # attached phrases ("wearing a red hat")
    style: str | None = None
    size_mult: float = 1.0
    hint_x: int | None = None   # 0 left, 1 centre, 2 right
    hint_y: int | None = None   # 0 top, 1 middle, 2 bottom
    depth: int | None = None    # 0 background, 2 foreground
    arrangement: str | None = None  # "row", "column" or "grid" for several instances
    determiner: str = ""        # "the" when the prompt wrote "the sun"
    main: bool = False          # a subject the picture is about (drawn prominent)
    kind: str = "thing"         # vocabulary class: person, animal, plant, thing
    one_of: list[tuple[str, str]] = field(default_factory=list)  # ("middle", "black"): one instance's words


@dataclass(frozen=True)
class Relation:
    kind: str                # left right above below on under beside between front behind inside holding around
    subject: int             # mention index
    targets: tuple[int, ...]
    explicit: bool = True    # written in the prompt (False: inferred, e.g. "with" on a table)


@dataclass
class Scene:
    mentions: list[Mention] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    global_style: str | None = None
    framing_style: str | None = None
    negatives: list[str] = field(default_factory=list)
    scene_words: list[str] = field(default_factory=list)
    known_words: int = 0
    word_count: int = 0
    stop_words: int = 0        # English function words ("a", "the", "on"): a check that the text is English
