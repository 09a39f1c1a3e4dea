"""Write the UI-format twin of each API workflow in ``workflows/`` (the frontend's workflow JSON, version 0.4).

    python tools/workflow_ui.py                       # starts a ComfyUI server of this checkout for /object_info
    python tools/workflow_ui.py --server http://127.0.0.1:8188 [--check] [NAME_api.json ...]

The API files (``workflows/*_api.json``, what ``POST /prompt`` takes) are the sources. Each becomes
``workflows/NAME.json``, which the ComfyUI frontend opens: nodes with id/type/pos/size/inputs/outputs/
widgets_values, links ``[id, from_node, from_slot, to_node, to_slot, type]``, plus a Note node explaining
which checkpoints the paper used and where model files go.

The widget order comes from the live server's ``/object_info`` (``input_order``), with the frontend's rules:
every INT/FLOAT/STRING/BOOLEAN/COMBO input is a widget (unless ``forceInput``), and an INT input with
``control_after_generate`` (or, when the spec does not say, one named ``seed`` / ``noise_seed``) is followed
by the value of its "control after generate" widget ("fixed" here, so shipped workflows are repeatable).
``--check`` rewrites nothing and exits 1 if a UI file differs from what would be written.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

# The ComfyUI version whose /object_info the UI files are written from: the oldest the CI runs, so older
# frontends read them as written and newer ones only add slots (see check_ui).
WRITTEN_FROM = (0, 3, 75)

# Nodes that exist only in the frontend (not in /object_info, never in API files).
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUE = "fixed"

NODE_WIDTH = 340
WIDE_NODE_WIDTH = 420
ROW_GAP = 40
TITLE_H = 30
SLOT_H = 22
WIDGET_H = 24
MULTILINE_H = 120
NOTE_SIZE = (420, 560)
COLUMN_GAP = 60
# Nodes whose frontend widgets need more room than their inputs suggest (the layout editor's canvas).
SIZE_HINTS = {"MEPG_LayoutEditor": (560, 700)}
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"

# --------------------------------------------------------------------------------------------------
# Notes shown in the UI workflows

_WHERE_FILES_GO = """Where files go (inside your ComfyUI folder):
- models/checkpoints: the base SDXL checkpoint and every expert checkpoint (.safetensors)
- models/loras: style LoRAs used as experts (.safetensors)
- models/LLM: planner LLMs for the 'transformers' backend (a model folder or a .gguf); planner LoRA
  adapters in models/LLM/adapters
- models/mepg_gates: trained gate files (.safetensors) for Gated MoE Patch, gate_mode 'trained'
Press R (or refresh the page) after adding files so the lists update."""

_PAPER_EXPERTS = """The paper's experts (MEPG) were four SDXL checkpoints:
- realismEngineSDXL v3        (here: realismEngineSDXL_v30VAE.safetensors)
- RealVisXL v5                (here: realvisxlV50_v50Bakedvae.safetensors)
- an SDXL anime model         (the paper does not name it; here: animagineXLV31_v31.safetensors)
- halcyon SDXL (photorealism) (here: halcyonSDXL_v17.safetensors)
The file names in this workflow are placeholders: pick your own files in each loader. Any SDXL
fine-tunes work; the more their styles differ, the more the routing matters."""

_ROUTING = """How regions find their expert: each Expert Stack Loader has a name and style tags. A region whose
'style' matches a tag (photo, anime, watercolor, oil painting, ...; synonyms such as photorealistic and
realism count) is denoised by the experts with that tag; a region whose 'expert' names one is forced to
it; anything else follows the gate (uniform unless you load trained gates). Nothing is downloaded:
without the files the run stops with the missing name."""

NOTES: dict[str, str] = {
    "mepg_full_sdxl_experts": "\n\n".join([
        """MEPG, the full method: one prompt -> LLM Layout Planner (boxes + a style per object) -> Region Mask
Builder -> four SDXL experts behind gates (Gated MoE Patch) -> Cross-Denoise KSampler (each region denoised
in its own window by its own expert for the first p1 of the steps, then the whole picture).

