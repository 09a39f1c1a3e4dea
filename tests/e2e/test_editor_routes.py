"""The layout editor's /mepg/ routes on a real ComfyUI server: answers, validation, size limits."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mepg_core.editor_state import layout_hash
from mepg_core.layout import parse_layout

LAYOUT = {
    "version": 1, "canvas": {"width": 1024, "height": 768}, "global_prompt": "a reading room",
    "regions": [{"label": "window", "prompt": "a tall window", "box": [60, 80, 380, 760], "style": "photo"}],
}


def post_raw(server, path: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_plan_gives_a_valid_layout(server, prefix):
    status, body = server.post_json(f"{prefix}/mepg/plan", {"prompt": "a red apple left of a blue cup",
                                                             "width": 1216, "height": 832, "max_regions": 4})
    assert status == 200, body
    layout, warnings = parse_layout(body["layout"])
    assert warnings == [] and layout.canvas.width == 1216 and {r.label for r in layout.regions} == {"apple", "cup"}
    assert body["source_hash"] == layout_hash(layout)


@pytest.mark.parametrize("body,status,match", [
    ({}, 400, "prompt: must be a string"),
    ({"prompt": "   "}, 400, "prompt: empty"),
    ({"prompt": "x" * 2001}, 400, "prompt: 2001 characters; at most 2000"),
    ({"prompt": "a cat", "width": 10}, 400, "width: must be an integer in [64, 16384]"),
    ({"prompt": "a cat", "max_regions": 0}, 400, "max_regions"),
    ({"prompt": "a cat", "height": "tall"}, 400, "height"),
    ({"prompt": "a cat", "exec": "rm -rf /"}, 400, "exec: unknown key"),
])
def test_plan_rejects_bad_requests_clearly(server, body, status, match):
    got, answer = server.post_json("/mepg/plan", body)
    assert got == status and match in answer["error"], answer


def test_bodies_are_size_limited_and_must_be_json_objects(server):
    assert post_raw(server, "/mepg/plan", b"{not json")[0] == 400
    assert post_raw(server, "/mepg/plan", b"[1, 2]")[1]["error"].startswith("body: expected a JSON object")
    big = json.dumps({"prompt": "a cat", "pad": "x" * 70_000}).encode()
    status, body = post_raw(server, "/mepg/plan", big)
    assert status == 413 and "at most 65536" in body["error"]
    status, body = post_raw(server, "/mepg/validate", json.dumps({"layout": "x" * 600_000}).encode())
    assert status == 413


def test_validate_normalises_and_reports_paths(server):
    repaired = json.loads(json.dumps(LAYOUT))
    repaired["regions"][0]["box"] = [380, 760, 60, 80]
    status, body = server.post_json("/mepg/validate", {"layout": repaired})
    assert status == 200 and body["ok"] and body["layout"]["regions"][0]["box"] == [60, 80, 380, 760]
    assert any(w.startswith("regions[0].box: corners swapped") for w in body["warnings"])
    assert body["source_hash"] == layout_hash(parse_layout(LAYOUT)[0])

    bad = json.loads(json.dumps(LAYOUT))
    bad["regions"][0]["box"] = [5, 5, 5, 9]
    status, body = server.post_json("/mepg/validate", {"layout": json.dumps(bad)})
    assert status == 200 and not body["ok"] and body["errors"][0].startswith("regions[0].box: zero area")

    named = json.loads(json.dumps(LAYOUT))
    named["regions"][0]["expert"] = "oil"
    status, body = server.post_json("/mepg/validate", {"layout": named, "experts": ["photo", "anime"]})
    assert not body["ok"] and body["errors"][0].startswith("regions[0].expert: 'oil' is not in the connected")
    assert server.post_json("/mepg/validate", {"nolayout": 1})[0] == 400


def test_experts_follow_the_loaders_naming_rule(server, tiny_checkpoints):
    stack = [{"kind": "checkpoint", "file": tiny_checkpoints["photo"].name, "name": "photo"},
             {"kind": "checkpoint", "file": tiny_checkpoints["anime"].name, "name": ""},
             {"kind": "lora", "file": "missing.safetensors", "name": "Photo"}]
    status, body = get(server, "/mepg/experts?" + urllib.parse.urlencode({"stack": json.dumps(stack)}))
    assert status == 200, body
    assert body["names"] == ["base", "photo", "tiny_sdxl_anime"]
    assert any("missing.safetensors" in p for p in body["problems"])
    assert any("'Photo' is already in the stack" in p for p in body["problems"])
    assert tiny_checkpoints["base"].name in body["available"]["checkpoints"]
    assert get(server, "/mepg/experts")[1]["names"] == ["base"]


@pytest.mark.parametrize("query,match", [
    ("stack=%7Bnope", "stack: not valid JSON"),
    ("stack=" + urllib.parse.quote(json.dumps([{"kind": "vae", "file": "a"}])), "stack[0].kind"),
    ("stack=" + urllib.parse.quote(json.dumps([{"kind": "lora"}] * 33)), "at most 32"),
    ("stack=" + "x" * 7000, "at most 6000"),
])
def test_experts_rejects_bad_queries(server, query, match):
    status, body = get(server, f"/mepg/experts?{query}")
    assert status == 400 and match in body["error"], body
