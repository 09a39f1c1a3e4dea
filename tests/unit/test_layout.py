"""The layout model: JSON round trip, validation with paths, repairs with warnings, coordinates."""

from __future__ import annotations

import json

import pytest

from mepg_core.layout import (
    MAX_REGIONS,
    Canvas,
    Layout,
    LayoutError,
    Region,
    box_to_grid,
    latent_size,
    parse_layout,
)


def doc(*regions, **top):
    base = {"version": 1, "canvas": {"width": 1024, "height": 1024}, "global_prompt": "a room",
            "negative_prompt": "", "regions": list(regions)}
    base.update(top)
    return base


def reg(box=(100, 100, 400, 400), label="cat", prompt="a grey cat", **kw):
    return {"label": label, "prompt": prompt, "box": list(box), "style": None, "expert": None, "weight": 1.0, **kw}


def problems(source) -> list[str]:
    with pytest.raises(LayoutError) as info:
        parse_layout(source)
    return info.value.problems


def test_round_trip_is_lossless():
    src = doc(reg(), reg((500, 0, 1000, 1000), "tree", "a tall pine tree", style="watercolor", expert="anime",
                         weight=0.5))
    layout, warnings = parse_layout(json.dumps(src))
    assert warnings == []
    assert json.loads(layout.to_json()) == src
    again, _ = parse_layout(layout.to_json())
    assert again == layout


def test_dataclass_fields_match_schema():
    layout, _ = parse_layout(doc(reg(style="photo")))
    r = layout.regions[0]
    assert r == Region("cat", "a grey cat", (100, 100, 400, 400), "photo", None, 1.0)
    assert layout.canvas == Canvas(1024, 1024)
    assert layout.version == 1


@pytest.mark.parametrize("text,fragment", [
    ("", "empty text"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"version": 1, "regions": [{"label": "a", "prompt": "b", "box": [NaN, 0, 5, 5]}]}', "NaN"),
])
def test_malformed_text_is_an_error(text, fragment):
    assert any(fragment in p for p in problems(text))


def test_unknown_version_is_an_error():
    assert problems(doc(reg(), version=2)) == ["version: unsupported schema version 2 (this pack reads version 1)"]


def test_every_problem_is_reported_with_its_path():
    bad = doc(reg(box=(1, 2, "x", 4)), reg(box=(10, 10, 10, 50)), reg(label="", prompt=""),
              reg(weight=float("inf")), canvas={"width": 0, "height": 512})
    found = problems(bad)
    assert "canvas.width: must be a positive integer, got 0" in found
    assert "regions[0].box: x2 is not a number ('x')" in found
    assert "regions[1].box: zero area (x1 == x2) in [10, 10, 10, 50]" in found
    assert "regions[2]: label and prompt are both empty" in found
    assert any(p.startswith("regions[3].weight: must be a finite number") for p in found)


def test_too_many_regions():
    many = doc(*[reg() for _ in range(MAX_REGIONS + 1)])
    assert problems(many) == [f"regions: {MAX_REGIONS + 1} regions; at most {MAX_REGIONS} are allowed"]
    layout, _ = parse_layout(doc(*[reg() for _ in range(MAX_REGIONS)]))
    assert len(layout.regions) == MAX_REGIONS


def test_no_regions_is_an_error_only_when_required():
    assert problems(doc()) == ["regions: no regions; a layout needs at least one"]
    layout, _ = parse_layout(doc(), require_regions=False)
    assert layout.regions == ()


def test_zero_size_canvas():
    found = problems(doc(reg(), canvas={"width": 5, "height": -3}))
    assert "canvas.height: must be a positive integer, got -3" in found


@pytest.mark.parametrize("box,expected,fragment", [
    ([1200, 100, 1100, 900], None, None),  # handled below (pixels)
    ([-20, 50, 400, 1010], [0, 50, 400, 1000], "clamped"),
    ([400, 500, 100, 200], [100, 200, 400, 500], "corners swapped"),
    ([0.1, 0.25, 0.5, 0.75], [100, 250, 500, 750], "0-1 scale"),
    ([100.4, 200.6, 300, 400], [100, 201, 300, 400], "rounded"),
])
def test_repairs_warn(box, expected, fragment):
    if expected is None:
        return
    layout, warnings = parse_layout(doc(reg(box=box)))
    assert list(layout.regions[0].box) == expected
    assert any(w.startswith("regions[0].box") and fragment in w for w in warnings), warnings


def test_pixel_boxes_are_rescaled_by_canvas():
    layout, warnings = parse_layout(doc(reg(box=[0, 416, 832, 1216]), canvas={"width": 832, "height": 1216}))
    assert layout.regions[0].box == (0, 342, 1000, 1000)
    assert any("looks like pixels" in w for w in warnings)


def test_empty_label_or_prompt_is_repaired_from_the_other():
    layout, warnings = parse_layout(doc(reg(label="", prompt="a red bicycle leaning"), reg(label="dog", prompt="")))
    assert layout.regions[0].label == "a red bicycle"
    assert layout.regions[1].prompt == "dog"
    assert {w.split(":")[0] for w in warnings} == {"regions[0].label", "regions[1].prompt"}