The planner runs offline (rule-based, no model) by default; switch 'backend' to transformers (a local LLM
in models/LLM) or openai (Ollama, llama.cpp, vLLM, ...) for the LLM chain of thought. The Prompt node feeds
both the planner and the global conditioning. 'Layout JSON' and 'Plan trace' show what was planned.""",
        _PAPER_EXPERTS, _ROUTING, _WHERE_FILES_GO]),
    "mepg_layout_from_json": "\n\n".join([
        """MEPG without an LLM: paste or edit a layout (schema version 1) in 'Layout from JSON'. Boxes are
x1, y1, x2, y2 in 0-1000 canvas units; 'style' picks experts by tag, 'expert' forces one by name (here the
canoe uses realvis and the eagle halcyon). Keep the 'Global prompt' text equal to the layout's
global_prompt. Repairable problems (0-1 boxes, swapped corners) are listed in 'Repairs (warnings)'.""",
        _PAPER_EXPERTS, _ROUTING, _WHERE_FILES_GO]),
    "mepg_lora_experts": "\n\n".join([
        """MEPG with cheap experts: one base SDXL checkpoint plus style LoRAs, each LoRA Expert Loader making
one expert (the base weights + that LoRA at the attention and feed-forward sites). include_base keeps the
plain base as expert 'base' for regions with no matching style. The LoRA file names are placeholders:
put SDXL style LoRAs in models/loras and pick them in the loaders, with style tags that match the
planner's styles (anime, watercolor, oil painting, photo, sketch, pixel art, 3d render, ...).""",
        """The paper's experts were full SDXL checkpoints (realismEngineSDXL v3, RealVisXL v5, an SDXL anime
model, halcyon SDXL); see workflow mepg_full_sdxl_experts for that set-up.""",
        _ROUTING, _WHERE_FILES_GO]),
    "mepg_gate_training": "\n\n".join([
        """MEPG stage 2: train only the gates of a frozen expert stack (experts and base stay as they are) with
the model's own denoising loss, save them to models/mepg_gates, then load them in Gated MoE Patch with
gate_mode 'trained' in the other workflows. A gate file belongs to the exact expert stack (names and
weights) it was trained on: keep the same loaders, in the same order.

Data: a folder inside ComfyUI/input (here input/mepg_gate_dataset) with images and a caption file of the
same name beside each (cat.png + cat.txt), the layout other trainers use; kohya-style 'N_name'
sub-folders repeat their images N times. The paper trained on a large aesthetic image-caption set in many
styles; the more styles, the more the gates have to learn. Steps, learning rate and the ε-greedy share are
on Train MoE Gate; 'Plot Loss Graph' draws the loss. Long runs on a GPU: scripts/train_gates.py.""",
        _PAPER_EXPERTS, _WHERE_FILES_GO]),
    "layout_preview": """A layout without any model: Layout from JSON -> Region Mask Builder -> the boxes drawn
with label and style, and one mask per region. Edit the JSON and queue again.""",
    "regions_ksampler": "\n\n".join([
        """Region conditioning for ComfyUI's ordinary KSampler: Region Mask Builder encodes each region's prompt
(plus its style) on its mask and the global prompt on the background. One SDXL checkpoint, no experts.""",
        _WHERE_FILES_GO]),
}

# --------------------------------------------------------------------------------------------------
# /object_info helpers (shared with the workflow tests)


