// MEPG Layout Editor: a canvas widget on the MEPG_LayoutEditor node (ComfyUI frontend 1.32.x).
//
// The whole editor state lives in the node's `editor_state` string widget as JSON:
//   {"version": 1, "source_hash": "<hash of the input layout the edits are based on>", "layout": {...}}
// so saved workflows and API prompts carry the edits. The Python node decides which layout is used
// (see web/docs/MEPG_LayoutEditor.md); when it runs with a new input layout it sends that layout back
// (ui output "mepg_layout_editor") and this editor starts over from it.
//
// Plain JS, no build step, no remote loads. User text only ever reaches the page through textContent,
// input values and canvas fillText: never innerHTML.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "MEPG_LayoutEditor";
const STATE_WIDGET = "editor_state";
const UI_KEY = "mepg_layout_editor";
const STATE_VERSION = 1;
const COORD_MAX = 1000;
const MIN_BOX = 8; // smallest box side, layout units
const HANDLE_PX = 8; // grab distance of a box edge, CSS pixels
const UNDO_LIMIT = 100;
const MAX_REGIONS = 64;
const BIG_STEP = 10;
const STYLES = ["photo", "anime", "watercolor", "oil painting", "pixel art", "sketch", "3d render", "cartoon"];
const LOADERS = {
  MEPG_ExpertStackLoader: { kind: "checkpoint", fileWidget: "ckpt_name" },
  MEPG_LoRAExpertLoader: { kind: "lora", fileWidget: "lora_name" },
};
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"];

const CSS = `
.mepg-le { display:flex; flex-direction:column; gap:4px; width:100%; height:100%; box-sizing:border-box;
  padding:2px 4px; font:12px sans-serif; color:var(--input-text, #ddd); overflow:hidden; }
.mepg-le-bar { display:flex; flex-wrap:wrap; gap:4px; align-items:center; flex:none; }
.mepg-le button { font:12px sans-serif; padding:2px 8px; cursor:pointer; border-radius:4px;
  border:1px solid var(--border-color, #555); background:var(--comfy-input-bg, #222); color:inherit; }
.mepg-le button:disabled { opacity:.45; cursor:default; }
.mepg-le-wrap { flex:1 1 auto; min-height:120px; display:flex; align-items:flex-start; justify-content:center;
  position:relative; }
.mepg-le-canvas { display:block; border:1px solid var(--border-color, #555); border-radius:3px;
  touch-action:none; outline:none; }
.mepg-le-wrap.mepg-le-focused .mepg-le-canvas { border-color:#4a9eff; }
.mepg-le-sink { position:absolute; left:0; top:0; width:1px; height:1px; opacity:0; pointer-events:none;
  border:0; padding:0; }
.mepg-le-form { display:grid; grid-template-columns:auto 1fr auto 1fr; gap:3px 6px; align-items:center; flex:none; }
.mepg-le-form label { opacity:.8; white-space:nowrap; }
.mepg-le-form input, .mepg-le-form select, .mepg-le-form textarea { font:12px sans-serif; min-width:0;
  box-sizing:border-box; width:100%; background:var(--comfy-input-bg, #222); color:inherit;
  border:1px solid var(--border-color, #555); border-radius:3px; padding:2px 4px; }
.mepg-le-form textarea { grid-column:2 / span 3; resize:none; height:36px; }
.mepg-le-wide { grid-column:2 / span 3; }
.mepg-le-list { flex:0 1 auto; max-height:84px; overflow:auto; margin:0; padding:0; list-style:none; }
.mepg-le-list li { padding:1px 4px; cursor:pointer; white-space:nowrap; overflow:hidden; text-overflow:ellipsis;
  border-radius:3px; }
.mepg-le-list li.mepg-le-sel { background:rgba(74,158,255,.3); }
.mepg-le-status { flex:none; min-height:14px; opacity:.85; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.mepg-le-status.mepg-le-error { color:#ff7b7b; }
`;

function injectCss() {
  if (document.getElementById("mepg-layout-editor-css")) return;
  const style = document.createElement("style");
  style.id = "mepg-layout-editor-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

// Builds an element; `text` goes in through textContent (never parsed as HTML).
function el(tag, { cls, text, attrs, on } = {}, children = []) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const [k, fn] of Object.entries(on || {})) e.addEventListener(k, fn);
  for (const c of children) e.appendChild(c);
  return e;
}

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;

function emptyLayout(width = 1024, height = 1024) {
  return { version: 1, canvas: { width, height }, global_prompt: "", negative_prompt: "", regions: [] };
}

