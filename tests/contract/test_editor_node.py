"""LayoutEditor inside real ComfyUI: which layout it uses, its errors, and the planner -> editor -> masks trip."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from mepg_testing import ROOT

from mepg_core.editor_state import layout_hash, make_state
from mepg_core.layout import parse_layout

NODE = "MEPG_LayoutEditor"
LAYOUT = {
    "version": 1, "canvas": {"width": 1024, "height": 768}, "global_prompt": "a reading room at dusk",
    "negative_prompt": "",
    "regions": [
        {"label": "window", "prompt": "a tall arched window", "box": [60, 80, 380, 760], "style": "photo"},
        {"label": "bookshelf", "prompt": "a wooden bookshelf", "box": [560, 120, 960, 940], "style": "watercolor"},
    ],
}
MASK_ARGS = {"width": 1024, "height": 768, "feather_px": 0, "overlap": "smaller_on_top", "global_weight": 0.5}


def source(comfy, layout: dict = LAYOUT):
    return comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]


def swapped_state(src) -> str:
    d = src.to_dict()
    d["regions"][0]["box"], d["regions"][1]["box"] = d["regions"][1]["box"], d["regions"][0]["box"]
    return make_state(parse_layout(d)[0], layout_hash(src))


def edit(comfy, **kw):
    out = comfy.node(NODE).execute(**kw)
    return out.args[0], out.args[1], out.ui["mepg_layout_editor"][0]


def stack(comfy, tiny_checkpoints, *names):
    s = None
    for name in names:
        s = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints[name].name, name, "", s).args[0]
    return s


def test_edits_made_on_the_current_input_are_used(comfy):
    src = source(comfy)
    layout, layout_json, ui = edit(comfy, layout=src, editor_state=swapped_state(src))
    assert ui["used"] == "edited" and ui["source_hash"] == layout_hash(src)
    assert layout.regions[0].label == "window" and layout.regions[0].box == (560, 120, 960, 940)
    assert json.loads(layout_json) == layout.to_dict() == ui["layout"]


def test_a_changed_input_is_used_and_sent_to_the_editor(comfy):
    src = source(comfy)
    state = swapped_state(src)
    changed = json.loads(json.dumps(LAYOUT))
    changed["regions"].append({"label": "lamp", "prompt": "a brass lamp", "box": [400, 300, 520, 600]})
    new_src = source(comfy, changed)
    layout, _, ui = edit(comfy, layout=new_src, editor_state=state)
    assert ui["used"] == "input" and layout == new_src
    assert ui["source_hash"] == layout_hash(new_src) and len(ui["layout"]["regions"]) == 3
    # What the editor then holds (the new plan, same hash) is used on the next run, edits included.
    follow = json.loads(make_state(new_src, ui["source_hash"]))
    follow["layout"]["regions"][2]["box"] = [10, 10, 100, 100]
    layout, _, ui = edit(comfy, layout=new_src, editor_state=json.dumps(follow))
    assert ui["used"] == "edited" and layout.regions[2].box == (10, 10, 100, 100)


def test_empty_state_takes_the_input_and_no_input_takes_the_state(comfy):
    src = source(comfy)
    layout, _, ui = edit(comfy, layout=src, editor_state="")
    assert ui["used"] == "input" and layout == src
    layout, _, ui = edit(comfy, editor_state=json.dumps(LAYOUT))
    assert ui["used"] == "edited" and layout == src and ui["source_hash"] is None
    with pytest.raises(ValueError, match="(?s)MEPG Layout Editor: nothing to edit.*editor_state: empty and no layout"):
        edit(comfy, editor_state="")


@pytest.mark.parametrize("mutate,match", [
    (lambda s: "{not json", r"editor_state: not valid JSON"),
    (lambda s: json.dumps({**s, "version": 3}), r"editor_state\.version: must be 1"),
    (lambda s: json.dumps({**s, "layout": {**s["layout"], "regions": [
        {**s["layout"]["regions"][0], "box": [100, 5, 100, 9]}]}}), r"editor_state\.layout\.regions\[0\]\.box: zero"),
    (lambda s: json.dumps({**s, "layout": {**s["layout"], "regions": [
        {**s["layout"]["regions"][0], "label": "", "prompt": ""}]}}), r"editor_state\.layout\.regions\[0\]: label"),
    (lambda s: json.dumps({**s, "layout": {**s["layout"], "canvas": {"width": -1, "height": 5}}}),
     r"editor_state\.layout\.canvas\.width"),
])
def test_bad_state_is_a_clear_error_naming_the_field(comfy, mutate, match):
    src = source(comfy)
    bad = mutate(json.loads(swapped_state(src)))
    with pytest.raises(ValueError, match=match):
        edit(comfy, layout=src, editor_state=bad)


def test_region_experts_must_be_in_the_connected_stack(comfy, tiny_checkpoints):
    src = source(comfy)
    experts = stack(comfy, tiny_checkpoints, "photo", "anime")
    state = json.loads(swapped_state(src))
    state["layout"]["regions"][0]["expert"] = "anime"
    state["layout"]["regions"][1]["expert"] = "base"
    layout, _, ui = edit(comfy, layout=src, editor_state=json.dumps(state), expert_stack=experts)
    assert [r.expert for r in layout.regions] == ["anime", "base"] and ui["experts"] == ["photo", "anime"]
    state["layout"]["regions"][1]["expert"] = "watercolor"
    with pytest.raises(ValueError, match=r"regions\[1\]\.expert: 'watercolor' is not in the connected expert stack "
                                         r"\(choose one of: base, photo, anime"):
        edit(comfy, layout=src, editor_state=json.dumps(state), expert_stack=experts)


def test_swapping_two_boxes_swaps_where_they_are_denoised(comfy):
    """Figure 7 of the paper: swap the window and the bookshelf; their masks and boxes trade places."""
    src = source(comfy)
    before = comfy.node("MEPG_RegionMaskBuilder").execute(src, **MASK_ARGS).args
    edited = edit(comfy, layout=src, editor_state=swapped_state(src))[0]
    after = comfy.node("MEPG_RegionMaskBuilder").execute(edited, **MASK_ARGS).args
    (regions_b, _, masks_b, bg_b, _), (regions_a, _, masks_a, bg_a, _) = before, after
    assert [s.label for s in regions_a.regions] == ["window", "bookshelf"]
    assert regions_a.regions[0].pixel_box == regions_b.regions[1].pixel_box
    assert regions_a.regions[1].latent_box == regions_b.regions[0].latent_box
    assert torch.equal(masks_a[0], masks_b[1]) and torch.equal(masks_a[1], masks_b[0])
    assert torch.equal(regions_a.regions[0].latent_mask, regions_b.regions[1].latent_mask)
    assert torch.equal(bg_a, bg_b)


def test_planner_editor_mask_builder_graph(comfy):
    """Through ComfyUI's validation and executor: the edited boxes reach RegionMaskBuilder."""
    planner = comfy.node("MEPG_LLMLayoutPlanner")
    inputs = {name: spec[1].get("default") for kind in ("required", "optional")
              for name, spec in planner.INPUT_TYPES().get(kind, {}).items() if isinstance(spec[1], dict)
              and "default" in spec[1]}
    inputs.update(prompt="a dog left of a red car", width=1024, height=768, backend="offline")
    planned = comfy.run({
        "plan": {"class_type": "MEPG_LLMLayoutPlanner", "inputs": inputs},
        "edit": {"class_type": NODE, "inputs": {"layout": ["plan", 0], "editor_state": ""}},
        "masks": {"class_type": "MEPG_RegionMaskBuilder", "inputs": {"layout": ["edit", 0], **MASK_ARGS}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["masks", 4]}},
    })
    first = planned["outputs"]["edit"]["mepg_layout_editor"][0]
    assert first["used"] == "input" and len(first["layout"]["regions"]) == 2
    # The browser would now hold the plan; swap its two boxes as a user would and run again.
    state = {"version": 1, "source_hash": first["source_hash"], "layout": first["layout"]}
    r0, r1 = state["layout"]["regions"]
    r0["box"], r1["box"] = r1["box"], r0["box"]
    second = comfy.run({
        "plan": {"class_type": "MEPG_LLMLayoutPlanner", "inputs": inputs},
        "edit": {"class_type": NODE, "inputs": {"layout": ["plan", 0], "editor_state": json.dumps(state)}},
        "masks": {"class_type": "MEPG_RegionMaskBuilder", "inputs": {"layout": ["edit", 0], **MASK_ARGS}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["masks", 4]}},
    })
    used = second["outputs"]["edit"]["mepg_layout_editor"][0]
    assert used["used"] == "edited" and used["layout"]["regions"][0]["box"] == r0["box"]
    assert "show" in second["outputs"]


