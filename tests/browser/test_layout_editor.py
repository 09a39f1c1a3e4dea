"""The layout editor in the real ComfyUI frontend, driven by Chromium: drag, choose an expert, queue, read /history."""

from __future__ import annotations

import copy
import json
import time

from mepg_testing import ROOT

from mepg_core.editor_state import layout_hash
from mepg_core.layout import parse_layout

WORKFLOW = ROOT / "workflows" / "layout_editor.json"
EDITOR = "MEPG_LayoutEditor"
XSS = "<img src=x onerror=alert(1)>"
XSS_FLAG = "<img src=x onerror=window.__mepgXss=1>"
APP = "window.comfyAPI.app.app"
READY_TIMEOUT_MS = 60_000


def shipped_workflow(tiny_checkpoints) -> dict:
    wf = json.loads(WORKFLOW.read_text())
    for node in wf["nodes"]:
        if node["type"] == "MEPG_ExpertStackLoader":  # the tiny fixtures stand in for the users' checkpoints
            node["widgets_values"][0] = tiny_checkpoints[node["widgets_values"][1]].name
    return wf


def open_workflow(page, server, wf: dict, dialogs: list) -> None:
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url, wait_until="domcontentloaded")
    # The app is ready when our node type is registered and the start-up workflow is on the canvas
    # (loading ours earlier would race with it).
    page.wait_for_function(
        f"() => !!window.LiteGraph?.registered_node_types?.{EDITOR} && {APP}?.graph?.nodes?.length > 0",
        timeout=READY_TIMEOUT_MS)
    page.evaluate(f"async wf => {{ await {APP}.loadGraphData(wf); }}", wf)
    page.wait_for_selector("canvas.mepg-le-canvas", state="visible")
    page.wait_for_function(f"() => {APP}.graph.nodes.some(n => n.type === '{EDITOR}' && n.mepgEditor)")
    # The expert names come from /mepg/experts for the two loaders upstream.
    page.wait_for_selector("select.mepg-le-expert option[value='anime']", state="attached")


def editor_state(page) -> dict:
    text = page.evaluate(f"""() => {APP}.graph.nodes.find(n => n.type === '{EDITOR}')
        .widgets.find(w => w.name === 'editor_state').value""")
    return json.loads(text)


def canvas_point(page, box, fx=0.5, fy=0.5) -> tuple[float, float]:
    """Page coordinates of the point (fx, fy) inside a layout box (0-1000 units)."""
    r = page.locator("canvas.mepg-le-canvas").bounding_box()
    x1, y1, x2, y2 = box
    return (r["x"] + (x1 + (x2 - x1) * fx) * r["width"] / 1000, r["y"] + (y1 + (y2 - y1) * fy) * r["height"] / 1000)


