"""Plan scoring: GenEval's position rule against a direct numpy computation, every tag's check on
hand-built layouts (right ones pass, wrong ones fail), aggregation, and the command line."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from mepg_core.layout import Canvas, Layout, Region
from mepg_core.planner import plan_offline
from mepg_core.planner.lexicon import GENEVAL_COLORS, geneval_object_names
from mepg_core.planner.relations import relative_position
from mepg_core.planner.scoring import GENEVAL_METADATA, load_metadata, normalize_label, score_layout, score_layouts
from mepg_core.planner.scoring import main as scoring_main

ROOT = Path(__file__).resolve().parents[2]


def lay(*regions, width=1024, height=1024) -> Layout:
    return Layout(global_prompt="test", regions=tuple(regions), canvas=Canvas(width, height))


def reg(label, box, prompt=None, style=None) -> Region:
    return Region(label=label, prompt=prompt or f"a {label}", box=tuple(box), style=style)


def meta(tag, *include, exclude=None, prompt="p"):
    m = {"tag": tag, "include": list(include), "prompt": prompt}
    if exclude:
        m["exclude"] = exclude
    return m


# --------------------------------------------------------------------------------------------------
# GenEval's rule


def geneval_rule_numpy(box_a, box_b):
    """GenEval's relative-position rule written out with numpy, as a reference."""
    boxes = np.array([box_a, box_b], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def test_relative_position_matches_the_reference_on_random_boxes():
    rng = random.Random(0)
    for _ in range(3000):
        def box():
            x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
            return [x1, y1, rng.randint(x1 + 1, 1000), rng.randint(y1 + 1, 1000)]
        a, b = box(), box()
        assert relative_position(a, b) == geneval_rule_numpy(a, b), (a, b)
        # on a non-square canvas the rule runs on pixels
        sa = [a[0] * 1.344, a[1] * 0.768, a[2] * 1.344, a[3] * 0.768]
        sb = [b[0] * 1.344, b[1] * 0.768, b[2] * 1.344, b[3] * 0.768]
        assert relative_position(a, b, 1344, 768) == geneval_rule_numpy(sa, sb)


def test_relative_position_hand_cases():
    left, right = (0, 0, 100, 100), (500, 0, 600, 100)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((0, 0, 100, 100), (0, 500, 100, 600)) == {"above"}
    assert relative_position((0, 0, 100, 100), (10, 10, 110, 110)) == set()   # offset eaten by the sizes
    # a 45-degree diagonal: each component ~0.707 minus the size allowance -> both relations
    assert relative_position((0, 0, 10, 10), (500, 500, 510, 510)) == {"left of", "above"}
    # a wide offset with a little height: only the horizontal relation survives
    assert relative_position((0, 0, 100, 100), (800, 300, 900, 400)) == {"left of"}


# --------------------------------------------------------------------------------------------------
# Each tag on hand-built layouts


def test_single_and_two_object():
    m = meta("two_object", {"class": "dog", "count": 1}, {"class": "bench", "count": 1})
    assert score_layout(lay(reg("dog", (0, 0, 400, 400)), reg("bench", (500, 0, 900, 400))), m).correct
    wrong = score_layout(lay(reg("cat", (0, 0, 400, 400)), reg("bench", (500, 0, 900, 400))), m)
    assert not wrong.correct and "dog" in wrong.reasons[0]
    # one dog too many: wrong under the plan contract (exact), fine under GenEval's own counting
    extra = lay(reg("dog", (0, 0, 300, 300)), reg("dog", (0, 500, 300, 800)), reg("bench", (500, 0, 900, 400)))
    assert not score_layout(extra, m).correct
    assert score_layout(extra, m, strict_count=False).correct


def test_counting_with_exclude():
    m = meta("counting", {"class": "apple", "count": 3}, exclude=[{"class": "apple", "count": 4}])
    three = [reg("apple", (i * 300, 0, i * 300 + 200, 200)) for i in range(3)]
    assert score_layout(lay(*three), m).correct
    four = [*three, reg("apple", (0, 500, 200, 700))]
    assert not score_layout(lay(*four), m).correct
    assert not score_layout(lay(*four), m, strict_count=False).correct   # the exclude entry catches it
    assert not score_layout(lay(*three[:2]), m, strict_count=False).correct


def test_labels_are_matched_singular_and_by_exact_synonym():
    m = meta("counting", {"class": "wine glass", "count": 2})
    layout = lay(reg("Wine Glasses", (0, 0, 200, 400)), reg("wine glass", (500, 0, 700, 400)))
    assert score_layout(layout, m).correct
    assert normalize_label("a Hair Dryer") == "hair drier"
    assert normalize_label("television") == "tv"
    assert normalize_label("mice") == "mouse"
    assert normalize_label("skis") == "skis"
    assert normalize_label("sofa") == "couch"
    assert normalize_label("man") == "man"          # no hypernyms: a man is not merged into "person"
    for name in geneval_object_names():
        assert normalize_label(name) == name


def test_colours():
    m = meta("colors", {"class": "car", "count": 1, "color": "red"})
    assert score_layout(lay(reg("car", (0, 0, 900, 500), "a shiny red car")), m).correct
    assert not score_layout(lay(reg("car", (0, 0, 900, 500), "a shiny blue car")), m).correct
    assert not score_layout(lay(reg("car", (0, 0, 900, 500), "a shiny car")), m).correct
    both = score_layout(lay(reg("car", (0, 0, 900, 500), "a red and white car")), m)
    assert not both.correct and "white" in both.reasons[0]
    # the class name itself is not a colour word
    fruit = meta("colors", {"class": "orange", "count": 1, "color": "orange"})
    assert score_layout(lay(reg("orange", (0, 0, 500, 500), "an orange orange")), fruit).correct
    assert not score_layout(lay(reg("orange", (0, 0, 500, 500), "a ripe orange")), fruit).correct
    yellow = meta("colors", {"class": "orange", "count": 1, "color": "yellow"})
    assert score_layout(lay(reg("orange", (0, 0, 500, 500), "a yellow orange")), yellow).correct


def test_colour_attribution_swapped_fails():
    m = meta("color_attr", {"class": "bus", "count": 1, "color": "green"},
             {"class": "microwave", "count": 1, "color": "purple"})
    right = lay(reg("bus", (0, 0, 500, 400), "a green bus"), reg("microwave", (600, 0, 900, 300), "a purple microwave"))
    swapped = lay(reg("bus", (0, 0, 500, 400), "a purple bus"),
                  reg("microwave", (600, 0, 900, 300), "a green microwave"))
    leaked = lay(reg("bus", (0, 0, 500, 400), "a green bus next to a purple microwave"),
                 reg("microwave", (600, 0, 900, 300), "a purple microwave"))
    assert score_layout(right, m).correct
    assert not score_layout(swapped, m).correct
    assert not score_layout(leaked, m).correct


def test_position():
    m = meta("position", {"class": "cup", "count": 1},
             {"class": "couch", "count": 1, "position": ["below", 0]})
    assert score_layout(lay(reg("cup", (400, 0, 600, 200)), reg("couch", (100, 500, 900, 900))), m).correct
    flipped = score_layout(lay(reg("cup", (400, 700, 600, 900)), reg("couch", (100, 0, 900, 400))), m)
    assert not flipped.correct and "not below" in flipped.reasons[0]
    # the target must itself have matched
    no_target = score_layout(lay(reg("mug", (400, 0, 600, 200)), reg("couch", (100, 500, 900, 900))), m)
    assert not no_target.correct and any("no matched target" in r for r in no_target.reasons)
    # every instance against every target instance
    m2 = meta("position", {"class": "castle", "count": 1},
              {"class": "star", "count": 2, "position": ["above", 0]})
    castle = reg("castle", (400, 600, 600, 900))
    good = lay(castle, reg("star", (350, 0, 450, 100)), reg("star", (550, 0, 650, 100)))
    one_off = lay(castle, reg("star", (350, 0, 450, 100)), reg("star", (900, 650, 990, 750)))
    assert score_layout(good, m2).correct
    assert not score_layout(one_off, m2).correct


def test_position_uses_canvas_pixels():
    m = meta("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]})
    boxes = (reg("cat", (600, 600, 700, 700)), reg("dog", (300, 300, 400, 400)))
    # the same layout units: a 45-degree diagonal on a square canvas, mostly horizontal on a wide one
    assert score_layout(lay(*boxes), m).correct
    assert not score_layout(lay(*boxes, width=2048, height=512), m).correct


def test_style_extension_and_invalid_layouts():
    m = meta("style", {"class": "girl", "count": 1, "style": "anime"})
    assert score_layout(lay(reg("girl", (0, 0, 500, 900), style="anime")), m).correct
    assert not score_layout(lay(reg("girl", (0, 0, 500, 900), style="photo")), m).correct
    bad = score_layout({"version": 1, "regions": [{"label": "girl", "box": "nope"}]}, m)
    assert not bad.correct and "invalid layout" in bad.reasons[0]


# --------------------------------------------------------------------------------------------------
# Aggregation, and wrong plans score zero on the whole benchmark


def test_overall_is_the_mean_of_tag_accuracies():
    good = lay(reg("dog", (0, 0, 400, 400)))
    bad = lay(reg("cat", (0, 0, 400, 400)))
    metas = [meta("single_object", {"class": "dog", "count": 1})] * 3 + [meta("counting", {"class": "dog", "count": 1})]
    report = score_layouts([good, good, bad, good], metas)
    assert report.per_tag == {"single_object": pytest.approx(2 / 3), "counting": 1.0}
    assert report.counts == {"single_object": (2, 3), "counting": (1, 1)}
    assert report.overall == pytest.approx((2 / 3 + 1.0) / 2)   # not 3/4, the mean over prompts
    assert [p.correct for p in report.prompts] == [True, True, False, True]
    with pytest.raises(ValueError, match="same order"):
        score_layouts([good], metas)


@pytest.fixture(scope="module")
def geneval_pairs():
    metas = load_metadata()
    return metas, [plan_offline(m["prompt"]) for m in metas]


def test_broken_plans_score_zero(geneval_pairs):
    metas, layouts = geneval_pairs
    def by_tag(tag):
        pairs = [(m, lt) for m, lt in zip(metas, layouts) if m["tag"] == tag]
        # the unbroken plans pass, so every drop below is the breakage's doing
        assert score_layouts([lt for _, lt in pairs], [m for m, _ in pairs]).overall == 1.0
        return pairs

    # no regions at all: nothing passes
    empty = score_layouts([lt.with_regions(()) for lt in layouts], metas)
    assert empty.overall == 0.0

    # mirrored boxes: every left/right/above/below relation is reversed
    def mirror(r):
        x1, y1, x2, y2 = r.box
        return Region(r.label, r.prompt, (1000 - x2, 1000 - y2, 1000 - x1, 1000 - y1), r.style)
    pos = by_tag("position")
    report = score_layouts([lt.with_regions([mirror(r) for r in lt.regions]) for _, lt in pos], [m for m, _ in pos])
    assert report.overall == 0.0

    # every colour word replaced by the next GenEval colour
    def recolour(r):
        def swap(mt):
            return GENEVAL_COLORS[(GENEVAL_COLORS.index(mt.group(0)) + 1) % len(GENEVAL_COLORS)]
        text = re.sub(r"\b(" + "|".join(GENEVAL_COLORS) + r")\b(?=.*\b" + re.escape(r.label) + r"\b)", swap, r.prompt)
        return Region(r.label, text, r.box, r.style)
    for tag in ("colors", "color_attr"):
        pairs = by_tag(tag)
        report = score_layouts([lt.with_regions([recolour(r) for r in lt.regions]) for _, lt in pairs],
                               [m for m, _ in pairs])
        assert report.overall == 0.0, tag

    # one instance short, or one too many
    count = by_tag("counting")
    short = score_layouts([lt.with_regions(lt.regions[1:]) for _, lt in count], [m for m, _ in count])
    extra = score_layouts([lt.with_regions(lt.regions + lt.regions[:1]) for _, lt in count], [m for m, _ in count])
    assert short.overall == 0.0 and extra.overall == 0.0

    # the right objects with wrong names
    objs = by_tag("single_object") + by_tag("two_object")
    renamed = [lt.with_regions([Region(r.label + " figurine", r.prompt, r.box, r.style) for r in lt.regions])
               for _, lt in objs]
    assert score_layouts(renamed, [m for m, _ in objs]).overall == 0.0


def test_shipped_metadata_is_geneval():
    metas = load_metadata()
    assert len(metas) == 553
    assert {m["tag"] for m in metas} == {"single_object", "two_object", "counting", "colors", "position",
                                         "color_attr"}
    assert len(geneval_object_names()) == 80
    assert (Path(GENEVAL_METADATA).parent / "LICENSE").read_text().startswith("MIT License")


# --------------------------------------------------------------------------------------------------
# Command line


def test_scoring_command_line(tmp_path, capsys, geneval_pairs):
    metas, layouts = geneval_pairs
    lay_file = tmp_path / "layouts.jsonl"
    lay_file.write_text("".join(json.dumps(lt.to_dict()) + "\n" for lt in layouts), encoding="utf-8")
    out_json = tmp_path / "report.json"
    assert scoring_main(["--layouts", str(lay_file), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "position" in printed
    report = json.loads(out_json.read_text())
    assert len(report["prompts"]) == 553 and report["overall"] >= 0.98

    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text(json.dumps(metas[0]) + "\n", encoding="utf-8")
    assert scoring_main(["--layouts", str(lay_file), "--metadata", str(meta_file)]) == 2
    assert "same order" in capsys.readouterr().err
