"""``make demo``: the full MEPG workflow, run headless in a real ComfyUI server on this machine.

It queues ``workflows/mepg_full_sdxl_experts_api.json`` (the workflow users open in the frontend) through
``POST /prompt``: the offline planner turns a rich example prompt with per-region styles into a layout,
Region Mask Builder makes the masks and region prompts, four SDXL experts are stacked behind gates
(Gated MoE Patch), and the Cross-Denoise KSampler denoises every region in its own window with its own
experts, then the whole picture.

Weights: no SDXL weights can ship with the pack, so by default the checkpoints are **seeded random-weight
SDXL-architecture models made on the fly** (tiny: the picture is noise by design; the layout, the masks and
the routing are real). ``CHECKPOINTS="base.safetensors expert1.safetensors ..."`` uses real checkpoints
instead: the first is the base (CLIP, VAE and every non-expert weight), the others are the experts (the
base alone when it is the only one). With real weights the workflow's own size and steps are used (1024x1024,
30 steps); ``DEMO_SIZE=768`` and ``DEMO_STEPS=20`` change them. The server runs on the CPU.

The routing report: two demo-only nodes (``tools/mepg_demo_probe``) are added around the sampler. They
observe the gated sites (``MoERuntime.observers``) and add up the expert weights each region's tokens
actually got, in its local window and in the global steps; they change nothing.

Output, in ``demo-output/``: ``image.png``, ``layout_preview.png`` (the boxes with label and style),
``layout_overlay.png`` (the boxes over the image), ``report.json`` (layout, plan trace, per-region
routing, checkpoints, timings) and ``comfyui.log``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from host import ComfyServer, error_message, free_port, prepare_base, stop_on_signals  # noqa: E402
from mepg_testing import FIXTURE_DIR, fixture_is_current, link_checkpoints  # noqa: E402

OUT = ROOT / "demo-output"
BASE = ROOT / ".host" / "demo-base"
WORKFLOW = ROOT / "workflows" / "mepg_full_sdxl_experts_api.json"
PROBE_DIR = ROOT / "tools" / "mepg_demo_probe"

# The tiny stand-ins: the workflow's four experts (realism_engine, realvis, anime, halcyon) in order.
TINY_EXPERTS = ("photo", "realvis", "anime", "watercolor")
TINY_SIZE, TINY_STEPS = 512, 8
OBSERVER_ID, REPORT_ID = "900", "901"

# Style tags for real checkpoints, guessed from their file names, in the planner's style words.
TAG_GUESSES = [
    (("real", "photo", "juggernaut", "lifelike", "cinematic", "halcyon"), "photo, realism, realistic"),
    (("anime", "animagine", "pony", "illustrious", "manga", "toon", "cartoon", "niji"), "anime, cartoon, manga"),
    (("watercolor", "watercolour", "paint", "oil"), "watercolor, oil painting, painting"),
    (("pixel",), "pixel art"),
    (("3d", "render", "pixar", "clay"), "3d render, clay"),
]


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def mount(link: Path, target: Path) -> None:
    """``custom_nodes/<name>`` -> ``target`` (a symlink, replaced if it points elsewhere)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def find_nodes(workflow: dict, class_type: str) -> list[str]:
    return sorted((nid for nid, n in workflow.items() if n["class_type"] == class_type), key=int)


def guess_tags(file_name: str) -> str:
    name = file_name.lower()
    return ", ".join(tags for words, tags in TAG_GUESSES if any(w in name for w in words))


def tiny_checkpoints() -> tuple[str, list[str]]:
    """Make (once) and link the seeded random-weight checkpoints; returns (base, experts) file names."""
    wanted = [FIXTURE_DIR / "tiny_sdxl_base.safetensors"] + [FIXTURE_DIR / f"tiny_sdxl_{n}.safetensors"
                                                             for n in TINY_EXPERTS]
    if not all(fixture_is_current(p) for p in wanted):
        log("making seeded random-weight SDXL-architecture checkpoints (no real weights ship with the pack) ...")
        # Expert seeds follow their position: photo, anime, watercolor first, as the tests make them.
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_models.py"), "--out", str(FIXTURE_DIR),
                        "--experts", "photo", "anime", "watercolor", "realvis"], check=True, cwd=ROOT)
    link_checkpoints(BASE, {p.stem: p for p in wanted})
    return wanted[0].name, [p.name for p in wanted[1:]]


def user_checkpoints(named: list[str]) -> tuple[str, list[str]]:
    paths = []
    for raw in named:
        path = Path(raw).expanduser().resolve()
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise SystemExit(f"CHECKPOINTS: {path} is not a .safetensors file")
        paths.append(path)
    link_checkpoints(BASE, {str(i): p for i, p in enumerate(paths)})
    experts = [p.name for p in paths[1:]] or [paths[0].name]
    return paths[0].name, experts