def fetch_object_info(server: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.loads(r.read())


def input_specs(info: dict) -> list[dict]:
    """A node's inputs in the frontend's order: ``[{name, type, options, required}]`` (hidden inputs left out)."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            io_type = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(io_type, list):  # the V1 way of writing a combo: the options list itself
                io_type, options = "COMBO", {**options, "options": io_type}
            out.append({"name": name, "type": io_type, "options": options, "required": section == "required"})
    return out


def is_widget(spec: dict) -> bool:
    return spec["type"] in WIDGET_TYPES and not spec["options"].get("forceInput")


def has_control_widget(spec: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this one (ComfyUI_frontend 1.32:
    ``control_after_generate ?? name in ('seed', 'noise_seed')`` for INT; only an explicit flag for COMBO)."""
    flag = spec["options"].get("control_after_generate")
    if spec["type"] == "INT":
        return bool(flag) if flag is not None else spec["name"] in SEED_NAMES
    return spec["type"] == "COMBO" and bool(flag)


def widget_value_count(info: dict) -> int:
    """How many ``widgets_values`` a node of this type has in a UI workflow."""
    return sum(1 + has_control_widget(s) for s in input_specs(info) if is_widget(s))


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --------------------------------------------------------------------------------------------------
# Validation against /object_info (used by tests/e2e/test_workflows.py)

FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".gguf", ".bin")
FOLDER_INPUTS = ("folder",)  # combos listing the user's folders (e.g. a data set under ComfyUI/input)


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def _check_value(where: str, spec: dict, value) -> list[str]:
    kind, options = spec["type"], spec["options"]
    if kind == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "BOOLEAN":
        ok = isinstance(value, bool)
    elif kind == "STRING":
        ok = isinstance(value, str)
    elif kind == "COMBO":
        choices = options.get("options", [])
        is_file = isinstance(value, str) and (value.lower().endswith(FILE_SUFFIXES) or spec["name"] in FOLDER_INPUTS)
        # File and folder names are placeholders for the user's own; anything else must be a choice.
        ok = is_file or value in choices
        if not ok:
            return [f"{where}: {value!r} is not one of {choices[:12]}"]
        return []
    else:
        return [f"{where}: a {kind} input must be a link, got {value!r}"]
    if not ok:
        return [f"{where}: {value!r} is not a {kind}"]
    problems = []
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            problems.append(f"{where}: {value} < min {options['min']}")
        if "max" in options and value > options["max"]:
            problems.append(f"{where}: {value} > max {options['max']}")
    return problems


def check_api(api: dict, object_info: dict) -> list[str]:
    """Everything about an API workflow that ``/object_info`` can tell: node types, input names, required
    inputs, literal values, links (target node, output slot, types). Returns the problems found."""
    problems = []
    if not isinstance(api, dict) or not api:
        return ["not an API workflow (a JSON object of nodes)"]
    for node_id, node in api.items():
        cls = node.get("class_type")
        if cls not in object_info:
            problems.append(f"node {node_id}: unknown node type {cls!r}")
            continue
        specs = {s["name"]: s for s in input_specs(object_info[cls])}
        inputs = node.get("inputs", {})
        for name in inputs:
            if name not in specs:
                problems.append(f"node {node_id} ({cls}): unknown input {name!r}")
        for name, spec in specs.items():
            where = f"node {node_id} ({cls}).{name}"
            if name not in inputs:
                if spec["required"]:
                    problems.append(f"{where}: required input missing")
                continue
            value = inputs[name]
            if is_link(value):
                src, slot = value
                if src not in api or api[src].get("class_type") not in object_info:
                    problems.append(f"{where}: links to missing or unknown node {src}")
                    continue
                outputs = object_info[api[src]["class_type"]]["output"]
                if slot >= len(outputs):
                    problems.append(f"{where}: node {src} has no output {slot}")
                elif not types_match(outputs[slot], spec["type"]):
                    problems.append(f"{where}: gets {outputs[slot]} from node {src}, wants {spec['type']}")
            else:
                problems += _check_value(where, spec, value)
    if not any(object_info.get(n.get("class_type"), {}).get("output_node") for n in api.values()):
        problems.append("no output node (nothing would run)")
    try:
        _depths(api)
    except (ValueError, KeyError) as exc:
        problems.append(str(exc))
    return problems


def is_core_node(info: dict) -> bool:
    """Whether a node comes with ComfyUI itself (not from a custom node pack, this one included)."""
    return not str(info.get("python_module", "")).startswith("custom_nodes")


