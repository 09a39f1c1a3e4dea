"""Nodes that make or show a layout without an LLM."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mepg_core.layout import LayoutError, parse_layout
from .types import CATEGORY, LayoutType

log = logging.getLogger("mepg")

EXAMPLE_LAYOUT = """{
  "version": 1,
  "canvas": {"width": 1024, "height": 1024},
  "global_prompt": "a cosy reading room at dusk, warm light",
  "negative_prompt": "",
  "regions": [
    {"label": "cat", "prompt": "a fluffy orange cat curled up asleep", "box": [120, 540, 430, 860],
     "style": "photo", "expert": null, "weight": 1.0},
    {"label": "lamp", "prompt": "a brass reading lamp with a green shade", "box": [600, 120, 880, 700],
     "style": "oil painting", "expert": null, "weight": 1.0}
  ]
}"""


class LayoutFromJSON(io.ComfyNode):
    """Parse a pasted or typed layout (schema version 1), repairing what can be repaired."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_LayoutFromJSON",
            display_name="Layout from JSON (MEPG)",
            category=f"{CATEGORY}/layout",
            description=(
                "Reads a layout written as JSON: a global prompt plus regions, each with a box "
                "[x1, y1, x2, y2] in 0-1000 canvas units, a label, a prompt and a style. Boxes on a 0-1 "
                "or pixel scale, swapped corners and out-of-range values are repaired with a warning; "
                "anything else is an error naming the region and field."
            ),
            inputs=[
                io.String.Input(
                    "json_text",
                    multiline=True,
                    default=EXAMPLE_LAYOUT,
                    tooltip="The layout as JSON (schema version 1). See the node's docs for every field.",
                ),
            ],
            outputs=[
                LayoutType.Output(
                    "layout", display_name="layout", tooltip="The parsed layout, for RegionMaskBuilder or the editor."
                ),
                io.String.Output(
                    "layout_json", display_name="layout_json", tooltip="The layout as normalised JSON, after repairs."
                ),
                io.String.Output(
                    "warnings", display_name="warnings", tooltip="What was repaired, one line each (empty if nothing)."
                ),
            ],
        )

    @classmethod
    def execute(cls, json_text: str) -> io.NodeOutput:
        try:
            layout, warnings = parse_layout(json_text)
        except LayoutError as exc:
            raise ValueError(f"MEPG Layout from JSON: {exc}") from None
        for w in warnings:
            log.warning("MEPG layout repaired: %s", w)
        return io.NodeOutput(layout, layout.to_json(), "\n".join(warnings))
