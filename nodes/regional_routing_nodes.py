"""Regional MoE Routing: a Gated MoE model that routes each region to its experts in any sampler."""

from __future__ import annotations

from comfy_api.latest import io

from .expert_nodes import ATTACHMENT
from .moe_composition import REGIONAL_KEY, RegionalRouting
from .types import CATEGORY, RegionsType

ROUTE_MODES = {"region expert": "own", "favour region expert": "favour"}
OTHER_SHAPES = ("refuse", "gate")


class RegionalMoERouting(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_RegionalMoERouting",
            display_name="Regional MoE Routing (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Makes a Gated MoE model route the tokens inside each region to that region's expert (its forced "
                "expert or its style's experts) in every sampler: KSampler, KSamplerAdvanced, SamplerCustom, "
                "detailers and upscalers that sample the whole picture. Latents of another size but the same "
                "shape (hires fix, upscaled latents) get the layout rescaled. The MEPG Cross-Denoise samplers "
                "route their own passes and ignore this."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A Gated MoE Patch output."),
                RegionsType.Input("regions", tooltip="Regions from Region Mask Builder (a CLIP is not needed)."),
                io.Combo.Input("route", options=list(ROUTE_MODES), default="region expert",
                               tooltip="region expert: a region's tokens use its forced expert alone, or the gate "
                                       "restricted to its style's experts (style prior x gate), as in its "
                                       "Cross-Denoise window. favour region expert: the gate "
                                       "decides, with the region's experts favoured by the patch's "
                                       "global_region_bias, as in Cross-Denoise global steps. Regions without "
                                       "expert or style, and tokens outside every region, use the gate."),
                io.Combo.Input("other_shapes", options=list(OTHER_SHAPES), default="refuse",
                               tooltip="A sampler call on a latent of another shape (a detailer's crop, a tile) "
                                       "cannot be placed on the layout. refuse: stop with an error; gate: route "
                                       "such calls by the gate alone (logged)."),
            ],
            outputs=[io.Model.Output("routed_model", display_name="model",
                                     tooltip="A clone of the model that routes regions to their experts.")],
        )

    @classmethod
    def execute(cls, model, regions, route, other_shapes) -> io.NodeOutput:
        attachment = model.get_attachment(ATTACHMENT)
        if attachment is None:
            raise ValueError("MEPG Regional MoE Routing: this model is not MoE-patched; connect the MODEL output of "
                             "a 'Gated MoE Patch (MEPG)' node")
        if route not in ROUTE_MODES:
            raise ValueError(f"MEPG Regional MoE Routing: route must be one of {', '.join(ROUTE_MODES)}, got {route!r}")
        if other_shapes not in OTHER_SHAPES:
            raise ValueError(f"MEPG Regional MoE Routing: other_shapes must be one of {', '.join(OTHER_SHAPES)}")
        spec = RegionalRouting(regions, ROUTE_MODES[route], other_shapes)
        try:
            spec.routes(attachment.routing)  # unknown expert names fail here, not in the middle of sampling
        except ValueError as exc:
            raise ValueError(f"MEPG Regional MoE Routing: {exc}") from None
        routed = model.clone()
        routed.model_options["transformer_options"][REGIONAL_KEY] = spec
        return io.NodeOutput(routed)
