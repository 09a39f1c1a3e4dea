"""The shipped UI workflows in the real frontend of this host (1.32.9 with ComfyUI 0.3.75, 1.49.6 with 0.33):
each opens with every node type known and no warning, the frontend's own API export of it
(``app.graphToPrompt()``, what "Queue" sends) equals the workflow's ``*_api.json`` twin, and that export,
on the tiny fixtures, is accepted when queued and runs."""

from __future__ import annotations

import json
import re

import pytest
from host import error_message
from mepg_testing import GATE_DATASET, ROOT, link_checkpoints, tiny_files_of, tiny_workflow, write_gate_dataset

WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
APP = "window.comfyAPI.app.app"
# What a frontend says when a workflow does not fit the nodes it has (missing types, widget values it
# cannot place); any console warning or error while a shipped workflow loads fails the test anyway.
TROUBLE = re.compile(r"missing|mismatch|not found|unknown|undefined|failed|error", re.I)


def offline_fetch(text: str, url: str, server_url: str) -> bool:
    """A resource the frontend itself fetches from the internet (1.49.6 at start-up: api.comfy.org's release
    check, the model URLs of its default graph); this machine has no internet, which says nothing about the
    workflow. Failures of requests to the server still count."""
    return text.startswith("Failed to load resource") and bool(url) and not url.startswith(server_url)


@pytest.fixture(scope="module")
def object_info(browser_server):
    return browser_server.get_json("/object_info", timeout=120)


@pytest.fixture(scope="module")
def tiny_files(browser_server, tiny_checkpoints, tiny_extras):
    link_checkpoints(browser_server.base, {"lora": tiny_extras["lora"]}, folder="loras")
    write_gate_dataset(browser_server.base)
    return tiny_files_of(tiny_checkpoints, tiny_extras)


@pytest.fixture(scope="module")
def opened(browser_server, chromium):
    """The frontend, ready (our node types registered, its start-up graph drawn), and the console
    messages it logs from then on."""
    context = chromium.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(browser_server.url, wait_until="domcontentloaded")
    page.wait_for_function(f"() => !!window.LiteGraph?.registered_node_types?.MEPG_LLMLayoutPlanner "
                           f"&& {APP}?.graph?.nodes?.length > 0", timeout=60_000)
    console: list[tuple[str, str, str]] = []
    page.on("console", lambda m: console.append((m.type, m.text, (m.location or {}).get("url", ""))))
    page.on("pageerror", lambda e: console.append(("pageerror", str(e), "")))
    try:
        yield page, console
    finally:
        context.close()


def load(page, ui: dict) -> dict:
    """Load ``ui`` like File > Open does; return what the frontend then has and would send."""
    return page.evaluate(
        f"""async wf => {{
            const app = {APP};
            await app.loadGraphData(wf);
            const known = window.LiteGraph.registered_node_types;
            return {{
                missing: app.graph.nodes.filter(n => !known[n.type]).map(n => n.type),
                nodes: app.graph.nodes.length,
                output: (await app.graphToPrompt()).output,
            }};
        }}""", ui)


@pytest.mark.parametrize("path", UI_FILES, ids=[p.name for p in UI_FILES])
def test_ui_workflow_opens_cleanly_exports_its_api_twin_and_runs(browser_server, opened, object_info, path,
                                                                 tiny_files):
    page, console = opened
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / path.name.replace(".json", "_api.json")).read_text())
    console.clear()
    got = load(page, ui)
    assert got["missing"] == [], f"{path.name}: node types the frontend does not know: {got['missing']}"
    assert got["nodes"] == len(ui["nodes"]), path.name
    troubles = [f"{kind}: {text} ({url})" for kind, text, url in console
                if (kind in ("warning", "error", "pageerror") or TROUBLE.search(text))
                and not offline_fetch(text, url, browser_server.url)]
    assert troubles == [], f"{path.name} while loading:\n" + "\n".join(troubles)

    exported = got["output"]
    assert set(exported) == set(api), path.name
    for node_id, node in api.items():
        sent = exported[node_id]
        assert sent["class_type"] == node["class_type"], f"{path.name} node {node_id}"
        spec = object_info[node["class_type"]]["input"]
        known = set(spec.get("required", {})) | set(spec.get("optional", {}))
        # Frontend-only widgets (PreviewAny's 'preview' text box) are sent too; ComfyUI ignores them.
        inputs = {k: v for k, v in sent["inputs"].items() if k in known}
        assert inputs == node["inputs"], f"{path.name} node {node_id} ({node['class_type']})"

    # Queue what the frontend sends, on the tiny fixtures (the shipped file names are placeholders).
    prompt = tiny_workflow(exported, tiny_files, max_side=64, steps=1, dataset=GATE_DATASET)
    entry = browser_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", f"{path.name}: {error_message(entry)}"