// The node feeding input `name` of `node` (through legacy Reroute nodes), or null.
function upstream(node, name) {
  let slot = node?.findInputSlot ? node.findInputSlot(name) : -1;
  let cur = slot >= 0 ? node.getInputNode(slot) : null;
  for (let guard = 0; cur && cur.type === "Reroute" && guard < 32; guard++) cur = cur.getInputNode(0);
  return cur || null;
}

// The expert loaders chained into the editor's expert_stack input, first-stacked first.
function stackFromGraph(node) {
  const entries = [];
  let cur = upstream(node, "expert_stack");
  const connected = !!cur;
  let unknown = null;
  for (let guard = 0; cur && guard < 64; guard++) {
    const spec = LOADERS[cur.comfyClass || cur.type];
    if (!spec) {
      unknown = cur.comfyClass || cur.type;
      break;
    }
    entries.unshift({ kind: spec.kind, file: String(widgetValue(cur, spec.fileWidget) ?? ""),
      name: String(widgetValue(cur, "name") ?? "") });
    cur = upstream(cur, "expert_stack");
  }
  return { entries, connected, unknown };
}

class LayoutEditorWidget {
  constructor(node, stateWidget) {
    this.node = node;
    this.stateWidget = stateWidget;
    this.layout = null;
    this.sourceHash = null;
    this.selected = -1;
    this.undoStack = [];
    this.lastText = null;
    this.drag = null;
    this.textEditOpen = false;
    this.experts = { key: null, names: ["base"], problems: [], connected: false };
    this.build();
    this.loadFromWidget(true);
  }

  // ---------------------------------------------------------------- DOM
  build() {
    injectCss();
    const btn = (text, title, fn) => el("button", { text, attrs: { type: "button", title }, on: { click: fn } });
    this.addBtn = btn("Add", "Add a region", () => this.addRegion());
    this.delBtn = btn("Delete", "Delete the selected region (Delete key)", () => this.deleteSelected());
    this.undoBtn = btn("Undo", "Undo the last edit (Ctrl+Z)", () => this.undo());
    this.loadBtn = btn("Load input", "Load the connected Layout from JSON now (else: queue once)",
      () => this.loadUpstream(true));
    this.planBtn = btn("Plan", "Plan the global prompt now with the offline planner (replaces the regions)",
      () => this.planNow());
    for (const b of [this.addBtn, this.delBtn, this.undoBtn, this.loadBtn, this.planBtn]) b.classList.add("mepg-le-btn");
    this.addBtn.dataset.action = "add";
    this.delBtn.dataset.action = "delete";
    this.undoBtn.dataset.action = "undo";
    this.loadBtn.dataset.action = "load";
    this.planBtn.dataset.action = "plan";

    this.canvas = el("canvas", { cls: "mepg-le-canvas" });
    // Keys go to a visually hidden input: ComfyUI's global shortcuts (graph undo on Ctrl+Z, Delete
    // removing nodes, single-letter commands) leave text inputs alone.
    this.sink = el("input", { cls: "mepg-le-sink", attrs: { type: "text", readonly: "", tabindex: "-1",
      "aria-label": "layout editor keyboard" } });
    this.wrap = el("div", { cls: "mepg-le-wrap" }, [this.canvas, this.sink]);

    this.labelIn = el("input", { cls: "mepg-le-label", attrs: { type: "text", maxlength: 2000 } });
    this.styleIn = el("input", { cls: "mepg-le-style", attrs: { type: "text", maxlength: 2000 } });
    const listId = `mepg-le-styles-${Math.random().toString(36).slice(2)}`;
    this.styleIn.setAttribute("list", listId);
    const styles = el("datalist", { attrs: { id: listId } }, STYLES.map((s) => el("option", { attrs: { value: s } })));
    this.expertSel = el("select", { cls: "mepg-le-expert" });
    this.weightIn = el("input", { cls: "mepg-le-weight", attrs: { type: "number", min: 0, max: 10, step: 0.05 } });
    this.promptIn = el("textarea", { cls: "mepg-le-prompt", attrs: { maxlength: 2000, rows: 2 } });
    this.globalIn = el("input", { cls: "mepg-le-global mepg-le-wide", attrs: { type: "text", maxlength: 2000 } });
    this.form = el("div", { cls: "mepg-le-form" }, [
      el("label", { text: "Label" }), this.labelIn, el("label", { text: "Style" }), this.styleIn,
      el("label", { text: "Expert" }), this.expertSel, el("label", { text: "Weight" }), this.weightIn,
      el("label", { text: "Prompt" }), this.promptIn,
      el("label", { text: "Global" }), this.globalIn, styles,
    ]);
    this.list = el("ul", { cls: "mepg-le-list" });
    this.status = el("div", { cls: "mepg-le-status" });
    this.root = el("div", { cls: "mepg-le" }, [
      el("div", { cls: "mepg-le-bar" }, [this.addBtn, this.delBtn, this.undoBtn, this.loadBtn, this.planBtn]),
      this.wrap, this.form, this.list, this.status,
    ]);

    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("pointerenter", () => this.syncFromWidget());
    this.sink.addEventListener("keydown", (e) => this.onKeyDown(e));
    this.sink.addEventListener("focus", () => this.wrap.classList.add("mepg-le-focused"));
    this.sink.addEventListener("blur", () => this.wrap.classList.remove("mepg-le-focused"));
    // Keep wheel and context-menu events for the editor (no canvas zoom while pointing at the editor).
    this.canvas.addEventListener("wheel", (e) => e.stopPropagation());

    const textField = (input, key, convert) => {
      input.addEventListener("focus", () => { this.textEditOpen = false; });
      input.addEventListener("input", () => this.onFieldInput(key, convert(input.value)));
      input.addEventListener("change", () => { this.textEditOpen = false; });
      // Typing must not reach ComfyUI's shortcuts (the inputs are ours, not the graph's).
      input.addEventListener("keydown", (e) => e.stopPropagation());
    };
    textField(this.labelIn, "label", (v) => v);
    textField(this.promptIn, "prompt", (v) => v);
    textField(this.styleIn, "style", (v) => (v.trim() ? v : null));
    textField(this.weightIn, "weight", (v) => {
      const n = Number.parseFloat(v);
      return Number.isFinite(n) ? clamp(n, 0, 10) : 1.0;
    });
    textField(this.globalIn, "global_prompt", (v) => v);
    this.expertSel.addEventListener("change", () => this.setExpert(this.expertSel.value || null));
    this.expertSel.addEventListener("focus", () => this.refreshExperts());

    this.resizeObserver = new ResizeObserver(() => this.fitCanvas());
    this.resizeObserver.observe(this.wrap);
  }

