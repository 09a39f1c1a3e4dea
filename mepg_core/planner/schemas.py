"""One definition per chain step's answer, from which both its JSON schema and its shape checks derive.

A step's answer is described once, as a tree of :class:`Text`, :class:`Int`, :class:`Arr` and :class:`Obj`
specs. :func:`json_schema` turns the tree into the JSON schema that endpoints get as ``response_format``
and local models are constrained to (strict form: every property listed and required, no other keys;
an optional text is ``["string", "null"]``). :func:`read` runs the same tree over a parsed answer and
returns the cleaned value plus the list of problems (the chain's validators call it for every field, so
limits such as label length, count range or the number of boxes exist in one place only).

The reader accepts a superset of what the schema allows, never less: an answer that matches the schema
has no shape problem. It also reads alternative key spellings (``name`` for ``label``) and tolerates what
a model without constraints often writes; such tolerances are marked where they are declared
(``aliases``, ``lenient``). What a schema cannot say (boxes with x1 < x2, labels matching step 1's, no
repeated element) stays in the chain's validators as semantic checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..layout import COORD_MAX, short_repr

__all__ = [
    "ANALYSIS_CHARS",
    "LABEL_CHARS",
    "MAX_ATTRS",
    "MISSING",
    "REGION_PROMPT_CHARS",
    "REGION_PROMPT_WORDS",
    "RELATION_WORDS",
    "STYLE_CHARS",
    "Arr",
    "Box",
    "Int",
    "Obj",
    "Text",
    "json_schema",
    "read",
    "step0_spec",
    "step1_spec",
    "step2_spec",
    "step3_spec",
    "step_schema",
]

LABEL_CHARS = 60
STYLE_CHARS = 40
ATTR_CHARS = 24
MAX_ATTRS = 4
ANALYSIS_CHARS = 400
PLACE_CHARS = 60
REGION_PROMPT_CHARS = 240
REGION_PROMPT_WORDS = 40
GLOBAL_PROMPT_CHARS = 400
ROUGH_PROMPT_WORDS = 12
# What a constrained model may write where the reader takes any short text: a label is one to four
# lower-case words; a size and a rough place come from short lists (a small model asked for free text
# there copies the template's "small|medium|large").
LABEL_WORDS = 4
# A word of at most 16 letters: a small model under a grammar otherwise runs words together
# ("theleftofgreenpear...") until the answer's token budget is gone.
LOWER_WORD = "[a-z][a-z'-]{0,15}"
SIZES = ("small", "medium", "large")
PLACES = ("left", "right", "top", "bottom", "centre", "upper left", "upper right", "lower left", "lower right",
          "background", "foreground", "anywhere")
#: the spatial relations step 1 may name between two elements (the arranger's vocabulary)
RELATION_WORDS = ("left of", "right of", "above", "below", "on", "under", "next to", "in front of", "behind",
                  "in", "holding")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: what :func:`read` returns for an optional field that is absent
MISSING = _Missing()


@dataclass(frozen=True)
class Text:
    """A short text. Whitespace is collapsed on reading; ``null`` or blank counts as absent.

    ``const``/``enum``: the only value(s) the schema allows. ``lenient``: the reader does not enforce
    ``const``/``enum`` (a semantic check downstream compares it, e.g. plural labels). ``words``: the most
    words. ``word``: the regular expression of one word in the schema (default: no spaces, no angle
    brackets, so a model cannot copy a template's ``<noun>`` placeholder); the reader does not check it
    (it only narrows what a constrained model writes).
    """

    max_chars: int
    required: bool = True
    aliases: tuple[str, ...] = ()
    const: str | None = None
    enum: tuple[str, ...] | None = None
    words: int | None = None
    lenient: bool = False
    word: str = r"[^\s<>]{1,24}"
    lenient_words: bool = False  # ``words`` narrows the schema only (labels: the reader takes longer ones)


@dataclass(frozen=True)
class Int:
    """A whole number in ``[lo, hi]``. ``default`` is used when absent (then it is not required)."""

    lo: int
    hi: int
    default: int | None = None
    const: int | None = None
    what: str | None = None  # "a region number": the out-of-range message names it
    lenient: bool = False    # the reader does not enforce ``const`` (the validator maps by value)

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Arr:
    """A list of ``items`` (one spec for all) or of ``prefix`` (one spec per position, exactly that many).

    ``noun``: what the items are called in messages ("boxes"); ``describe``: what an item holds, for the
    missing-list message. ``lenient_length``: with ``prefix``, the reader reads any number of items with
    ``items`` and leaves the count to the validator (which names what is missing or extra).
    """

    items: Any = None
    prefix: tuple[Any, ...] | None = None
    min_items: int = 0
    max_items: int | None = None
    noun: str = "entries"
    describe: str = ""
    required: bool = True
    lenient_length: bool = False


@dataclass(frozen=True)
class Box:
    """A box ``[x1, y1, x2, y2]``: four integers on the 0..1000 frame in the schema. The reader passes it
    on unchanged: :func:`~mepg_core.layout.parse_layout` checks it (and repairs a 0-1 scale or swapped
    corners, with a warning)."""

    required: bool = True


@dataclass(frozen=True)
class Obj:
    """An object with named fields (in order); ``bare_list``: a bare list is read as this key's value."""

    fields: tuple[tuple[str, Any], ...]
    bare_list: str | None = None
    required: bool = True

    def field(self, name: str) -> Any:
        for key, spec in self.fields:
            if key == name:
                return spec
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# The schema


def json_schema(spec: Any) -> dict[str, Any]:
    """The strict JSON schema of ``spec`` (every property required, ``additionalProperties: false``)."""
    if isinstance(spec, Text):
        out: dict[str, Any]
        if spec.const is not None:
            out = {"type": "string", "const": spec.const}
        elif spec.enum is not None:
            out = {"type": "string", "enum": list(spec.enum)}
        else:
            # Words separated by single spaces, none at either end; at most ``words`` of them.
            more = "*" if spec.words is None else f"{{0,{spec.words - 1}}}"
            out = {"type": "string", "minLength": 1, "maxLength": spec.max_chars,
                   "pattern": f"^{spec.word}( {spec.word}){more}$"}
        if not spec.required:
            out = {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(spec, Int):
        if spec.const is not None:
            return {"type": "integer", "const": spec.const}
        return {"type": "integer", "minimum": spec.lo, "maximum": spec.hi}
    if isinstance(spec, Box):
        coord = {"type": "integer", "minimum": 0, "maximum": COORD_MAX}
        return {"type": "array", "items": coord, "minItems": 4, "maxItems": 4}
    if isinstance(spec, Arr):
        if spec.prefix is not None:
            n = len(spec.prefix)
            return {"type": "array", "prefixItems": [json_schema(s) for s in spec.prefix], "items": False,
                    "minItems": n, "maxItems": n}
        out = {"type": "array", "items": json_schema(spec.items), "minItems": spec.min_items}
        if spec.max_items is not None:
            out["maxItems"] = spec.max_items
        return out
    if isinstance(spec, Obj):
        return {"type": "object", "properties": {k: json_schema(s) for k, s in spec.fields},
                "required": [k for k, _ in spec.fields], "additionalProperties": False}
    raise TypeError(f"not a spec: {spec!r}")


# --------------------------------------------------------------------------------------------------
# The reader


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read(spec: Any, value: Any, path: str, problems: list[str]) -> Any:
    """The cleaned ``value`` per ``spec``, appending what is wrong to ``problems`` (``None`` on a problem).

    Returns :data:`MISSING` for an absent optional field (``Int`` with a default returns the default).
    """
    if isinstance(spec, Text):
        return _read_text(spec, value, path, problems)
    if isinstance(spec, Int):
        return _read_int(spec, value, path, problems)
    if isinstance(spec, Arr):
        return _read_arr(spec, value, path, problems)
    if isinstance(spec, Box):
        if value is None:
            problems.append(f"{path}: missing; expected [x1, y1, x2, y2]")
        return value
    if isinstance(spec, Obj):
        return _read_obj(spec, value, path, problems)
    raise TypeError(f"not a spec: {spec!r}")


def _read_text(spec: Text, value: Any, path: str, problems: list[str]) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.required:
            problems.append(f"{path}: missing; expected a short text")
            return None
        return MISSING
    if not isinstance(value, str):
        problems.append(f"{path}: must be a string, got {_type_name(value)}")
        return None
    text = " ".join(value.split())
    if spec.words is not None and not spec.lenient_words and len(text.split()) > spec.words:
        problems.append(f"{path}: {len(text.split())} words; keep it under {spec.words}")
        return None
    if len(text) > spec.max_chars:
        problems.append(f"{path}: {len(text)} characters; at most {spec.max_chars}")
        return None
    if not spec.lenient:
        if spec.const is not None and text != spec.const:
            problems.append(f"{path}: must be {spec.const!r}, got {short_repr(text)}")
            return None
        if spec.enum is not None and text.lower() not in spec.enum:
            problems.append(f"{path}: {short_repr(text)} is not one of {', '.join(spec.enum)}")
            return None
    return text


def _read_int(spec: Int, value: Any, path: str, problems: list[str]) -> Any:
    if value is None and spec.default is not None:
        return spec.default
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number != int(number):
        problems.append(f"{path}: must be a whole number, got {short_repr(value)}")
        return None
    number = int(number)
    if not spec.lo <= number <= spec.hi or (spec.const is not None and not spec.lenient and number != spec.const):
        if spec.what:
            problems.append(f"{path}: {value!r} is not {spec.what} {spec.lo}..{spec.hi}")
        elif spec.const is not None:
            problems.append(f"{path}: must be {spec.const}, got {value!r}")
        else:
            problems.append(f"{path}: must be from {spec.lo} to at most {spec.hi}, got {number}")
        return None
    return number


def _read_arr(spec: Arr, value: Any, path: str, problems: list[str]) -> Any:
    exact = spec.prefix is not None and not spec.lenient_length
    wanted_min = len(spec.prefix) if exact else (1 if spec.prefix is not None else spec.min_items)
    wanted_max = len(spec.prefix) if exact else (None if spec.prefix is not None else spec.max_items)
    missing = f"{path}: missing or empty; expected {spec.describe or 'a list of ' + spec.noun}"
    if value is None:
        if spec.required and wanted_min > 0:
            problems.append(missing)
            return None
        return []
    if not isinstance(value, list):
        problems.append(f"{path}: must be a list, got {_type_name(value)}")
        return None
    if not value and wanted_min > 0:
        problems.append(missing)
        return None
    if wanted_max is not None and len(value) > wanted_max:
        problems.append(f"{path}: {len(value)} {spec.noun}; at most {wanted_max} are allowed")
        return None
    if len(value) < wanted_min:
        problems.append(f"{path}: {len(value)} {spec.noun}; {wanted_min} needed")
        return None
    out = []
    for i, item in enumerate(value):
        item_spec = spec.prefix[i] if exact else (spec.items if spec.items is not None else spec.prefix[0])
        out.append(read(item_spec, item, f"{path}[{i}]", problems))
    return out


def _read_obj(spec: Obj, value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, list) and spec.bare_list is not None:
        value = {spec.bare_list: value}
    if not isinstance(value, dict):
        problems.append(f"$: expected a JSON object, got {_type_name(value)}" if path == "$" else
                        f"{path}: must be an object, got {_type_name(value)}")
        return None
    out: dict[str, Any] = {}
    for key, sub in spec.fields:
        raw = value.get(key)
        if raw is None:
            for alias in getattr(sub, "aliases", ()):
                if value.get(alias) is not None:
                    raw = value[alias]
                    break
        sub_path = key if path == "$" else f"{path}.{key}"
        out[key] = read(sub, raw, sub_path, problems)
    return out


# --------------------------------------------------------------------------------------------------
# The four steps


def _box() -> Box:
    return Box()


def _label(aliases: tuple[str, ...] = ()) -> Text:
    return Text(LABEL_CHARS, aliases=aliases, words=LABEL_WORDS, word=LOWER_WORD, lenient_words=True)


def _style() -> Text:
    return Text(STYLE_CHARS, required=False, words=3, word=LOWER_WORD.replace("a-z]", "a-z0-9]"), lenient_words=True)


def step0_spec(max_regions: int) -> Obj:
    """Step 0 (analysis): ``{"analysis", "elements": [{name, count, size, place}], "layout": [{label, box,
    prompt, style}]}``."""
    element = Obj((("name", _label(aliases=("label",))),
                   ("count", Int(1, max_regions, default=1)),
                   ("size", Text(LABEL_CHARS, required=False, enum=SIZES, lenient=True)),
                   ("place", Text(PLACE_CHARS, required=False, aliases=("position",), enum=PLACES, lenient=True))))
    region = Obj((("label", _label(aliases=("name",))),
                  ("box", _box()),
                  # The rough layout's prompts: short in the schema (tokens are slow on a CPU), any length to 40
                  # words for the reader (LoRA targets carry the offline planner's region prompts).
                  ("prompt", Text(REGION_PROMPT_CHARS, required=False, words=ROUGH_PROMPT_WORDS,
                                  lenient_words=True)),
                  ("style", _style())))
    return Obj((("analysis", Text(ANALYSIS_CHARS, required=False, words=60)),
                ("elements", Arr(items=element, max_items=max_regions, noun="elements", required=False)),
                ("layout", Arr(items=region, min_items=1, max_items=max_regions, noun="boxes",
                               describe="a list of {label, box}"))),
               bare_list="layout")


def step1_spec(max_regions: int) -> Obj:
    """Step 1 (elements): ``{"elements": [{label, count, position, attrs}], "relations": [{subject,
    relation, object}]}``; relations name elements by their index in ``elements``."""
    element = Obj((("label", _label(aliases=("name",))),
                   ("count", Int(1, max_regions, default=1)),
                   ("position", Text(PLACE_CHARS, required=False, aliases=("place",), enum=PLACES, lenient=True)),
                   ("attrs", Arr(items=Text(ATTR_CHARS, words=2, word=LOWER_WORD), max_items=MAX_ATTRS,
                                 noun="attributes", required=False))))
    relation = Obj((("subject", Int(0, max_regions - 1)),
                    ("relation", Text(20, enum=RELATION_WORDS)),
                    ("object", Int(0, max_regions - 1))))
    return Obj((("elements", Arr(items=element, min_items=1, max_items=max_regions, noun="elements",
                                 describe="a list of {label, count, position}")),
                ("relations", Arr(items=relation, max_items=max_regions, noun="relations",
                                  required=False))),
               bare_list="elements")


def step2_spec(labels: Sequence[str]) -> Obj:
    """Step 2 (coordinates): ``{"boxes": [{label, box}]}``, one box per instance in step 1's order."""
    def item(label: str | None) -> Obj:
        return Obj((("label", Text(LABEL_CHARS, const=label, lenient=True, aliases=("name",))), ("box", _box())))

    # The validator counts the boxes per label (and names what is missing), so the reader takes any number.
    return Obj((("boxes", Arr(prefix=tuple(item(label) for label in labels), items=item(None), noun="boxes",
                              describe="a list of {label, box}", lenient_length=True)),), bare_list="boxes")


def step3_spec(labels: Sequence[str]) -> Obj:
    """Step 3 (details): ``{"global_prompt", "regions": [{index, label, prompt, style}]}``, in box order."""
    n = len(labels)

    def item(i: int | None, label: str | None) -> Obj:
        return Obj((("index", Int(0, n - 1, const=i, what="a region number", lenient=True)),
                    ("label", Text(LABEL_CHARS, const=label, lenient=True, required=False)),
                    ("prompt", Text(REGION_PROMPT_CHARS, words=REGION_PROMPT_WORDS)),
                    ("style", _style())))

    # Regions are matched by index (any order) and the validator names the missing ones.
    return Obj((("global_prompt", Text(GLOBAL_PROMPT_CHARS, required=False, words=REGION_PROMPT_WORDS,
                                       lenient_words=True)),
                ("regions", Arr(prefix=tuple(item(i, label) for i, label in enumerate(labels)), items=item(None, None),
                                noun="regions", describe="one entry per region", lenient_length=True))),
               bare_list="regions")


@dataclass
class StepSchema:
    """A step's schema as sent: ``name`` (for ``response_format``), the ``schema`` dict and its spec."""

    name: str
    spec: Obj
    schema: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.schema = json_schema(self.spec)


def step_schema(name: str, spec: Obj) -> StepSchema:
    return StepSchema(name, spec)