def wait_history(server, editor_state_text: str, known: set, timeout: float = 60.0) -> dict:
    """The finished /history entry of a prompt queued after ``known`` ids, whose editor ran ``editor_state_text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for prompt_id, entry in server.get_json("/history").items():
            node = entry["prompt"][2].get("4", {})
            if prompt_id not in known and node.get("inputs", {}).get("editor_state") == editor_state_text and \
                    entry.get("status", {}).get("completed") is not None:
                return entry
        time.sleep(0.25)
    raise TimeoutError("the queued prompt did not finish")


def queue_and_wait(page, server) -> dict:
    """Queue the graph the way the Run button does (app.queuePrompt) and wait for its /history entry."""
    known = set(server.get_json("/history"))
    state_text = page.evaluate(f"""() => {APP}.graph.nodes.find(n => n.type === '{EDITOR}')
        .widgets.find(w => w.name === 'editor_state').value""")
    page.evaluate(f"async () => {{ await {APP}.queuePrompt(0, 1); }}")
    entry = wait_history(server, state_text, known)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def test_drag_a_box_pick_an_expert_queue_and_read_history(browser_server, page, tiny_checkpoints, artifacts_dir):
    dialogs: list[str] = []
    open_workflow(page, browser_server, shipped_workflow(tiny_checkpoints), dialogs)
    before = editor_state(page)
    window, shelf = before["layout"]["regions"]
    assert window["label"] == "window" and shelf["label"] == "bookshelf"

    # Drag the window's box with the mouse: 120 px left, 40 px up.
    r = page.locator("canvas.mepg-le-canvas").bounding_box()
    sx, sy = canvas_point(page, window["box"])
    page.mouse.move(sx, sy)
    page.mouse.down()
    page.mouse.move(sx - 60, sy - 20, steps=5)
    page.mouse.move(sx - 120, sy - 40, steps=5)
    page.mouse.up()
    moved = editor_state(page)["layout"]["regions"][0]["box"]
    dx, dy = round(-120 * 1000 / r["width"]), round(-40 * 1000 / r["height"])
    expected = [window["box"][0] + dx, window["box"][1] + dy, window["box"][2] + dx, window["box"][3] + dy]
    assert all(abs(a - b) <= 2 for a, b in zip(moved, expected)), (moved, expected)
    assert moved[2] - moved[0] == window["box"][2] - window["box"][0]  # a move keeps the size

    # Keyboard: Shift+Right nudges by 10 units; Ctrl+Z undoes it (and only it: the graph stays).
    page.keyboard.press("Shift+ArrowRight")
    assert editor_state(page)["layout"]["regions"][0]["box"][0] == moved[0] + 10
    n_nodes = page.evaluate(f"() => {APP}.graph.nodes.length")
    page.keyboard.press("Control+z")
    assert editor_state(page)["layout"]["regions"][0]["box"] == moved
    page.wait_for_timeout(300)  # ComfyUI's graph undo would act on the next animation frame
    assert editor_state(page)["layout"]["regions"][0]["box"] == moved
    assert page.evaluate(f"() => {APP}.graph.nodes.length") == n_nodes

    # Select the bookshelf by clicking its box, then choose the anime expert for it.
    page.mouse.click(*canvas_point(page, shelf["box"], 0.3, 0.5))
    assert page.locator("input.mepg-le-label").input_value() == "bookshelf"
    page.select_option("select.mepg-le-expert", "anime")
    state = editor_state(page)
    assert state["layout"]["regions"][1]["expert"] == "anime"
    assert state["source_hash"] == before["source_hash"]

    # Queue through the frontend, as the Run button does, and read what ran from /history.
    entry = queue_and_wait(page, browser_server)
    ran = json.loads(entry["prompt"][2]["4"]["inputs"]["editor_state"])
    assert ran["layout"]["regions"][0]["box"] == moved and ran["layout"]["regions"][1]["expert"] == "anime"
    ui = entry["outputs"]["4"]["mepg_layout_editor"][0]
    assert ui["used"] == "edited"
    assert ui["layout"]["regions"][0]["box"] == moved and ui["layout"]["regions"][1]["expert"] == "anime"
    assert ui["experts"] == ["photo", "anime"]
    assert entry["outputs"]["6"]["images"], "the preview of the edited boxes was not made"

    # The preview image arrives in the page; keep a screenshot of the editor and the result.
    page.wait_for_selector("text=Ran with your edits")
    # The frontend decodes it into the Preview Image node's ``imgs`` (drawn on the canvas); a DOM <img>
    # appears only where a panel shows it too, so either one counts as arrived and decoded.
    page.wait_for_function(f"""() => {{
        const loaded = i => i && i.src.includes('/view?') && i.complete && i.naturalWidth > 0;
        const node = {APP}.graph.getNodeById(6);
        return (node?.imgs ?? []).some(loaded) || [...document.images].some(loaded);
    }}""")
    page.screenshot(path=str(artifacts_dir / "browser_layout_editor.png"))
    assert dialogs == []


def test_user_text_is_shown_as_text(browser_server, page, tiny_checkpoints, artifacts_dir):
    wf = shipped_workflow(tiny_checkpoints)
    editor = next(n for n in wf["nodes"] if n["type"] == EDITOR)
    state = json.loads(editor["widgets_values"][0])
    state["layout"]["regions"][1]["label"] = XSS_FLAG  # arrives through the saved workflow
    editor["widgets_values"][0] = json.dumps(state)
    dialogs: list[str] = []
    open_workflow(page, browser_server, copy.deepcopy(wf), dialogs)

    # ... and through the form: type the prompt of the first region.
    page.locator(".mepg-le-list li").first.click()
    page.locator("textarea.mepg-le-prompt").fill(XSS)
    assert editor_state(page)["layout"]["regions"][0]["prompt"] == XSS
    items = page.locator(".mepg-le-list li").all_text_contents()
    assert XSS in items[0] and XSS_FLAG in items[1]
    assert page.locator("textarea.mepg-le-prompt").input_value() == XSS
    assert page.locator(".mepg-le img").count() == 0
    page.wait_for_timeout(500)  # time for an injected image to fail to load and fire onerror
    assert page.evaluate("() => window.__mepgXss === undefined")
    assert dialogs == []
    page.screenshot(path=str(artifacts_dir / "browser_layout_editor_text.png"))


def set_layout_json(page, layout: dict) -> None:
    page.evaluate(f"""text => {{ const n = {APP}.graph.nodes.find(n => n.type === 'MEPG_LayoutFromJSON');
        n.widgets.find(w => w.name === 'json_text').value = text; }}""", json.dumps(layout, indent=2))


def test_a_changed_input_layout_reaches_the_editor(browser_server, page, tiny_checkpoints):
    open_workflow(page, browser_server, shipped_workflow(tiny_checkpoints), [])
    plan = json.loads(next(n for n in shipped_workflow(tiny_checkpoints)["nodes"]
                           if n["type"] == "MEPG_LayoutFromJSON")["widgets_values"][0])

    # 1. "Load input" reads the connected Layout from JSON through /mepg/validate: edits on it are used.
    plan["regions"].append({"label": "lamp", "prompt": "a brass lamp", "box": [420, 300, 540, 700]})
    set_layout_json(page, plan)
    page.click("button[data-action='load']")
    page.wait_for_function(f"""() => JSON.parse({APP}.graph.nodes.find(n => n.type === '{EDITOR}')
        .widgets.find(w => w.name === 'editor_state').value).layout.regions.length === 3""")
    state = editor_state(page)
    assert state["source_hash"] == layout_hash(parse_layout(plan)[0])
    page.locator(".mepg-le-list li").nth(2).click()
    page.keyboard.press("ArrowDown")
    entry = queue_and_wait(page, browser_server)
    ui = entry["outputs"]["4"]["mepg_layout_editor"][0]
    assert ui["used"] == "edited" and ui["layout"]["regions"][2]["box"] == [420, 301, 540, 701]

    # 2. Change the input again and queue: the node uses the new layout and the editor takes it over.
    plan["regions"].pop()
    plan["global_prompt"] = "a library at night"
    set_layout_json(page, plan)
    entry = queue_and_wait(page, browser_server)
    ui = entry["outputs"]["4"]["mepg_layout_editor"][0]
    assert ui["used"] == "input" and ui["layout"]["global_prompt"] == "a library at night"
    page.wait_for_selector("text=The input layout changed")
    state = editor_state(page)
    assert state["source_hash"] == ui["source_hash"] and state["layout"] == ui["layout"]
    assert page.locator("input.mepg-le-global").input_value() == "a library at night"