  // ---------------------------------------------------------------- state <-> widget
  stateText() {
    if (!this.layout) return "";
    return JSON.stringify({ version: STATE_VERSION, source_hash: this.sourceHash, layout: this.layout });
  }

  writeToWidget() {
    const text = this.stateText();
    this.lastText = text;
    this.stateWidget.value = text;
    this.undoBtn.disabled = !this.undoStack.length;
    this.node.setDirtyCanvas?.(true, true);
  }

  syncFromWidget() {
    if ((this.stateWidget.value ?? "") !== this.lastText) this.loadFromWidget(false);
  }

  loadFromWidget(initial) {
    const text = String(this.stateWidget.value ?? "");
    this.lastText = text;
    if (!text.trim()) {
      this.layout = null;
      this.sourceHash = null;
    } else {
      try {
        let obj = JSON.parse(text);
        if (obj && typeof obj === "object" && !("layout" in obj) && "regions" in obj) {
          obj = { version: STATE_VERSION, source_hash: null, layout: obj };
        }
        if (!obj || typeof obj !== "object" || !obj.layout || typeof obj.layout !== "object") {
          throw new Error("expected {version, source_hash, layout}");
        }
        this.layout = this.normalise(obj.layout);
        this.sourceHash = typeof obj.source_hash === "string" ? obj.source_hash : null;
      } catch (err) {
        this.layout = null;
        this.setStatus(`editor_state is not readable (${err.message}); the node will report it`, true);
      }
    }
    if (!initial) this.undoStack = [];
    this.selected = this.layout && this.selected < this.layout.regions.length ? this.selected : -1;
    this.render();
  }

  // Fills in what the editor needs to draw; anything odd is left for the node to report.
  normalise(layout) {
    const out = { ...emptyLayout(), ...layout };
    const w = Number(out.canvas?.width), h = Number(out.canvas?.height);
    out.canvas = { width: w > 0 ? w : 1024, height: h > 0 ? h : 1024 };
    out.regions = Array.isArray(out.regions) ? out.regions.filter((r) => r && typeof r === "object") : [];
    for (const r of out.regions) {
      if (!Array.isArray(r.box) || r.box.length !== 4 || !r.box.every((v) => Number.isFinite(Number(v)))) {
        r.box = [100, 100, 300, 300];
      }
      r.box = r.box.map((v) => Math.round(Number(v)));
    }
    return out;
  }

