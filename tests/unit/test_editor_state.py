"""The layout editor's state (mepg_core.editor_state) alone: parsing, the used-layout rule, expert names."""

from __future__ import annotations

import json

import pytest

from mepg_core.editor_state import (
    USED_EDITED,
    USED_INPUT,
    EditorStateError,
    check_experts,
    layout_hash,
    make_state,
    parse_editor_state,
    resolve,
)
from mepg_core.layout import parse_layout

LAYOUT = {
    "version": 1, "canvas": {"width": 1024, "height": 768}, "global_prompt": "a reading room",
    "negative_prompt": "",
    "regions": [
        {"label": "window", "prompt": "a tall arched window", "box": [60, 80, 380, 700], "style": "photo"},
        {"label": "bookshelf", "prompt": "a wooden bookshelf", "box": [560, 120, 960, 900], "style": "anime"},
    ],
}


def layout(d=LAYOUT):
    return parse_layout(d)[0]


def edited(source):
    d = json.loads(json.dumps(LAYOUT))
    d["regions"][0]["box"] = [100, 100, 300, 300]
    return make_state(layout(d), source)


def test_hash_is_of_the_normalised_layout():
    a = layout()
    b = parse_layout(json.dumps(LAYOUT, indent=4))[0]
    assert layout_hash(a) == layout_hash(b) and len(layout_hash(a)) == 16
    moved = json.loads(json.dumps(LAYOUT))
    moved["regions"][0]["box"][0] += 1
    assert layout_hash(layout(moved)) != layout_hash(a)


def test_edits_on_the_current_input_are_used():
    src = layout()
    res = resolve(src, parse_editor_state(edited(layout_hash(src))))
    assert res.used == USED_EDITED and res.layout.regions[0].box == (100, 100, 300, 300)


def test_a_changed_input_wins_and_is_sent_back():
    src = layout()
    res = resolve(src, parse_editor_state(edited("0123456789abcdef")))
    assert res.used == USED_INPUT and res.layout == src and res.source_hash == layout_hash(src)
    again = resolve(src, parse_editor_state(res.state_json()))
    assert again.used == USED_EDITED and again.layout == src


@pytest.mark.parametrize("state", ["", "   ", None])
def test_empty_state_uses_the_input(state):
    src = layout()
    assert resolve(src, parse_editor_state(state)).used == USED_INPUT


def test_without_input_the_state_is_used_even_without_hash():
    res = resolve(None, parse_editor_state(json.dumps(LAYOUT)))  # a bare layout
    assert res.used == USED_EDITED and res.source_hash is None
    with pytest.raises(EditorStateError, match="empty and no layout is connected"):
        resolve(None, parse_editor_state(""))


def test_a_bare_layout_does_not_override_a_connected_input():
    src = layout()
    d = json.loads(json.dumps(LAYOUT))
    d["regions"][0]["box"] = [1, 1, 50, 50]
    assert resolve(src, parse_editor_state(json.dumps(d))).used == USED_INPUT


@pytest.mark.parametrize("text,match", [
    ("{oops", r"editor_state: not valid JSON"),
    ("[1, 2]", r"editor_state: expected a JSON object, got list"),
    (json.dumps({"version": 2, "layout": LAYOUT}), r"editor_state\.version: must be 1"),
    (json.dumps({"version": 1, "source_hash": 5, "layout": LAYOUT}), r"editor_state\.source_hash"),
    (json.dumps({"version": 1, "source_hash": None}), r"editor_state\.layout: missing"),
    (json.dumps({"version": 1, "layout": "x"}), r"editor_state\.layout: expected a layout object"),
    (json.dumps({"version": 1, "layout": {**LAYOUT, "regions": [{**LAYOUT["regions"][0], "box": [5, 5, 5, 9]}]}}),
     r"editor_state\.layout\.regions\[0\]\.box: zero area"),
    (json.dumps({"version": 1, "layout": {**LAYOUT, "regions": [{**LAYOUT["regions"][1], "weight": "x"}]}}),
     r"editor_state\.layout\.regions\[0\]\.weight"),
    ('{"version": 1, "layout": {"regions": [{"label": "a", "box": [0, 0, NaN, 9]}]}}', r"NaN is not allowed"),
    ("x" * 1_000_001, r"at most 1000000"),
])
def test_bad_states_name_the_field(text, match):
    with pytest.raises(EditorStateError, match=match):
        parse_editor_state(text)


def test_repairs_are_warnings_with_the_state_path():
    d = json.loads(json.dumps(LAYOUT))
    d["regions"][0]["box"] = [380, 700, 60, 80]
    state = parse_editor_state(make_state(layout(), None).replace('"layout"', '"extra": 1, "layout"', 1))
    assert "editor_state.extra: unknown key ignored" in state.warnings
    state = parse_editor_state(json.dumps({"version": 1, "source_hash": None, "layout": d}))
    assert any(w.startswith("editor_state.layout.regions[0].box: corners swapped") for w in state.warnings)


def test_expert_names_come_from_the_stack_or_base():
    d = json.loads(json.dumps(LAYOUT))
    d["regions"][0]["expert"] = "Anime"
    d["regions"][1]["expert"] = "base"
    check_experts(layout(d), ["photo", "anime"])
    d["regions"][1]["expert"] = "oil"
    with pytest.raises(EditorStateError, match=r"regions\[1\]\.expert: 'oil' is not in the connected expert stack "
                                               r"\(choose one of: base, photo, anime"):
        check_experts(layout(d), ["photo", "anime"])


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, r"editor_state: nested more than 32 levels deep"),
    ('{"version": 1, "layout": ' + "{\"a\": " * 50 + "1" + "}" * 50 + "}", "nested more than 32 levels deep"),
    (json.dumps({"version": 10**400, "layout": LAYOUT}), "editor_state.version: must be 1, got an integer with "
                                                         "401 digits"),
    (json.dumps({"layout": {**LAYOUT, "canvas": {"width": 10**400, "height": 5}}}),
     "editor_state.layout.canvas.width: an integer with 401 digits exceeds"),
])
def test_hostile_states_are_errors_naming_the_field(text, match):
    with pytest.raises(EditorStateError, match=match):
        parse_editor_state(text)
