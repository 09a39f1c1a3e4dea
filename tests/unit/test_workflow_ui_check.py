"""tools/workflow_ui.check_ui: the one difference between hosts it lets through (outputs a newer ComfyUI added
to a core node, which the frontend adds on load) and the ones it must not."""

from __future__ import annotations

import copy

import workflow_ui

INFO = {
    "LoadThing": {"input": {"required": {"name": ["STRING", {}]}}, "input_order": {"required": ["name"]},
                  "output": ["IMAGE"], "output_name": ["IMAGE"], "python_module": "nodes"},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "input_order": {"required": ["images"]},
                  "output": [], "output_name": [], "python_module": "nodes", "output_node": True},
    "MEPG_Thing": {"input": {"required": {"images": ["IMAGE", {}]}}, "input_order": {"required": ["images"]},
                   "output": ["IMAGE"], "output_name": ["IMAGE"], "python_module": "custom_nodes.comfyui-mepg"},
}


def ui() -> dict:
    return {"version": 0.4, "last_node_id": 3, "last_link_id": 2, "links": [[1, 1, 0, 2, 0, "IMAGE"],
                                                                           [2, 1, 0, 3, 0, "IMAGE"]],
            "nodes": [
                {"id": 1, "type": "LoadThing", "pos": [0, 0], "size": [1, 1], "widgets_values": ["a"],
                 "inputs": [{"name": "name", "type": "STRING", "widget": {"name": "name"}, "link": None}],
                 "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1, 2]}]},
                {"id": 2, "type": "SaveImage", "pos": [0, 0], "size": [1, 1], "widgets_values": [],
                 "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": []},
                {"id": 3, "type": "MEPG_Thing", "pos": [0, 0], "size": [1, 1], "widgets_values": [],
                 "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
                 "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}]},
            ]}


def test_the_file_fits_the_host_it_was_written_from():
    assert workflow_ui.check_ui(ui(), INFO) == []


def test_an_output_a_newer_comfyui_added_to_a_core_node_is_tolerated():
    newer = copy.deepcopy(INFO)
    newer["SaveImage"]["output"] = ["IMAGE"]  # as 0.33 did
    assert workflow_ui.check_ui(ui(), newer) == []


def test_other_output_differences_fail():
    pack_added = copy.deepcopy(INFO)
    pack_added["MEPG_Thing"]["output"] = ["IMAGE", "MASK"]  # our own nodes must match exactly
    assert any("MEPG_Thing" in p and "outputs" in p for p in workflow_ui.check_ui(ui(), pack_added))
    core_lost = copy.deepcopy(INFO)
    core_lost["LoadThing"]["output"] = []  # an output the file uses is gone
    assert any("LoadThing" in p for p in workflow_ui.check_ui(ui(), core_lost))
    core_changed = copy.deepcopy(INFO)
    core_changed["LoadThing"]["output"] = ["LATENT", "IMAGE"]  # added in front: the listed ones moved
    assert any("output 0 is IMAGE" in p for p in workflow_ui.check_ui(ui(), core_changed))


def test_a_widget_that_became_a_socket_fails():
    socket_only = copy.deepcopy(INFO)
    socket_only["LoadThing"]["input"]["required"]["name"] = ["STRING", {"forceInput": True}]
    problems = workflow_ui.check_ui(ui(), socket_only)
    assert any("widget values" in p for p in problems)