  snapshot() {
    return JSON.stringify({ layout: this.layout, source_hash: this.sourceHash, selected: this.selected });
  }

  pushUndo() {
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
  }

  undo() {
    const snap = this.undoStack.pop();
    if (!snap) {
      this.setStatus("Nothing to undo");
      return;
    }
    const s = JSON.parse(snap);
    this.layout = s.layout;
    this.sourceHash = s.source_hash;
    this.selected = s.selected;
    this.textEditOpen = false;
    this.writeToWidget();
    this.render();
    this.setStatus("Undone");
  }

  // One undoable edit: snapshot, change, write the widget, redraw.
  edit(change, { undo = true } = {}) {
    if (undo) this.pushUndo();
    change();
    this.writeToWidget();
    this.render();
  }

  // ---------------------------------------------------------------- edits
  region() {
    return this.layout && this.selected >= 0 ? this.layout.regions[this.selected] : null;
  }

  addRegion(box) {
    if (this.layout && this.layout.regions.length >= MAX_REGIONS) {
      this.setStatus(`At most ${MAX_REGIONS} regions`, true);
      return;
    }
    this.edit(() => {
      if (!this.layout) this.layout = emptyLayout();
      const n = this.layout.regions.length;
      const off = (n % 6) * 40;
      this.layout.regions.push({ label: "object", prompt: "", box: box || [300 + off, 300 + off, 600 + off, 600 + off],
        style: null, expert: null, weight: 1.0 });
      this.selected = n;
    });
    this.setStatus("Region added: give it a label and a prompt");
  }

  deleteSelected() {
    if (!this.region()) return;
    this.edit(() => {
      this.layout.regions.splice(this.selected, 1);
      this.selected = Math.min(this.selected, this.layout.regions.length - 1);
    });
  }

  onFieldInput(key, value) {
    if (!this.layout) {
      if (key !== "global_prompt") return;
      this.layout = emptyLayout();
    }
    const target = key === "global_prompt" ? this.layout : this.region();
    if (!target) return;
    // A run of typing in one field is one undo step.
    if (!this.textEditOpen) {
      this.pushUndo();
      this.textEditOpen = true;
    }
    target[key] = value;
    this.writeToWidget();
    this.renderCanvas();
    this.renderList();
  }

  setExpert(name) {
    const r = this.region();
    if (!r) return;
    this.edit(() => { r.expert = name; });
  }

  moveSelected(dx, dy, resize) {
    const r = this.region();
    if (!r) return;
    this.edit(() => {
      let [x1, y1, x2, y2] = r.box;
      if (resize) {
        x2 = clamp(x2 + dx, x1 + MIN_BOX, COORD_MAX);
        y2 = clamp(y2 + dy, y1 + MIN_BOX, COORD_MAX);
      } else {
        const mx = clamp(dx, -x1, COORD_MAX - x2), my = clamp(dy, -y1, COORD_MAX - y2);
        x1 += mx; x2 += mx; y1 += my; y2 += my;
      }
      r.box = [x1, y1, x2, y2];
    });
  }

