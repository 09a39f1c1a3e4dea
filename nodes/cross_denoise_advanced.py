"""Cross-Denoise KSampler Advanced: the cross-denoise sampler with KSamplerAdvanced's hand-off inputs."""

from __future__ import annotations

from comfy_api.latest import io

from .cross_denoise_nodes import (
    DEFAULT_GLOBAL,
    global_phase_inputs,
    run_cross_denoise,
    sampling_inputs,
    schedule_inputs,
    settings_from_inputs,
)
from .types import CATEGORY, RegionsType


class CrossDenoiseKSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_CrossDenoiseKSamplerAdvanced",
            display_name="Cross-Denoise KSampler Advanced (MEPG)",
            category=f"{CATEGORY}/sampling",
            description=(
                "The Cross-Denoise KSampler with KSamplerAdvanced's controls, to hand a latent on to or take it "
                "over from other samplers: add_noise, start/end step and return with leftover noise mean what they "
                "mean there. p1 and interleave count steps of the whole schedule (steps), so splitting a run "
                "keeps its local and global steps where they were."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (a Gated MoE Patch output routes regions to experts)."),
                io.Combo.Input("add_noise", options=["enable", "disable"], default="enable",
                               tooltip="disable when the latent already holds its noise (taken over from a "
                                       "sampler that returned with leftover noise)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed for the added noise."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Steps of the whole schedule."),
                *sampling_inputs(),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                RegionsType.Input("regions", tooltip="Regions from Region Mask Builder (with a CLIP connected)."),
                io.Int.Input("start_at_step", default=0, min=0, max=10000,
                             tooltip="The first step of the schedule this node runs."),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                             tooltip="The step it stops at (exclusive)."),
                io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], default="disable",
                               tooltip="enable: stop at end_at_step's noise level, for another sampler to finish; "
                                       "disable: denoise fully at the last step run."),
                *schedule_inputs(),
                *global_phase_inputs(),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The (partly) denoised latent.")],
        )

    @classmethod
    def execute(cls, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, regions, start_at_step, end_at_step, return_with_leftover_noise, p1, interleave,
                alpha_start, alpha_end, context_margin_px, global_phase=DEFAULT_GLOBAL.global_mode,
                global_alpha_start=DEFAULT_GLOBAL.global_alpha_start,
                global_alpha_end=DEFAULT_GLOBAL.global_alpha_end) -> io.NodeOutput:
        settings = settings_from_inputs(p1, interleave, alpha_start, alpha_end, context_margin_px,
                                        node="MEPG Cross-Denoise KSampler Advanced", global_phase=global_phase,
                                        global_alpha_start=global_alpha_start, global_alpha_end=global_alpha_end)
        samples = run_cross_denoise(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image, regions, settings, 1.0, disable_noise=add_noise == "disable",
                                    start_step=start_at_step, last_step=end_at_step,
                                    force_full_denoise=return_with_leftover_noise != "enable")
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)