def set_experts(workflow: dict, files: list[str], real: bool) -> list[dict]:
    """Point the workflow's expert chain at ``files`` (one loader each, chained in order)."""
    loaders = find_nodes(workflow, "MEPG_ExpertStackLoader")
    template = workflow[loaders[0]]
    ends = {nid for nid in loaders if all(workflow[o]["inputs"].get("expert_stack") != [nid, 0] for o in loaders)}
    for nid in loaders:
        del workflow[nid]
    chain, previous = [], None
    for i, file_name in enumerate(files):
        nid = loaders[i] if i < len(loaders) else str(800 + i)
        node = json.loads(json.dumps(template))
        node["inputs"].pop("expert_stack", None)
        if not real:  # the tiny stand-ins keep the workflow's names and tags (realism_engine, realvis, ...)
            original = json.loads(WORKFLOW.read_text())[loaders[i]]["inputs"]
            node["inputs"].update(name=original["name"], style_tags=original["style_tags"])
        else:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(file_name).stem)
            node["inputs"].update(name=stem, style_tags=guess_tags(file_name))
        node["inputs"]["ckpt_name"] = file_name
        node["_meta"]["title"] = f"Expert: {node['inputs']['name']}"
        if previous:
            node["inputs"]["expert_stack"] = [previous, 0]
        workflow[nid] = node
        chain.append({"name": node["inputs"]["name"], "file": file_name,
                      "style_tags": node["inputs"]["style_tags"] or "(guessed by the node from the file name)"})
        previous = nid
    for node in workflow.values():  # whatever took the old chain's end (the patch, the editor) takes the new one
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in ends and node["class_type"] != \
                    "MEPG_ExpertStackLoader":
                node["inputs"][name] = [previous, 0]
    return chain


def set_size(workflow: dict, size: int, steps: int) -> None:
    for cls in ("EmptyLatentImage", "MEPG_RegionMaskBuilder", "MEPG_LLMLayoutPlanner"):
        for nid in find_nodes(workflow, cls):
            workflow[nid]["inputs"].update(width=size, height=size)
    for nid in find_nodes(workflow, "MEPG_CrossDenoiseKSampler"):
        workflow[nid]["inputs"]["steps"] = steps


def add_probe(workflow: dict) -> None:
    """The demo-only routing observer between the MoE patch and the sampler, and its report after it."""
    sampler = find_nodes(workflow, "MEPG_CrossDenoiseKSampler")[0]
    model = workflow[sampler]["inputs"]["model"]
    workflow[OBSERVER_ID] = {"class_type": "MEPGDemo_RoutingObserver", "_meta": {"title": "Routing observer (demo)"},
                             "inputs": {"model": model}}
    workflow[sampler]["inputs"]["model"] = [OBSERVER_ID, 0]
    workflow[REPORT_ID] = {"class_type": "MEPGDemo_RoutingReport", "_meta": {"title": "Routing report (demo)"},
                           "inputs": {"model": [OBSERVER_ID, 0], "samples": [sampler, 0],
                                      "regions": workflow[sampler]["inputs"]["regions"]}}


def texts(entry: dict) -> dict[str, str]:
    return {nid: out["text"][0] for nid, out in entry.get("outputs", {}).items() if out.get("text")}


def execution_seconds(entry: dict) -> float | None:
    stamps = {event: data.get("timestamp") for event, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        return round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 2)
    return None


def routing_table(routing: dict) -> list[str]:
    lines = []
    for region in routing["regions"]:
        local = region["local_steps"] or {}
        weights = ", ".join(f"{k} {v:.2f}" for k, v in local.items())
        lines.append(f"  {region['index']}. {region['label']:<16} style={str(region['style']):<13} {weights}")
    return lines


