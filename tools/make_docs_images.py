"""Make the README's pictures in ``docs/``.

    python tools/make_docs_images.py [--demo-output demo-output]

- ``docs/workflow_full.png``: the full workflow (``workflows/mepg_full_sdxl_experts.json``) as the ComfyUI
  frontend draws it: a real server of this checkout, Debian's Chromium through Playwright (headless, no
  network besides the loopback server), the workflow loaded and the view fitted to its nodes.
- ``docs/layout_preview.png``: the layout overlay ``make demo`` wrote (run it first): the offline planner's
  boxes for the demo prompt, with label and style, as Region Mask Builder draws them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from host import ComfyServer, free_port, prepare_base  # noqa: E402

DOCS = ROOT / "docs"
WORKFLOW = ROOT / "workflows" / "mepg_full_sdxl_experts.json"
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = (3000, 1500)
CHROME = (70, 130)  # left side bar, top banner + tabs (CSS px) the graph must not hide under
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def fit_script() -> str:
    """JS: scale and move the canvas so every node (and the note) is in view, with a margin."""
    return """() => {
        const app = window.comfyAPI.app.app, canvas = app.canvas, nodes = app.graph.nodes;
        let x1 = Infinity, y1 = Infinity, x2 = -Infinity, y2 = -Infinity;
        for (const n of nodes) {
            x1 = Math.min(x1, n.pos[0]); y1 = Math.min(y1, n.pos[1] - 30);
            x2 = Math.max(x2, n.pos[0] + n.size[0]); y2 = Math.max(y2, n.pos[1] + n.size[1]);
        }
        const el = canvas.canvas, margin = 20, left = LEFT + margin, top = TOP + margin;
        const scale = Math.min((el.clientWidth - left - margin) / (x2 - x1),
                               (el.clientHeight - top - margin) / (y2 - y1));
        canvas.low_quality_zoom_threshold = 0;  // draw titles and widgets at any zoom
        if (window.LiteGraph?.Canvas) window.LiteGraph.Canvas.low_quality_zoom_threshold = 0;
        canvas.ds.scale = scale;
        canvas.ds.offset = [left / scale - x1, top / scale - y1];
        canvas.setDirty(true, true);
        return [left - margin, top - margin, left + (x2 - x1) * scale + margin, top + (y2 - y1) * scale + margin];
    }""".replace("LEFT", str(CHROME[0])).replace("TOP", str(CHROME[1]))


def screenshot_workflow(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    base = prepare_base(ROOT / ".host" / "docs-base", with_tiny_models=False)
    with ComfyServer(port=free_port(), base=base, log_path=ROOT / "test-artifacts" / "docs-server.log") as server:
        for key, value in SETTINGS.items():
            request = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=30).close()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                               "--disable-component-update", "--no-first-run", "--disable-sync"])
            page = browser.new_page(viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]}, device_scale_factor=1)
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph?.nodes?.length > 0", timeout=120_000)
            page.keyboard.press("Escape")
            page.evaluate("async wf => { await window.comfyAPI.app.app.loadGraphData(wf); }",
                          json.loads(WORKFLOW.read_text()))
            page.wait_for_timeout(1500)
            for setting in ("LiteGraph.Canvas.LowQualityRenderingZoomThreshold",):
                page.evaluate(f"() => window.comfyAPI.app.app.extensionManager?.setting?.set('{setting}', 0.1)")
            box = page.evaluate(fit_script())
            page.wait_for_timeout(1000)
            page.evaluate(fit_script())  # again, after a setting change may have redrawn
            page.wait_for_timeout(1000)
            x1, y1, x2, y2 = (int(v) for v in box)
            page.screenshot(path=str(out), clip={"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1})
            browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-output", type=Path, default=ROOT / "demo-output")
    a = ap.parse_args()
    DOCS.mkdir(exist_ok=True)
    preview = a.demo_output / "layout_preview.png"
    if not preview.exists():
        print(f"{preview} is missing: run `make demo` first", file=sys.stderr)
        return 1
    shutil.copyfile(preview, DOCS / "layout_preview.png")
    screenshot_workflow(DOCS / "workflow_full.png")
    for name in ("layout_preview.png", "workflow_full.png"):
        print(DOCS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
