"""RegionMaskBuilder: layout -> region masks, region conditioning and a preview of the boxes."""

from __future__ import annotations

import node_helpers
import torch
from comfy_api.latest import io, ui

from ..mepg_core.masks import OVERLAP_POLICIES
from ..mepg_core.preview import draw_layout
from ..mepg_core.regions import RegionSet, build_region_set
from .checks import check_number
from .types import CATEGORY, LayoutType, RegionsType

LATENT_FACTOR = 8
MAX_SIZE = 16384


def region_text(prompt: str, style: str | None) -> str:
    """The text encoded for a region: its prompt, plus its style tag unless the prompt already says it."""
    if style and style.lower() not in prompt.lower():
        return f"{prompt}, {style} style"
    return prompt


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def masked(conditioning, mask: torch.Tensor, strength: float):
    """Attach a ``[H, W]`` mask to every entry of a ComfyUI conditioning list."""
    return node_helpers.conditioning_set_values(
        conditioning, {"mask": mask[None], "set_area_to_bounds": False, "mask_strength": float(strength)}
    )


def combined_conditioning(region_set: RegionSet, global_weight: float):
    """Global prompt on the background (and at ``global_weight`` everywhere) plus each region on its mask.

    Masks are the latent-grid ones, so ComfyUI uses them as they are instead of resampling pixel masks.
    """
    out = []
    if region_set.latent_background.max() > 0:
        out += masked(region_set.global_conditioning, region_set.latent_background, 1.0)
    if global_weight > 0:
        out += node_helpers.conditioning_set_values(region_set.global_conditioning, {"strength": float(global_weight)})
    for spec in region_set.regions:
        out += masked(spec.conditioning, spec.latent_mask, spec.weight)
    return out


class RegionMaskBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_RegionMaskBuilder",
            display_name="Region Mask Builder (MEPG)",
            category=f"{CATEGORY}/layout",
            description=(
                "Turns a layout into one mask per region and a background mask at the target size, "
                "encodes each region's prompt (with its style) when a CLIP is connected, and draws the "
                "boxes. Overlaps: 'smaller_on_top' gives shared pixels to the smaller box, "
                "'later_on_top' to the region listed last, 'overlap' keeps both (averaged when sampling)."
            ),
            inputs=[
                LayoutType.Input("layout", tooltip="The layout from a planner, the editor or Layout from JSON."),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=64,
                    max=MAX_SIZE,
                    step=8,
                    tooltip="Target image width in pixels (ignored when a latent is connected).",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=64,
                    max=MAX_SIZE,
                    step=8,
                    tooltip="Target image height in pixels (ignored when a latent is connected).",
                ),
                io.Int.Input(
                    "feather_px",
                    default=0,
                    min=0,
                    max=512,
                    tooltip="Soften mask edges by this many pixels (0 = hard edges). "
                    "Feathered masks plus the background still sum to 1.",
                ),
                io.Combo.Input(
                    "overlap",
                    options=list(OVERLAP_POLICIES),
                    default="smaller_on_top",
                    tooltip="Who owns pixels where boxes overlap.",
                ),
                io.Float.Input(
                    "global_weight",
                    default=0.5,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Strength of the global prompt inside the regions, in the conditioning "
                    "output (the background always gets the global prompt at full strength).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Connect to encode the global and region prompts (needed for sampling).",
                ),
                io.Latent.Input(
                    "latent", optional=True, tooltip="Take the target size from this latent instead of width/height."
                ),
                io.Image.Input("image", optional=True, tooltip="Draw the preview over this image."),
            ],
            outputs=[
                RegionsType.Output(
                    "regions",
                    display_name="regions",
                    tooltip="Masks, boxes and region conditioning for the MEPG sampler.",
                ),
                io.Conditioning.Output(
                    "conditioning",
                    display_name="conditioning",
                    tooltip="Global + masked region conditioning for any ComfyUI sampler "
                    "(empty unless a CLIP is connected).",
                ),
                io.Mask.Output(
                    "region_masks",
                    display_name="region_masks",
                    tooltip="One mask per region, [regions, height, width].",
                ),
                io.Mask.Output(
                    "background_mask", display_name="background_mask", tooltip="Where no region is, [1, height, width]."
                ),
                io.Image.Output("preview", display_name="preview", tooltip="The boxes with label and style."),
            ],
        )

    @classmethod
    def execute(
        cls,
        layout,
        width: int,
        height: int,
        feather_px: int,
        overlap: str,
        global_weight: float,
        clip=None,
        latent=None,
        image=None,
    ) -> io.NodeOutput:
        node = "MEPG Region Mask Builder"
        check_number(node, "global_weight", global_weight, 0)
        check_number(node, "feather_px", feather_px, 0)
        if latent is not None:
            samples = latent["samples"]
            height, width = int(samples.shape[-2]) * LATENT_FACTOR, int(samples.shape[-1]) * LATENT_FACTOR
        if not layout.regions:
            raise ValueError("MEPG Region Mask Builder: the layout has no regions")
        region_set = build_region_set(
            layout, width, height, factor=LATENT_FACTOR, feather_px=float(feather_px), overlap=overlap
        )
        conditioning = []
        if clip is not None:
            region_set.global_conditioning = encode_text(clip, layout.global_prompt)
            for spec in region_set.regions:
                spec.conditioning = encode_text(clip, region_text(spec.prompt, spec.style))
            conditioning = combined_conditioning(region_set, global_weight)

        background = image[0].cpu().numpy() if image is not None else None
        preview = torch.from_numpy(draw_layout(layout, width, height, background))[None]
        return io.NodeOutput(
            region_set,
            conditioning,
            region_set.pixel_masks(),
            region_set.background[None],
            preview,
            ui=ui.PreviewImage(preview, cls=cls),
        )