def test_unknown_keys_and_missing_fields_warn():
    layout, warnings = parse_layout({"regions": [reg(colour="red")], "extra": 1})
    assert layout.canvas == Canvas(1024, 1024)
    assert "extra: unknown key ignored" in warnings
    assert "regions[0].colour: unknown key ignored" in warnings
    assert "version: missing; assumed 1" in warnings


def test_text_is_data_never_code():
    hostile = "__import__('os').system('echo pwned')"
    layout, _ = parse_layout(doc(reg(prompt=hostile, label="x")))
    assert layout.regions[0].prompt == hostile


def test_long_prompt_warns_about_clip():
    layout, warnings = parse_layout(doc(reg(prompt="word " * 80)))
    assert any("CLIP" in w for w in warnings)


def test_latent_size_floors_like_comfyui():
    assert latent_size(1000, 600) == (125, 75)
    assert latent_size(832, 1216) == (104, 152)
    with pytest.raises(ValueError):
        latent_size(4, 600)


@pytest.mark.parametrize("size", [(1024, 1024), (832, 1216), (1000, 600), (125, 75), (13, 7)])
def test_shared_edges_tile_every_grid(size):
    w, h = size
    xs = [0, 130, 333, 500, 777, 1000]
    ys = [0, 250, 600, 1000]
    covered = [[0] * w for _ in range(h)]
    for x1, x2 in zip(xs, xs[1:]):
        for y1, y2 in zip(ys, ys[1:]):
            gx1, gy1, gx2, gy2 = box_to_grid((x1, y1, x2, y2), w, h)
            for y in range(gy1, gy2):
                for x in range(gx1, gx2):
                    covered[y][x] += 1
    assert all(c == 1 for row in covered for c in row)


def test_box_to_grid_rounds_each_edge():
    assert box_to_grid((0, 0, 1000, 1000), 832, 1216) == (0, 0, 832, 1216)
    assert box_to_grid((250, 500, 750, 1000), 1000, 600) == (250, 300, 750, 600)
    assert box_to_grid((1, 1, 2, 2), 125, 75) == (0, 0, 1, 1)  # never empty


def test_layout_pixel_and_latent_boxes():
    layout = Layout("x", (Region("a", "a", (100, 200, 600, 900)),))
    assert layout.pixel_boxes(1000, 600) == [(100, 120, 600, 540)]
    assert layout.latent_boxes(1000, 600) == [(13, 15, 75, 68)]


HUGE = 10**400


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d["regions"][0].update(box=[HUGE, 0, 5, 5]), "regions[0].box: x1 is far out of range (an integer "
                                                            "with 401 digits)"),
    (lambda d: d["regions"][0].update(box=[0, 0, 5, -HUGE]), "regions[0].box: y2 is far out of range (a negative "
                                                             "integer with 401 digits)"),
    (lambda d: d["regions"][0].update(box=[0, 0, 5, 1e300]), "regions[0].box: y2 is far out of range"),
    (lambda d: d["regions"][0].update(weight=HUGE), "regions[0].weight: an integer with 401 digits is outside"),
    (lambda d: d["canvas"].update(width=HUGE), "canvas.width: an integer with 401 digits exceeds the maximum 16384"),
    (lambda d: d["canvas"].update(height=-HUGE), "canvas.height: must be a positive integer, got a negative integer"),
    (lambda d: d["canvas"].update(height=1e300), "canvas.height: 1e+300 exceeds the maximum"),
    (lambda d: d["regions"][0].update(box=[[[[0]]]] * 4), "regions[0].box: x1 is not a number ([[[0]]])"),
    (lambda d: d["regions"][0].update(box=list(range(10**5))), "regions[0].box: expected 4 numbers [x1, y1, x2, y2], "
                                                               "got [0, 1, 2, 3"),
])
def test_absurd_numbers_and_shapes_are_errors_naming_the_field(mutate, problem):
    d = doc(reg())
    mutate(d)
    for source in (d, json.dumps(d)):
        with pytest.raises(LayoutError) as info:
            parse_layout(source)
        assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
        assert all(len(p) < 300 for p in info.value.problems)


@pytest.mark.parametrize("depth", [40, 1500, 100_000])
def test_deep_nesting_is_an_error_not_a_recursion_error(depth):
    deep = "[" * depth + "]" * depth
    with pytest.raises(LayoutError, match=r"\$: nested more than 32 levels deep"):
        parse_layout(deep)
    text = json.dumps(doc(reg())).replace('"style": null', f'"style": {deep}')
    with pytest.raises(LayoutError, match="nested more than 32 levels deep"):
        parse_layout(text)
    nested: list = []
    for _ in range(min(depth, 5000)):
        nested = [nested]
    with pytest.raises(LayoutError, match="nested more than 32 levels deep"):
        parse_layout(doc(reg(style=nested)))
