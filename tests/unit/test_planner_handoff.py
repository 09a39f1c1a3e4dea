"""The hand-off of the chain's elements and relations to the arranger (mepg_core.planner.handoff).

Judged by behaviour, not coordinates: one region per instance, every stated left/right/above/below
relation holds under the scorer's geometry (relations.relative_position, GenEval's rule), boxes inside
the frame with positive area, attributes in the region prompts; bad input names what is wrong.
"""

from __future__ import annotations

from collections import Counter

import pytest

from mepg_core.layout import parse_layout
from mepg_core.planner.handoff import layout_from_elements
from mepg_core.planner.relations import relative_position

CASES = [
    ([{"label": "apple", "count": 1, "attrs": ["red"]}, {"label": "pear", "count": 1, "attrs": ["green"]}],
     [(0, "left of", 1)]),
    ([{"label": "dog", "count": 2, "attrs": []}, {"label": "tree", "count": 1, "attrs": []},
      {"label": "kite", "count": 1, "attrs": ["red"]}],
     [(0, "below", 1), (2, "above", 1)]),
    ([{"label": "cup", "count": 1, "attrs": ["blue"]}, {"label": "table", "count": 1, "attrs": ["wooden"]},
      {"label": "lamp", "count": 1, "attrs": []}],
     [(0, "on", 1), (2, "right of", 1)]),
    ([{"label": "cat", "count": 3, "attrs": ["black"]}, {"label": "sofa", "count": 1, "attrs": []}],
     [(1, "below", 0), (0, "next to", 1)]),
]
CHECKABLE = {"left of": "left of", "right of": "right of", "above": "above", "below": "below", "on": "above"}


@pytest.mark.parametrize("elements, relations", CASES)
@pytest.mark.parametrize("width, height", [(1024, 1024), (1216, 832)])
def test_counts_relations_and_frame(elements, relations, width, height):
    layout = layout_from_elements(elements, relations, global_prompt="a scene", width=width, height=height)
    parse_layout(layout.to_json())  # a valid schema-v1 layout
    assert Counter(r.label for r in layout.regions) == Counter({e["label"]: e["count"] for e in elements})
    assert (layout.canvas.width, layout.canvas.height) == (width, height)
    for r in layout.regions:
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    by_label = {e["label"]: [r for r in layout.regions if r.label == e["label"]] for e in elements}
    for s, word, o in relations:
        if word not in CHECKABLE:
            continue
        for a in by_label[elements[s]["label"]]:
            for b in by_label[elements[o]["label"]]:
                assert CHECKABLE[word] in relative_position(a.box, b.box, width, height), (word, a.box, b.box)
    for e in elements:
        for r in by_label[e["label"]]:
            assert all(attr in r.prompt for attr in e["attrs"]) and e["label"] in r.prompt


def test_instances_of_one_element_do_not_overlap():
    layout = layout_from_elements([{"label": "bird", "count": 5, "attrs": []}], [], global_prompt="five birds",
                                  width=1024, height=1024)
    boxes = [r.box for r in layout.regions]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


def test_style_and_seed():
    elements = [{"label": "fox", "count": 1, "attrs": [], "style": "anime"}, {"label": "tree", "count": 1}]
    canonical = layout_from_elements(elements, [(0, "below", 1)], global_prompt="x", width=1024, height=1024)
    assert canonical.regions[0].style == "anime" and canonical.regions[1].style is None
    again = layout_from_elements(elements, [(0, "below", 1)], global_prompt="x", width=1024, height=1024)
    assert again == canonical
    jittered = layout_from_elements(elements, [(0, "below", 1)], global_prompt="x", width=1024, height=1024, seed=3)
    assert "below" in relative_position(jittered.regions[0].box, jittered.regions[1].box)


@pytest.mark.parametrize("elements, relations, match", [
    ([], [], "elements is empty"),
    ([{"label": "", "count": 1}], [], r"elements\[0\].label"),
    ([{"label": "cat", "count": 0}], [], r"elements\[0\].count"),
    ([{"label": "cat", "count": 1}, {"label": "dog", "count": 1}], [(0, "sideways", 1)], "unknown relation"),
    ([{"label": "cat", "count": 1}, {"label": "dog", "count": 1}], [(0, "left of", 5)], r"relations\[0\]"),
    ([{"label": "cat", "count": 1}], [(0, "left of", 0)], r"relations\[0\]"),
    ([{"label": "cat", "count": 65}], [], "at most 64"),
])
def test_bad_input_names_the_problem(elements, relations, match):
    with pytest.raises(ValueError, match=match):
        layout_from_elements(elements, relations, global_prompt="x", width=1024, height=1024)