def main() -> int:
    stop_on_signals()  # SIGTERM/SIGHUP unwind like Ctrl-C: the server below and any child are stopped
    started = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    prepare_base(BASE, with_tiny_models=True)
    mount(BASE / "custom_nodes" / "mepg_demo_probe", PROBE_DIR)
    timings: dict[str, float] = {}

    named = os.environ.get("CHECKPOINTS", "").split()
    real = bool(named)
    t = time.perf_counter()
    base, experts = user_checkpoints(named) if real else tiny_checkpoints()
    timings["checkpoints"] = round(time.perf_counter() - t, 2)

    workflow = json.loads(WORKFLOW.read_text())
    for nid in find_nodes(workflow, "CheckpointLoaderSimple"):
        workflow[nid]["inputs"]["ckpt_name"] = base
    chain = set_experts(workflow, experts, real)
    if real:
        size, steps = int(os.environ.get("DEMO_SIZE", 1024)), int(os.environ.get("DEMO_STEPS", 30))
    else:
        size, steps = int(os.environ.get("DEMO_SIZE", TINY_SIZE)), int(os.environ.get("DEMO_STEPS", TINY_STEPS))
    set_size(workflow, size, steps)
    add_probe(workflow)
    planner = find_nodes(workflow, "MEPG_LLMLayoutPlanner")[0]
    prompt_node = workflow[planner]["inputs"]["prompt"][0]
    sampler = workflow[find_nodes(workflow, "MEPG_CrossDenoiseKSampler")[0]]["inputs"]

    if real:
        log(f"real checkpoints: base {base}; experts {', '.join(experts)}")
    else:
        log("NO REAL WEIGHTS: the base and the four experts are seeded RANDOM-WEIGHT SDXL-architecture models made "
            "on the fly,")
        log("standing in for realismEngineSDXL v3, RealVisXL v5, an SDXL anime model and halcyon SDXL. The image "
            "will be noise; the layout, masks and routing are real.")
    log(f"prompt: {workflow[prompt_node]['inputs']['value']}")
    log("starting ComfyUI (CPU, 127.0.0.1) with the pack mounted ...")
    t = time.perf_counter()
    with ComfyServer(port=free_port(), base=BASE, log_path=OUT / "comfyui.log") as server:
        timings["server_start"] = round(time.perf_counter() - t, 2)
        log(f"queueing workflows/{WORKFLOW.name} ({size}x{size}, {steps} steps, {len(chain)} experts) ...")
        t = time.perf_counter()
        status, body = server.queue(workflow)
        if status != 200 or body.get("node_errors"):
            log(f"the server refused the workflow (HTTP {status}): {json.dumps(body)[:2000]}")
            return 1
        entry = server.wait(body["prompt_id"], timeout=6 * 3600)
        timings["workflow_wall"] = round(time.perf_counter() - t, 2)
        timings["workflow_execution"] = execution_seconds(entry)
        if entry["status"]["status_str"] != "success":
            log(f"the workflow failed: {error_message(entry)} (see demo-output/comfyui.log)")
            return 1
        written = []
        for node_id, data in server.images(entry):
            prefix = workflow.get(node_id, {}).get("inputs", {}).get("filename_prefix", "")
            stem = {"mepg/full": "image", "mepg/layout_preview": "layout_preview",
                    "mepg/layout_overlay": "layout_overlay"}.get(prefix, f"node{node_id}")
            path = OUT / f"{stem}.png"
            path.write_bytes(data)
            written.append(path)
        outputs = texts(entry)
    timings["total"] = round(time.perf_counter() - started, 2)

    # The layout as used: the 'Layout JSON' output (the editor's layout_json; the planner's without an editor).
    layout_sources = [[nid, 1] for nid in find_nodes(workflow, "MEPG_LayoutEditor")] + [[planner, 1]]
    layout_node = next(nid for source in layout_sources for nid in find_nodes(workflow, "PreviewAny")
                       if workflow[nid]["inputs"]["source"] == source)
    trace_node = next(nid for nid in find_nodes(workflow, "PreviewAny")
                      if workflow[nid]["inputs"]["source"] == [planner, 2])
    routing = json.loads(outputs[REPORT_ID])
    report = {
        "workflow": f"workflows/{WORKFLOW.name}",
        "real_weights": real,
        "weights_note": None if real else (
            "seeded random-weight SDXL-architecture checkpoints made on the fly (tools/make_tiny_models.py): "
            "the image is noise by design; layout, masks and routing are computed for real"),
        "checkpoints": {"base": base, "experts": chain},
        "prompt": workflow[prompt_node]["inputs"]["value"],
        "planner_backend": workflow[planner]["inputs"]["backend"],
        "size": [size, size], "steps": steps, "seed": sampler["seed"], "p1": sampler["p1"],
        "gate_mode": workflow[find_nodes(workflow, "MEPG_GatedMoEPatch")[0]]["inputs"]["gate_mode"],
        "layout": json.loads(outputs[layout_node]),
        "plan_trace": outputs[trace_node],
        "routing": {
            "how": "mean mixing weight of each expert over the tokens of each region, observed at every gated "
                   "spatial site (self-attention q/k/v, cross-attention q, feed-forward) while sampling: "
                   "'local_steps' in the region's own window, 'global_steps_inside_region' in global steps",
            **routing,
        },
        "timings_s": timings,
        "outputs": [p.name for p in written],
    }
    report_path = OUT / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")

    print()
    log("layout (offline planner) and the experts each region actually used in its local steps:")
    for line in routing_table(routing):
        print(line)
    print()
    log(f"timings: {json.dumps(timings)}")
    log("outputs:")
    for path in [*written, report_path, OUT / "comfyui.log"]:
        print(f"  {path.relative_to(ROOT)}")
    if not real:
        print()
        log("NOTE: image.png is noise by design: it was sampled with seeded RANDOM-WEIGHT SDXL-architecture "
            "checkpoints made on the fly,")
        log("as no SDXL weights can ship with the pack. For a real picture, use real checkpoints (first = base, "
            "then the experts):")
        log('  make demo CHECKPOINTS="sd_xl_base_1.0.safetensors realismEngineSDXL_v30VAE.safetensors '
            'animagineXLV31_v31.safetensors"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
