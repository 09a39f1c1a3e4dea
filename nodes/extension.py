"""The pack's ComfyExtension: the list ComfyUI registers."""

from comfy_api.latest import ComfyExtension, io

from .cross_denoise_nodes import CrossDenoiseGuiderNode, CrossDenoiseKSampler
from .expert_nodes import ExpertStackLoader, GatedMoEPatch, LoRAExpertLoader
from .layout_nodes import LayoutFromJSON
from .planner_nodes import LLMLayoutPlanner
from .region_nodes import RegionMaskBuilder


class MEPGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LayoutFromJSON, RegionMaskBuilder, ExpertStackLoader, LoRAExpertLoader, GatedMoEPatch,
            CrossDenoiseKSampler, CrossDenoiseGuiderNode,
            LLMLayoutPlanner,
        ]
