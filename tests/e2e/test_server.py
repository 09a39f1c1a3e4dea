"""The shipped API workflows queued over HTTP to a real ComfyUI server; images read back via /view."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from host import error_message
from mepg_testing import ROOT
from PIL import Image

WORKFLOWS = ROOT / "workflows"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def with_tiny_checkpoint(prompt: dict, ckpt: str) -> dict:
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt
    return prompt


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_object_info_lists_the_pack(server):
    info = server.get_json("/object_info")
    for node_id in ("MEPG_LayoutFromJSON", "MEPG_RegionMaskBuilder"):
        assert node_id in info
        assert info[node_id]["category"].startswith("MEPG")
    assert "MEPG_LAYOUT" in info["MEPG_RegionMaskBuilder"]["input"]["required"]["layout"][0]


def test_node_help_pages_are_served_where_the_frontend_looks(server):
    """The frontend fetches a custom node's help from /extensions/<pack folder>/docs/<node id>.md."""
    info = server.get_json("/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("MEPG_")}
    assert len(ours) >= 11
    for name, node in ours.items():
        pack_folder = node["python_module"].split(".")[-1]  # "custom_nodes.<folder>"
        page = server.get_bytes(f"/extensions/{pack_folder}/docs/{name}.md").decode("utf-8")
        assert page.splitlines()[0] == f"# {node['display_name']}", name


def test_layout_preview_workflow(server, artifacts_dir):
    entry = server.run(load("layout_preview_api.json"))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    images = dict()
    for node_id, data in server.images(entry):
        images.setdefault(node_id, []).append(png(data))
    preview = images["3"][0]
    assert preview.shape == (832, 1216, 3)
    masks = images["5"]
    assert len(masks) == 4
    # Each mask image is white exactly inside its region's pixel box.
    layout = json.loads(load("layout_preview_api.json")["1"]["inputs"]["json_text"])
    x1, y1, x2, y2 = layout["regions"][0]["box"]
    m = masks[0][..., 0] > 127
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min()) == (round(x1 * 1216 / 1000), round(y1 * 832 / 1000))
    Image.fromarray(preview).save(artifacts_dir / "e2e_layout_preview.png")


def test_regions_drive_a_tiny_sdxl_ksampler(server, tiny_checkpoints):
    prompt = with_tiny_checkpoint(load("regions_ksampler_api.json"), tiny_checkpoints["base"].name)
    prompt["3"]["inputs"].update(width=256, height=192)
    prompt["6"]["inputs"]["steps"] = 3
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    outputs = {node_id: png(data) for node_id, data in server.images(entry)}
    assert outputs["8"].shape == (192, 256, 3)
    assert outputs["9"].shape == (192, 256, 3)  # the preview follows the latent's size


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: "{ not json", "not valid JSON"),
    (lambda d: {**d, "version": 7}, "unsupported schema version 7"),
    (lambda d: {**d, "regions": [{**d["regions"][0], "box": [5, 5, 5, 9]}]}, "regions[0].box: zero area"),
    (lambda d: {**d, "regions": [{**d["regions"][0], "box": [0, 0, float("nan"), 9]}]}, "NaN"),
    (lambda d: {**d, "regions": [d["regions"][0]] * 65}, "at most 64"),
    (lambda d: {**d, "regions": [{**d["regions"][0], "label": "", "prompt": ""}]}, "regions[0]: label and prompt"),
    (lambda d: {**d, "canvas": {"width": 0, "height": 0}}, "canvas.width"),
])
def test_bad_layouts_fail_clearly_and_the_server_stays_up(server, mutate, expected):
    prompt = load("layout_preview_api.json")
    layout = json.loads(prompt["1"]["inputs"]["json_text"])
    bad = mutate(layout)
    prompt["1"]["inputs"]["json_text"] = bad if isinstance(bad, str) else json.dumps(bad)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    assert expected in (error_message(entry) or ""), error_message(entry)
    good = server.run(load("layout_preview_api.json"))
    assert good["status"]["status_str"] == "success"


def test_repairable_layout_runs_with_warnings(server):
    prompt = load("layout_preview_api.json")
    layout = json.loads(prompt["1"]["inputs"]["json_text"])
    layout["regions"][0]["box"] = [0.04, 0.06, 0.24, 0.9]  # 0-1 scale
    layout["regions"][1]["box"] = [620, 940, 300, 520]  # swapped
    prompt["1"]["inputs"]["json_text"] = json.dumps(layout)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