  // ---------------------------------------------------------------- mouse
  toUnits(e) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) / Math.max(rect.width, 1)) * COORD_MAX,
      y: ((e.clientY - rect.top) / Math.max(rect.height, 1)) * COORD_MAX,
      // one CSS pixel (as shown, zoom included) in layout units
      px: COORD_MAX / Math.max(rect.width, 1), py: COORD_MAX / Math.max(rect.height, 1),
    };
  }

  // Which box (topmost first) and which of its edges are under the pointer.
  hit(p) {
    if (!this.layout) return null;
    const order = this.layout.regions.map((_, i) => i).reverse();
    if (this.selected >= 0) order.unshift(this.selected);
    const gx = HANDLE_PX * p.px, gy = HANDLE_PX * p.py;
    for (const i of order) {
      const [x1, y1, x2, y2] = this.layout.regions[i].box;
      if (p.x < x1 - gx || p.x > x2 + gx || p.y < y1 - gy || p.y > y2 + gy) continue;
      const edges = {
        l: Math.abs(p.x - x1) <= gx, r: Math.abs(p.x - x2) <= gx,
        t: Math.abs(p.y - y1) <= gy, b: Math.abs(p.y - y2) <= gy,
      };
      const inside = p.x >= x1 && p.x <= x2 && p.y >= y1 && p.y <= y2;
      if (edges.l || edges.r || edges.t || edges.b) return { index: i, edges };
      if (inside) return { index: i, edges: null };
    }
    return null;
  }

  cursorFor(h) {
    if (!h) return "crosshair";
    if (!h.edges) return "move";
    const { l, r, t, b } = h.edges;
    if ((l && t) || (r && b)) return "nwse-resize";
    if ((r && t) || (l && b)) return "nesw-resize";
    return l || r ? "ew-resize" : "ns-resize";
  }

  onPointerDown(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.syncFromWidget();
    this.sink.focus({ preventScroll: true });
    this.textEditOpen = false;
    const p = this.toUnits(e);
    const h = this.hit(p);
    if (h) {
      if (this.selected !== h.index) {
        this.selected = h.index;
        this.render();
        this.refreshExperts();
      }
      const box = this.layout.regions[h.index].box.slice();
      this.drag = { mode: h.edges ? "resize" : "move", edges: h.edges, start: p, box, snap: this.snapshot(),
        changed: false };
    } else {
      this.selected = -1;
      this.render();
      this.drag = { mode: "create", start: p, box: null, snap: this.snapshot(), changed: false };
    }
    this.canvas.setPointerCapture(e.pointerId);
  }

  onPointerMove(e) {
    const p = this.toUnits(e);
    if (!this.drag) {
      this.canvas.style.cursor = this.cursorFor(this.hit(p));
      return;
    }
    e.preventDefault();
    e.stopPropagation();
    const d = this.drag;
    const dx = Math.round(p.x - d.start.x), dy = Math.round(p.y - d.start.y);
    if (d.mode === "create") {
      const x1 = clamp(Math.round(Math.min(p.x, d.start.x)), 0, COORD_MAX);
      const y1 = clamp(Math.round(Math.min(p.y, d.start.y)), 0, COORD_MAX);
      const x2 = clamp(Math.round(Math.max(p.x, d.start.x)), 0, COORD_MAX);
      const y2 = clamp(Math.round(Math.max(p.y, d.start.y)), 0, COORD_MAX);
      d.box = [x1, y1, x2, y2];
      this.renderCanvas(d.box);
      return;
    }
    if (!dx && !dy && !d.changed) return;
    const r = this.layout.regions[this.selected];
    let [x1, y1, x2, y2] = d.box;
    if (d.mode === "move") {
      const mx = clamp(dx, -x1, COORD_MAX - x2), my = clamp(dy, -y1, COORD_MAX - y2);
      x1 += mx; x2 += mx; y1 += my; y2 += my;
    } else {
      if (d.edges.l) x1 = clamp(x1 + dx, 0, x2 - MIN_BOX);
      if (d.edges.r) x2 = clamp(x2 + dx, x1 + MIN_BOX, COORD_MAX);
      if (d.edges.t) y1 = clamp(y1 + dy, 0, y2 - MIN_BOX);
      if (d.edges.b) y2 = clamp(y2 + dy, y1 + MIN_BOX, COORD_MAX);
    }
    r.box = [x1, y1, x2, y2];
    d.changed = true;
    this.renderCanvas();
  }

  onPointerUp(e) {
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    if (this.canvas.hasPointerCapture?.(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    if (d.mode === "create") {
      const b = d.box;
      if (b && b[2] - b[0] >= MIN_BOX && b[3] - b[1] >= MIN_BOX) this.addRegion(b);
      else this.renderCanvas();
      return;
    }
    if (d.changed) {
      this.undoStack.push(d.snap);
      if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
      this.writeToWidget();
      this.render();
    }
  }

  // ---------------------------------------------------------------- keys
  onKeyDown(e) {
    const ctrl = e.ctrlKey || e.metaKey;
    let handled = true;
    const step = e.shiftKey ? BIG_STEP : 1;
    if (ctrl && !e.shiftKey && (e.key === "z" || e.key === "Z")) this.undo();
    else if (e.key === "ArrowLeft") this.moveSelected(-step, 0, e.altKey);
    else if (e.key === "ArrowRight") this.moveSelected(step, 0, e.altKey);
    else if (e.key === "ArrowUp") this.moveSelected(0, -step, e.altKey);
    else if (e.key === "ArrowDown") this.moveSelected(0, step, e.altKey);
    else if (e.key === "Delete" || e.key === "Backspace") this.deleteSelected();
    else if (e.key === "Escape") { this.selected = -1; this.render(); }
    else if (e.key === "Tab" && this.layout?.regions.length) {
      const n = this.layout.regions.length;
      this.selected = ((this.selected < 0 ? -1 : this.selected) + (e.shiftKey ? n - 1 : 1)) % n;
      this.render();
    } else handled = false;
    if (handled || ctrl) {
      // Ctrl+S, Ctrl+Enter etc. still reach ComfyUI; everything else stays in the editor.
      if (handled) e.preventDefault();
      if (handled) e.stopPropagation();
    } else {
      e.stopPropagation();
    }
  }

  // ---------------------------------------------------------------- experts (names of the connected stack)
  async refreshExperts(force = false) {
    const stack = stackFromGraph(this.node);
    const key = JSON.stringify(stack);
    if (!force && key === this.experts.key) return;
    this.experts.key = key;
    this.experts.connected = stack.connected;
    if (stack.unknown) this.experts.problems = [`expert_stack comes from ${stack.unknown}; names are known after a run`];
    try {
      const res = await api.fetchApi(`/mepg/experts?stack=${encodeURIComponent(JSON.stringify(stack.entries))}`);
      const body = await res.json();
      if (!res.ok) throw new Error(body?.error || `HTTP ${res.status}`);
      if (key !== this.experts.key) return; // a newer request won
      this.experts.names = Array.isArray(body.names) ? body.names.map(String) : ["base"];
      this.experts.problems = [...(stack.unknown ? this.experts.problems : []), ...(body.problems || [])];
      if (this.experts.problems.length) this.setStatus(this.experts.problems[0], true);
    } catch (err) {
      this.experts.names = ["base", ...stack.entries.map((x) => x.name || x.file.replace(/\.[^.]*$/, ""))];
      this.setStatus(`expert names: ${err.message}`, true);
    }
    this.renderForm();
  }

  // ---------------------------------------------------------------- routes: load / plan now
  async loadUpstream(explicit) {
    const src = upstream(this.node, "layout");
    if (!src) {
      if (explicit) this.setStatus("No layout connected: edit here, or connect a planner / Layout from JSON");
      return;
    }
    if ((src.comfyClass || src.type) !== "MEPG_LayoutFromJSON") {
      if (explicit) this.setStatus("Queue the graph once: the node sends the input layout to this editor");
      return;
    }
    try {
      const res = await api.fetchApi("/mepg/validate", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ layout: String(widgetValue(src, "json_text") ?? "") }) });
      const body = await res.json();
      if (!res.ok) throw new Error(body?.error || `HTTP ${res.status}`);
      if (!body.ok) {
        this.setStatus(`The input layout is invalid: ${(body.errors || [])[0] || "?"}`, true);
        return;
      }
      this.edit(() => {
        this.layout = this.normalise(body.layout);
        this.sourceHash = body.source_hash;
        this.selected = -1;
      });
      this.setStatus("Loaded the input layout");
    } catch (err) {
      this.setStatus(`Could not load the input layout: ${err.message}`, true);
    }
  }

  async planNow() {
    const prompt = (this.globalIn.value || "").trim();
    if (!prompt) {
      this.setStatus("Write a global prompt first, then Plan", true);
      return;
    }
    const canvas = this.layout?.canvas || { width: 1024, height: 1024 };
    try {
      const res = await api.fetchApi("/mepg/plan", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, width: canvas.width, height: canvas.height, max_regions: 16 }) });
      const body = await res.json();
      if (!res.ok) throw new Error(body?.error || `HTTP ${res.status}`);
      this.edit(() => {
        this.layout = this.normalise(body.layout);
        this.selected = -1;
      });
      this.setStatus(`Planned ${this.layout.regions.length} region(s)`);
    } catch (err) {
      this.setStatus(`Plan failed: ${err.message}`, true);
    }
  }

  // ---------------------------------------------------------------- the node ran
  onExecuted(message) {
    const msg = message?.[UI_KEY]?.[0];
    if (!msg || typeof msg !== "object") return;
    if (Array.isArray(msg.experts)) {
      this.experts.names = ["base", ...msg.experts.filter((n) => String(n).toLowerCase() !== "base").map(String)];
      this.renderForm();
    }
    this.syncFromWidget();
    if (msg.used === "input" && msg.layout && msg.source_hash !== this.sourceHash) {
      this.layout = this.normalise(msg.layout);
      this.sourceHash = msg.source_hash ?? null;
      this.selected = -1;
      this.undoStack = [];
      this.writeToWidget();
      this.render();
      this.setStatus("The input layout changed: now editing the new layout");
    } else if (msg.used === "edited") {
      const w = (msg.warnings || []).length;
      this.setStatus(w ? `Ran with your edits (${w} repaired: ${msg.warnings[0]})` : "Ran with your edits");
    }
  }

  // ---------------------------------------------------------------- drawing
  setStatus(text, error = false) {
    this.status.textContent = text;
    this.status.classList.toggle("mepg-le-error", !!error);
    this.status.title = text;
  }

  fitCanvas() {
    const aw = this.wrap.clientWidth, ah = this.wrap.clientHeight;
    if (aw <= 0 || ah <= 0) return;
    const c = this.layout?.canvas || { width: 1, height: 1 };
    const aspect = c.width / c.height;
    let w = aw - 2, h = w / aspect;
    if (h > ah - 2) {
      h = ah - 2;
      w = h * aspect;
    }
    w = Math.max(20, Math.floor(w));
    h = Math.max(20, Math.floor(h));
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = `${w}px`;
    this.canvas.style.height = `${h}px`;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
    }
    this.renderCanvas();
  }

  render() {
    this.fitCanvas();
    this.renderForm();
    this.renderList();
    this.delBtn.disabled = !this.region();
    this.undoBtn.disabled = !this.undoStack.length;
    this.loadBtn.disabled = !upstream(this.node, "layout");
  }

  renderCanvas(ghost) {
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height;
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#1b1b1f";
    ctx.fillRect(0, 0, W, H);
    ctx.strokeStyle = "rgba(255,255,255,0.06)";
    ctx.lineWidth = 1;
    for (let i = 1; i < 10; i++) {
      const x = Math.round((i * W) / 10) + 0.5, y = Math.round((i * H) / 10) + 0.5;
      ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, H); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(W, y); ctx.stroke();
    }
    const sx = W / COORD_MAX, sy = H / COORD_MAX;
    ctx.font = `${Math.round(11 * dpr)}px sans-serif`;
    ctx.textBaseline = "top";
    if (!this.layout || !this.layout.regions.length) {
      ctx.fillStyle = "rgba(255,255,255,0.55)";
      ctx.textAlign = "center";
      const msg = upstream(this.node, "layout") ? "Queue once (or Load input) to edit the input layout"
        : "Drag on the canvas or click Add to make a region";
      ctx.fillText(msg, W / 2, H / 2 - 6 * dpr);
      ctx.textAlign = "left";
    }
    const regions = this.layout?.regions || [];
    regions.forEach((r, i) => {
      const [x1, y1, x2, y2] = r.box;
      const px = x1 * sx, py = y1 * sy, pw = (x2 - x1) * sx, ph = (y2 - y1) * sy;
      const color = COLORS[i % COLORS.length];
      const sel = i === this.selected;
      ctx.fillStyle = color + (sel ? "55" : "30");
      ctx.fillRect(px, py, pw, ph);
      ctx.strokeStyle = color;
      ctx.lineWidth = (sel ? 3 : 1.5) * dpr;
      ctx.strokeRect(px, py, pw, ph);
      ctx.save();
      ctx.beginPath();
      ctx.rect(px, py, pw, ph);
      ctx.clip();
      const title = `${i + 1} ${r.label || ""}`;
      const sub = [r.style ? `[${r.style}]` : "", r.expert ? `→ ${r.expert}` : ""].filter(Boolean).join(" ");
      const tw = Math.max(ctx.measureText(title).width, sub ? ctx.measureText(sub).width : 0) + 6 * dpr;
      ctx.fillStyle = "rgba(0,0,0,0.55)";
      ctx.fillRect(px, py, tw, (sub ? 28 : 15) * dpr);
      ctx.fillStyle = "#fff";
      ctx.fillText(title, px + 3 * dpr, py + 2 * dpr);
      if (sub) ctx.fillText(sub, px + 3 * dpr, py + 15 * dpr);
      ctx.restore();
      if (sel) {
        ctx.fillStyle = "#fff";
        const hs = 4 * dpr;
        for (const [hx, hy] of [[px, py], [px + pw, py], [px, py + ph], [px + pw, py + ph],
          [px + pw / 2, py], [px + pw / 2, py + ph], [px, py + ph / 2], [px + pw, py + ph / 2]]) {
          ctx.fillRect(hx - hs, hy - hs, 2 * hs, 2 * hs);
        }
      }
    });
    if (ghost) {
      ctx.setLineDash([6 * dpr, 4 * dpr]);
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1.5 * dpr;
      ctx.strokeRect(ghost[0] * sx, ghost[1] * sy, (ghost[2] - ghost[0]) * sx, (ghost[3] - ghost[1]) * sy);
      ctx.setLineDash([]);
    }
  }

  renderForm() {
    const r = this.region();
    const active = document.activeElement;
    const set = (input, value) => { if (input !== active) input.value = value ?? ""; };
    for (const input of [this.labelIn, this.promptIn, this.styleIn, this.weightIn, this.expertSel]) input.disabled = !r;
    set(this.labelIn, r?.label);
    set(this.promptIn, r?.prompt);
    set(this.styleIn, r?.style);
    set(this.weightIn, r ? String(r.weight ?? 1) : "");
    set(this.globalIn, this.layout?.global_prompt);

    // Expert choices: the gate, then the stack's names (and a region's unknown name, marked).
    const names = [...this.experts.names];
    const current = r?.expert ?? "";
    const options = [["", "(gate decides)"], ...names.map((n) => [n, n])];
    if (current && !names.some((n) => n.toLowerCase() === current.toLowerCase())) {
      options.push([current, `${current} (not in the stack)`]);
    }
    const sig = JSON.stringify(options);
    if (sig !== this.expertSel.dataset.sig) {
      this.expertSel.replaceChildren(...options.map(([value, text]) => el("option", { text, attrs: { value } })));
      this.expertSel.dataset.sig = sig;
    }
    const match = options.find(([v]) => v.toLowerCase() === String(current).toLowerCase());
    this.expertSel.value = match ? match[0] : "";
  }

  renderList() {
    const regions = this.layout?.regions || [];
    const items = regions.map((r, i) => {
      const parts = [`${i + 1}. ${r.label || "(no label)"}`];
      if (r.prompt) parts.push(`— ${r.prompt}`);
      if (r.style) parts.push(`[${r.style}]`);
      if (r.expert) parts.push(`→ ${r.expert}`);
      const li = el("li", { text: parts.join(" "), cls: i === this.selected ? "mepg-le-sel" : "" });
      li.dataset.index = String(i);
      li.title = parts.join(" ");
      li.addEventListener("click", () => {
        this.selected = i;
        this.render();
        this.refreshExperts();
        this.sink.focus({ preventScroll: true });
      });
      return li;
    });
    this.list.replaceChildren(...items);
  }

  // ---------------------------------------------------------------- lifecycle
  autoLoadIfEmpty() {
    if (!this.layout && upstream(this.node, "layout")) this.loadUpstream(false);
  }

  destroy() {
    this.resizeObserver?.disconnect();
  }
}

