"""The pack's ComfyExtension: the list ComfyUI registers."""

from comfy_api.latest import ComfyExtension, io

from .cross_denoise_advanced import CrossDenoiseKSamplerAdvanced
from .cross_denoise_nodes import CrossDenoiseGuiderNode, CrossDenoiseKSampler
from .editor_nodes import LayoutEditor
from .expert_nodes import ExpertStackLoader, GatedMoEPatch, LoRAExpertLoader
from .gate_training_nodes import SaveMoEGate, TrainMoEGate
from .layout_nodes import LayoutFromJSON
from .planner_nodes import LLMLayoutPlanner
from .region_nodes import RegionMaskBuilder
from .regional_routing_nodes import RegionalMoERouting
from .routes import register_routes

register_routes()  # /mepg/* for the layout editor, only when ComfyUI's server exists


class MEPGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LayoutFromJSON, RegionMaskBuilder, ExpertStackLoader, LoRAExpertLoader, GatedMoEPatch,
            RegionalMoERouting,
            CrossDenoiseKSampler, CrossDenoiseKSamplerAdvanced, CrossDenoiseGuiderNode,
            LLMLayoutPlanner,
            LayoutEditor,
            TrainMoEGate, SaveMoEGate,
        ]
