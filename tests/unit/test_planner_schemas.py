"""The chain's answer schemas and shape checks come from one definition per step (mepg_core.planner.schemas).

Checked with an independent JSON-schema validator (jsonschema): every generated schema is valid; answers
drawn at random from a schema pass the chain's reader; each way of breaking the schema is caught by both
the validator and the reader (except what a spec marks lenient); and a limit changed in one place moves
both.
"""

from __future__ import annotations

import copy
import random

import jsonschema
import pytest

from mepg_core.planner import chain, schemas
from mepg_core.planner.schemas import Arr, Box, Int, Obj, Text, json_schema, read

SPECS = {
    "step0": lambda: schemas.step0_spec(6),
    "step1": lambda: schemas.step1_spec(6),
    "step2": lambda: schemas.step2_spec(["cat", "cat", "sofa"]),
    "step3": lambda: schemas.step3_spec(["cat", "cat", "sofa"]),
}
WORDS = ["red", "cat", "small", "wooden", "a", "table", "left", "bright", "x" * 12]


def sample(spec, rng: random.Random, full: bool = False):
    """A random value the spec's schema allows (``full``: every optional field and list item present)."""
    if isinstance(spec, Text):
        if spec.const is not None:
            return spec.const
        if spec.enum is not None:
            return rng.choice(spec.enum)
        if not spec.required and not full and rng.random() < 0.3:
            return None
        limit = min(spec.max_chars, 60)
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, spec.words or 8))]
        text = " ".join(words)[:limit].strip() or "a"
        return text.replace("  ", " ")
    if isinstance(spec, Int):
        return spec.const if spec.const is not None else rng.randint(spec.lo, spec.hi)
    if isinstance(spec, Box):
        return [rng.randint(0, 1000) for _ in range(4)]
    if isinstance(spec, Arr):
        if spec.prefix is not None:
            return [sample(s, rng, full) for s in spec.prefix]
        hi = min(spec.max_items if spec.max_items is not None else 4, 4)
        lo = max(spec.min_items, 1 if full else 0)
        return [sample(spec.items, rng, full) for _ in range(rng.randint(lo, max(lo, hi)))]
    if isinstance(spec, Obj):
        return {k: sample(s, rng, full) for k, s in spec.fields}
    raise TypeError(spec)


def leaves(spec, path=()):
    """(path, spec) of every field, list and object in the spec tree."""
    yield path, spec
    if isinstance(spec, Obj):
        for key, sub in spec.fields:
            yield from leaves(sub, path + (key,))
    elif isinstance(spec, Arr):
        yield from leaves(spec.prefix[0] if spec.prefix is not None else spec.items, path + (0,))


def breakings(spec):
    """Values that break ``spec``'s schema and that the reader must refuse too."""
    if isinstance(spec, Text):
        out = [12345]
        if spec.const is None and spec.enum is None:
            out.append("w" * (spec.max_chars + 1))
            if spec.words and not spec.lenient_words:
                out.append(" ".join(["w"] * (spec.words + 1)))
        elif spec.enum is not None and not spec.lenient:
            out.append("sideways of")
        if spec.required:
            out.append(None)
        return out
    if isinstance(spec, Int):
        out = ["three", 2.5]
        if spec.const is None:
            out += [spec.lo - 1, spec.hi + 1]
        return out
    if isinstance(spec, Arr):
        out = ["not a list"]
        if spec.max_items is not None and spec.prefix is None:
            out.append([sample(spec.items, random.Random(0))] * (spec.max_items + 1))
        return out
    if isinstance(spec, Obj):
        return ["not an object"]
    return []


def put(doc, path, value):
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("name", sorted(SPECS))
def test_schemas_are_valid_json_schemas(name):
    jsonschema.Draft202012Validator.check_schema(json_schema(SPECS[name]()))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_answers_the_schema_allows_pass_the_reader(name):
    spec = SPECS[name]()
    validator = jsonschema.Draft202012Validator(json_schema(spec))
    rng = random.Random(name)
    for _ in range(200):
        value = sample(spec, rng)
        validator.validate(value)  # the sampler itself keeps to the schema
        problems: list[str] = []
        read(spec, value, "$", problems)
        assert problems == [], (value, problems)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_way_of_breaking_the_schema_is_a_problem_for_the_reader(name):
    spec = SPECS[name]()
    validator = jsonschema.Draft202012Validator(json_schema(spec))
    good = sample(spec, random.Random(1), full=True)
    checked = 0
    for path, sub in leaves(spec):
        if not path:
            continue
        for bad in breakings(sub):
            doc = put(good, path, bad)
            assert not validator.is_valid(doc), (path, bad)
            problems: list[str] = []
            read(spec, doc, "$", problems)
            shown = ".".join(str(p) for p in path)
            assert problems, f"the reader accepted {shown} = {bad!r}"
            checked += 1
    assert checked >= 4


def test_strict_form_lists_every_property_and_nothing_else():
    schema = json_schema(schemas.step1_spec(4))
    element = schema["properties"]["elements"]["items"]
    assert element["required"] == ["label", "count", "position", "attrs"]
    assert element["additionalProperties"] is False
    assert element["properties"]["position"]["anyOf"][1] == {"type": "null"}  # optional: may be null
    assert schema["properties"]["elements"]["maxItems"] == 4
    relation = schema["properties"]["relations"]["items"]["properties"]["relation"]
    assert relation["enum"] == list(schemas.RELATION_WORDS)


def test_step2_and_step3_schemas_fix_each_position():
    boxes = json_schema(schemas.step2_spec(["cat", "cat", "sofa"]))["properties"]["boxes"]
    assert [item["properties"]["label"]["const"] for item in boxes["prefixItems"]] == ["cat", "cat", "sofa"]
    assert boxes["minItems"] == boxes["maxItems"] == 3 and boxes["items"] is False
    regions = json_schema(schemas.step3_spec(["cat", "sofa"]))["properties"]["regions"]["prefixItems"]
    assert [r["properties"]["index"]["const"] for r in regions] == [0, 1]


def test_a_limit_changed_in_the_definition_moves_schema_and_validator(monkeypatch):
    answer = {"elements": [{"label": "enormous armchair", "count": 1, "position": "left", "attrs": []}],
              "relations": []}
    assert not chain._validate_step1(answer, max_regions=4).problems
    monkeypatch.setattr(schemas, "LABEL_CHARS", 8)
    assert json_schema(schemas.step1_spec(4))["properties"]["elements"]["items"]["properties"]["label"][
        "maxLength"] == 8
    assert chain._validate_step1(answer, max_regions=4).problems == [
        "elements[0].label: 17 characters; at most 8"]


def test_reader_tolerates_what_the_schema_does_not_ask_for():
    # Aliases and bare lists: an unconstrained model's habits, read but never asked for.
    problems: list[str] = []
    got = read(schemas.step1_spec(4), [{"name": "cat", "place": "left"}], "$", problems)
    assert problems == []
    assert got["elements"][0]["label"] == "cat" and got["elements"][0]["count"] == 1
    assert got["relations"] == []