def check_ui(ui: dict, object_info: dict) -> list[str]:
    """A UI workflow against ``/object_info``: node types, input names, required sockets linked, widget
    counts, and links consistent at both ends. Returns the problems found.

    The one difference tolerated is the one the frontend reconciles on load: a core node with more outputs
    than the file lists (a newer ComfyUI added them at the end, as 0.33 did to SaveImage/PreviewImage); the
    listed ones must still match. The files are written from the oldest supported host (:data:`WRITTEN_FROM`)."""
    problems = []
    if ui.get("version") != 0.4:
        problems.append(f"version {ui.get('version')!r}, expected 0.4")
    nodes = {}
    for node in ui.get("nodes", []):
        if node["id"] in nodes:
            problems.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values"):
            if key not in node:
                problems.append(f"node {node.get('id')}: no {key!r}")
    if nodes and ui.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is below the largest node id")
    links = {}
    for link in ui.get("links", []):
        if len(link) != 6:
            problems.append(f"link {link}: expected [id, from, from_slot, to, to_slot, type]")
            continue
        links[link[0]] = link
    if links and ui.get("last_link_id", 0) < max(links):
        problems.append("last_link_id is below the largest link id")

    for node in nodes.values():
        cls, where = node["type"], f"node {node['id']} ({node['type']})"
        if cls in FRONTEND_ONLY:
            if cls in ("Note", "MarkdownNote") and len(node.get("widgets_values", [])) != 1:
                problems.append(f"{where}: a note has one widget value (its text)")
            continue
        if cls not in object_info:
            problems.append(f"{where}: unknown node type")
            continue
        info = object_info[cls]
        specs = {s["name"]: s for s in input_specs(info)}
        expected = widget_value_count(info)
        if len(node.get("widgets_values", [])) != expected:
            problems.append(f"{where}: {len(node.get('widgets_values', []))} widget values, the node has {expected}")
        present = {}
        for slot, entry in enumerate(node.get("inputs", [])):
            name = entry.get("name")
            present[name] = entry
            if name not in specs:
                problems.append(f"{where}: unknown input {name!r}")
                continue
            if is_widget(specs[name]) and entry.get("widget", {}).get("name") != name:
                problems.append(f"{where}: input {name!r} is a widget; its entry needs widget.name")
            link_id = entry.get("link")
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                problems.append(f"{where}: input {name!r} names missing link {link_id}")
            elif link[3] != node["id"] or link[4] != slot:
                problems.append(f"{where}: link {link_id} does not end at input slot {slot}")
            elif not types_match(link[5], specs[name]["type"]):
                problems.append(f"{where}: input {name!r} ({specs[name]['type']}) gets a {link[5]} link")
        for name, spec in specs.items():
            if spec["required"] and not is_widget(spec) and (present.get(name) or {}).get("link") is None:
                problems.append(f"{where}: required input {name!r} is not connected")
        n_outputs = len(node.get("outputs", []))
        if n_outputs != len(info["output"]) and not (n_outputs < len(info["output"]) and is_core_node(info)):
            problems.append(f"{where}: {n_outputs} outputs, the node has {len(info['output'])}")
        for slot, entry in enumerate(node.get("outputs", [])):
            if slot < len(info["output"]) and entry.get("type") != info["output"][slot]:
                problems.append(f"{where}: output {slot} is {entry.get('type')}, the node says {info['output'][slot]}")
            for link_id in entry.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{where}: output {slot} lists link {link_id}, which does not start there")

    for link_id, (_, src, src_slot, dst, dst_slot, io_type) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: joins missing node {src if src not in nodes else dst}")
            continue
        outputs, inputs = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if src_slot >= len(outputs) or link_id not in (outputs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed by output {src_slot} of node {src}")
        elif outputs[src_slot].get("type") != io_type:
            problems.append(f"link {link_id}: type {io_type}, output {src_slot} of node {src} is "
                            f"{outputs[src_slot].get('type')}")
        if dst_slot >= len(inputs) or inputs[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not held by input {dst_slot} of node {dst}")
    return problems


def ui_to_api_view(ui: dict, object_info: dict) -> dict:
    """The API workflow a UI workflow stands for (widget values and links, frontend-only nodes left out),
    the way the frontend's "Export (API)" reads it; for comparing a UI file with its API twin."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        specs = input_specs(object_info[node["type"]])
        values = iter(node["widgets_values"])
        linked = {e["name"]: links[e["link"]] for e in node["inputs"] if e.get("link") is not None}
        inputs = {}
        for spec in specs:
            if is_widget(spec):
                value = next(values)
                if has_control_widget(spec):
                    next(values)
                inputs[spec["name"]] = value
            if spec["name"] in linked:
                link = linked[spec["name"]]
                inputs[spec["name"]] = [str(link[1]), link[2]]
        entry = {"class_type": node["type"], "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or object_info[node["type"]].get("display_name", node["type"])}
        out[str(node["id"])] = entry
    return out


# --------------------------------------------------------------------------------------------------
# API -> UI


def _depths(api: dict) -> dict[str, int]:
    """Longest distance from a node without inputs, for the column layout."""
    depth: dict[str, int] = {}

    def visit(node_id: str, stack: tuple[str, ...] = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in stack:
            raise ValueError(f"the workflow has a cycle through node {node_id}")
        own = api[node_id]["class_type"]
        best = -1
        for value in api[node_id]["inputs"].values():
            if is_link(value):
                # A chain of the same node type (expert loaders) stacks in one column.
                step = 0 if api[value[0]]["class_type"] == own else 1
                best = max(best, visit(value[0], stack + (node_id,)) + step - 1)
        depth[node_id] = best + 1
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _linked_widget_value(api: dict, link: list, spec: dict):
    """The value kept in a widget that a link drives: the source's own value when the source is a
    primitive node (so disconnecting the link keeps the text), else the input's default."""
    source = api[link[0]]
    if source["class_type"].startswith("Primitive") and "value" in source["inputs"]:
        return source["inputs"]["value"]
    return spec["options"].get("default", "")


def _sort_key(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _node_size(specs: list[dict], n_outputs: int, class_type: str = "") -> tuple[int, int]:
    if class_type in SIZE_HINTS:
        return SIZE_HINTS[class_type]
    widgets = [s for s in specs if is_widget(s)]
    sockets = sum(1 for s in specs if not is_widget(s))
    multiline = sum(1 for s in widgets if s["type"] == "STRING" and s["options"].get("multiline"))
    controls = sum(1 for s in widgets if has_control_widget(s))
    height = TITLE_H + SLOT_H * max(sockets, n_outputs, 1) + WIDGET_H * (len(widgets) + controls - multiline)
    height += MULTILINE_H * multiline
    return (WIDE_NODE_WIDTH if multiline else NODE_WIDTH, height + 10)


def api_to_ui(api: dict, object_info: dict, note: str | None = None, source_name: str = "") -> dict:
    """The UI-format workflow of API workflow ``api`` (deterministic: same input, same output)."""
    unknown = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if unknown:
        raise ValueError(f"node types not on this server: {', '.join(unknown)}")
    ids = sorted(api, key=_sort_key)
    if not all(i.isdigit() for i in ids):
        raise ValueError("API node ids must be integers (as the frontend writes them)")
    depth = _depths(api)
    order = sorted(ids, key=lambda i: (depth[i], _sort_key(i)))

    # Links, in the order of the consuming node and its input.
    links: list[list] = []
    link_of: dict[tuple[str, str], int] = {}
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id in order:
        node = api[node_id]
        for spec in input_specs(object_info[node["class_type"]]):
            value = node["inputs"].get(spec["name"])
            if not is_link(value):
                continue
            src, slot = value
            if src not in api:
                raise ValueError(f"node {node_id} input {spec['name']!r} links to missing node {src}")
            out_types = object_info[api[src]["class_type"]]["output"]
            if slot >= len(out_types):
                raise ValueError(f"node {node_id} input {spec['name']!r} links to output {slot} of node {src}, "
                                 f"which has {len(out_types)} outputs")
            link_id = len(links) + 1
            links.append([link_id, int(src), slot, int(node_id), None, out_types[slot]])
            link_of[(node_id, spec["name"])] = link_id
            outgoing.setdefault((src, slot), []).append(link_id)

    nodes = []
    column_y: dict[int, int] = {}
    offset = 1 if note else 0
    widths: dict[int, int] = {0: NOTE_SIZE[0]} if note else {}
    for node_id in order:
        specs = input_specs(object_info[api[node_id]["class_type"]])
        size = _node_size(specs, len(object_info[api[node_id]["class_type"]]["output"]), api[node_id]["class_type"])
        column = depth[node_id] + offset
        widths[column] = max(widths.get(column, 0), size[0])
    column_x, x = {}, 0
    for column in range(max(widths) + 1):
        column_x[column] = x
        x += widths.get(column, NODE_WIDTH) + COLUMN_GAP
    by_id = {link[0]: link for link in links}
    for position, node_id in enumerate(order):
        node = api[node_id]
        info = object_info[node["class_type"]]
        specs = input_specs(info)
        unknown_inputs = sorted(set(node["inputs"]) - {s["name"] for s in specs})
        if unknown_inputs:
            raise ValueError(f"node {node_id} ({node['class_type']}) has unknown inputs: {', '.join(unknown_inputs)}")
        inputs, widgets_values = [], []
        for spec in specs:
            value = node["inputs"].get(spec["name"])
            link_id = link_of.get((node_id, spec["name"]))
            if is_widget(spec):
                if link_id is not None:
                    value = _linked_widget_value(api, value, spec)
                elif value is None:
                    value = spec["options"].get("default", "")
                widgets_values.append(value)
                if has_control_widget(spec):
                    widgets_values.append(CONTROL_VALUE)
                if link_id is not None:
                    inputs.append({"name": spec["name"], "type": spec["type"], "widget": {"name": spec["name"]},
                                   "link": link_id})
            else:
                inputs.append({"name": spec["name"], "type": spec["type"], "link": link_id})
            if link_id is not None:
                by_id[link_id][4] = len(inputs) - 1
        outputs = []
        for slot, (io_type, name) in enumerate(zip(info["output"], info["output_name"])):
            outputs.append({"name": name, "type": io_type, "links": outgoing.get((node_id, slot), []),
                            "slot_index": slot})
        size = _node_size(specs, len(outputs), node["class_type"])
        column = depth[node_id] + offset
        y = column_y.get(column, 0)
        column_y[column] = y + size[1] + ROW_GAP
        entry = {
            "id": int(node_id),
            "type": node["class_type"],
            "pos": [column_x[column], y],
            "size": list(size),
            "flags": {},
            "order": position,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets_values,
        }
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            entry["title"] = title
        nodes.append(entry)

    last_node_id = max(int(i) for i in ids)
    if note:
        last_node_id += 1
        nodes.append({"id": last_node_id, "type": "Note", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": "Read me",
                      "properties": {"text": ""}, "widgets_values": [note], "color": NOTE_COLOR,
                      "bgcolor": NOTE_BGCOLOR})
    return {
        "last_node_id": last_node_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [40, 40]},
                  "mepg": {"api_twin": source_name, "generated_by": "tools/workflow_ui.py"}},
        "version": 0.4,
    }


def ui_name(api_path: Path) -> Path:
    stem = api_path.name[: -len("_api.json")]
    return api_path.with_name(f"{stem}.json")


def render(api_path: Path, object_info: dict) -> str:
    api = json.loads(api_path.read_text())
    stem = api_path.name[: -len("_api.json")]
    ui = api_to_ui(api, object_info, NOTES.get(stem), api_path.name)
    return json.dumps(ui, indent=2) + "\n"


def api_files(names: list[str] | None = None) -> list[Path]:
    """The API workflows whose UI twin this tool writes (those with a note here, unless named)."""
    if names:
        return [WORKFLOWS / Path(n).name for n in names]
    return sorted(p for p in WORKFLOWS.glob("*_api.json") if p.name[: -len("_api.json")] in NOTES)


def _object_info_from_own_server() -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    from host import ComfyServer, free_port, prepare_base

    base = prepare_base(ROOT / ".host" / "workflow-ui-base", with_tiny_models=False)
    with ComfyServer(port=free_port(), base=base, log_path=ROOT / "test-artifacts" / "workflow-ui-server.log") as s:
        return s.get_json("/object_info", timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="API workflows (default: the workflows/*_api.json this tool has a "
                                             "note for; others keep their hand-made UI file)")
    ap.add_argument("--server", help="a running ComfyUI with this pack, e.g. http://127.0.0.1:8188 "
                                     "(default: start one from this checkout)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI file is out of date")
    a = ap.parse_args(argv)
    object_info = fetch_object_info(a.server) if a.server else _object_info_from_own_server()
    stale = []
    for api_path in api_files(a.files):
        text = render(api_path, object_info)
        target = ui_name(api_path)
        if a.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
            continue
        target.write_text(text)
        print(f"{api_path.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run python tools/workflow_ui.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