def test_the_shipped_api_workflow_runs_with_its_edits(comfy, tiny_checkpoints):
    prompt = json.loads((ROOT / "workflows" / "layout_editor_api.json").read_text())
    names = iter([tiny_checkpoints["photo"].name, tiny_checkpoints["anime"].name])
    for node in prompt.values():
        if node["class_type"] == "MEPG_ExpertStackLoader":
            node["inputs"]["ckpt_name"] = next(names)
    history = comfy.run(prompt)
    ui = history["outputs"]["4"]["mepg_layout_editor"][0]
    plan = json.loads(prompt["1"]["inputs"]["json_text"])
    assert ui["used"] == "edited", "the shipped editor_state must be based on the shipped input layout"
    assert [r["box"] for r in ui["layout"]["regions"]] == [plan["regions"][1]["box"], plan["regions"][0]["box"]]
    assert ui["layout"]["regions"][0]["expert"] == "photo"
    assert "6" in history["outputs"]


def test_the_ui_workflow_matches_its_api_twin():
    ui = json.loads((ROOT / "workflows" / "layout_editor.json").read_text())
    api = json.loads((ROOT / "workflows" / "layout_editor_api.json").read_text())
    editor = next(n for n in ui["nodes"] if n["type"] == NODE)
    assert editor["widgets_values"] == [api["4"]["inputs"]["editor_state"]]
    source_node = next(n for n in ui["nodes"] if n["type"] == "MEPG_LayoutFromJSON")
    assert source_node["widgets_values"] == [api["1"]["inputs"]["json_text"]]


def test_routes_are_registered_only_with_a_server(comfy, monkeypatch):
    import inprocess

    routes_mod = inprocess.pack_module("nodes.routes")
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes_mod.register_routes() is False
    from aiohttp import web

    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {})
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes_mod.register_routes() is False  # no instance yet
    fake.PromptServer.instance = types.SimpleNamespace(routes=web.RouteTableDef())
    assert routes_mod.register_routes() is True and routes_mod.register_routes() is True
    paths = sorted((r.method, r.path) for r in fake.PromptServer.instance.routes)
    assert paths == [("GET", "/mepg/experts"), ("POST", "/mepg/plan"), ("POST", "/mepg/validate")]
