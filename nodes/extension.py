"""The pack's ComfyExtension: the list ComfyUI registers."""

import logging

from comfy_api.latest import ComfyExtension, io

from ..mepg_core.host_support import support_warning
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

_warned = False


def warn_if_unsupported() -> str | None:
    """Log once per process when this ComfyUI is older than the oldest one the pack is tested on."""
    global _warned
    try:
        import comfyui_version

        version = str(comfyui_version.__version__)
    except (ImportError, AttributeError):
        version = None
    message = support_warning(version)
    if message is not None and not _warned:
        logging.getLogger("mepg").warning(message)
        _warned = True
    return message


warn_if_unsupported()


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
