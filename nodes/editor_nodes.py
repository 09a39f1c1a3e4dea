"""LayoutEditor: the layout as edited in the browser (boxes, texts, styles, forced experts).

Glue only: the state format and the choice between the edited and the input layout are in
``mepg_core.editor_state``; the canvas editor is ``web/mepg_layout_editor.js``, which writes its state
into the ``editor_state`` widget. No route is needed to run the node.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mepg_core.editor_state import USED_INPUT, EditorStateError, check_experts, parse_editor_state, resolve
from .types import CATEGORY, ExpertStackType, LayoutType

log = logging.getLogger("mepg")

NODE_NAME = "MEPG Layout Editor"
UI_KEY = "mepg_layout_editor"


class LayoutEditor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_LayoutEditor",
            display_name="Layout Editor (MEPG)",
            category=f"{CATEGORY}/layout",
            description=(
                "Edit a layout on a canvas: move, resize, add and delete boxes, rewrite a region's label, prompt "
                "and style, and force a region's expert from the connected expert stack. The edits live in the "
                "editor_state widget (saved with the workflow, settable in API prompts). Edits made on the "
                "current input layout are used; when the input layout changes, the new layout is used and "
                "loaded into the editor."
            ),
            inputs=[
                LayoutType.Input("layout", optional=True,
                                 tooltip="The layout to edit, from a planner or Layout from JSON. Without one, "
                                         "the layout in editor_state is used as it is."),
                io.String.Input("editor_state", default="",
                                tooltip="The edited layout as JSON, with the hash of the input layout it was "
                                        "edited from; written by the canvas editor (see the node's docs)."),
                ExpertStackType.Input("expert_stack", optional=True,
                                      tooltip="The expert stack whose names regions may force (plus 'base'); "
                                              "connect it to check the names and list them in the editor."),
            ],
            outputs=[
                LayoutType.Output("layout_out", display_name="layout",
                                  tooltip="The edited layout (or the new input layout), for RegionMaskBuilder."),
                io.String.Output("layout_json", display_name="layout_json",
                                 tooltip="The same layout as normalised JSON."),
            ],
        )

    @classmethod
    def execute(cls, editor_state: str = "", layout=None, expert_stack=None) -> io.NodeOutput:
        try:
            result = resolve(layout, parse_editor_state(editor_state))
            names = [e.name for e in expert_stack.entries] if expert_stack is not None else None
            if names is not None:
                check_experts(result.layout, names)
        except EditorStateError as exc:
            raise ValueError(f"{NODE_NAME}: {exc}") from None
        for w in result.warnings:
            log.warning("MEPG layout editor: %s", w)
        if result.used == USED_INPUT:
            log.info("MEPG layout editor: the input layout changed (hash %s); using it and sending it to the editor",
                     result.source_hash)
        message = {
            "layout": result.layout.to_dict(),
            "source_hash": result.source_hash,
            "used": result.used,
            "warnings": list(result.warnings),
            "experts": names,
        }
        return io.NodeOutput(result.layout, result.layout.to_json(), ui={UI_KEY: [message]})
