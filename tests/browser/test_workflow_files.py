"""The shipped UI workflows in the real frontend: each opens, and the frontend's own API export of it
(``app.graphToPrompt()``, what "Queue" sends) equals the workflow's ``*_api.json`` twin."""

from __future__ import annotations

import json

import pytest
from mepg_testing import ROOT

WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
APP = "window.comfyAPI.app.app"


@pytest.fixture(scope="module")
def object_info(browser_server):
    return browser_server.get_json("/object_info", timeout=120)


def test_ui_workflows_export_their_api_twins(browser_server, page, object_info):
    page.goto(browser_server.url, wait_until="domcontentloaded")
    page.wait_for_function(f"() => !!window.LiteGraph?.registered_node_types?.MEPG_LLMLayoutPlanner "
                           f"&& {APP}?.graph?.nodes?.length > 0", timeout=60_000)
    for path in UI_FILES:
        ui = json.loads(path.read_text())
        api = json.loads((WORKFLOWS / path.name.replace(".json", "_api.json")).read_text())
        exported = page.evaluate(f"async wf => {{ await {APP}.loadGraphData(wf); "
                                 f"return (await {APP}.graphToPrompt()).output; }}", ui)
        assert set(exported) == set(api), path.name
        for node_id, node in api.items():
            got = exported[node_id]
            assert got["class_type"] == node["class_type"], f"{path.name} node {node_id}"
            known = set(object_info[node["class_type"]]["input"].get("required", {})) | set(
                object_info[node["class_type"]]["input"].get("optional", {}))
            # Frontend-only widgets (PreviewAny's 'preview' text box) are sent too; ComfyUI ignores them.
            inputs = {k: v for k, v in got["inputs"].items() if k in known}
            assert inputs == node["inputs"], f"{path.name} node {node_id} ({node['class_type']})"