function attachEditor(node) {
  const stateWidget = node.widgets?.find((w) => w.name === STATE_WIDGET);
  if (!stateWidget || node.mepgEditor) return;
  // The raw JSON stays in the (hidden) widget: saved with the workflow and sent in the API prompt.
  stateWidget.hidden = true;
  if (stateWidget.options) stateWidget.options.hidden = true;
  stateWidget.computeSize = () => [0, -4];
  const editor = new LayoutEditorWidget(node, stateWidget);
  node.mepgEditor = editor;
  const widget = node.addDOMWidget("mepg_layout_canvas", "mepg_layout_editor", editor.root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => 430,
  });
  widget.serialize = false;
  widget.onRemove = () => editor.destroy();
  const [w, h] = node.size;
  node.setSize([Math.max(w, 440), Math.max(h, 600)]);
  requestAnimationFrame(() => {
    editor.loadFromWidget(true);
    editor.refreshExperts(true);
    editor.autoLoadIfEmpty();
  });
}

app.registerExtension({
  name: "mepg.LayoutEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const chain = (name, fn) => {
      const prev = nodeType.prototype[name];
      nodeType.prototype[name] = function (...args) {
        const out = prev?.apply(this, args);
        try {
          fn.apply(this, args);
        } catch (err) {
          console.error(`MEPG layout editor (${name}):`, err);
        }
        return out;
      };
    };
    chain("onNodeCreated", function () { attachEditor(this); });
    chain("onConfigure", function () { this.mepgEditor?.loadFromWidget(true); });
    chain("onExecuted", function (message) { this.mepgEditor?.onExecuted(message); });
    chain("onConnectionsChange", function () {
      const ed = this.mepgEditor;
      if (!ed) return;
      ed.refreshExperts();
      ed.render();
      requestAnimationFrame(() => ed.autoLoadIfEmpty());
    });
    chain("onDrawForeground", function () { this.mepgEditor?.syncFromWidget(); });
  },
});
