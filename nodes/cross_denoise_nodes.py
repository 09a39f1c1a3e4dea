"""CrossDenoiseKSampler and CrossDenoiseGuider: region windows first, then global denoising.

The guider is a ``comfy.samplers.CFGGuider``: every ComfyUI sampler and scheduler drives it, and only
the prediction of each step changes (see ``mepg_core.cross_denoise`` for the schedule and fusion).
"""

from __future__ import annotations

import contextlib
import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..mepg_core import cross_denoise as cd
from ..mepg_core.regions import RegionSet, build_region_set
from .checks import check_choice, check_number
from .types import CATEGORY, RegionsType
from .window_conditioning import WindowConditioning, region_pass_conditioning

log = logging.getLogger("mepg")


class CrossDenoiseGuider(comfy.samplers.CFGGuider):
    """CFG guidance whose prediction follows the cross-denoise schedule.

    ``routing``: optional :class:`~mepg_core.moe_routing.MoERouting` (a Gated MoE model carries one);
    each pass is announced to it so the gated blocks route tokens to the right expert.
    """

    def __init__(self, model_patcher, region_set: RegionSet, settings: cd.CrossDenoiseSettings, routing=None):
        super().__init__(model_patcher)
        settings.validate()
        self.region_set = region_set
        self.settings = settings
        self.routing = routing
        self.stats = {"local_steps": 0, "global_steps": 0, "passes": []}
        # A hand-off run (start/end steps) covers steps step_offset… of a total_steps schedule; the stage
        # plan follows the whole schedule's step numbers (None: the steps of this run are the schedule).
        self.step_offset = 0
        self.total_steps: int | None = None
        self._windows: WindowConditioning | None = None

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        for spec in self.region_set.regions:
            if spec.conditioning is None:
                raise ValueError(
                    f"MEPG Cross-Denoise: region {spec.index} ({spec.label!r}) has no conditioning; "
                    "connect a CLIP to Region Mask Builder")
            conds[f"mepg_region_{spec.index}"] = region_pass_conditioning(spec.conditioning, positive, spec.label)
        self.inner_set_conds(conds)

    # -- sampling ----------------------------------------------------------------------------------
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                     seed, latent_shapes=None):
        self._noise = noise
        self._latent_in = latent_image
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            self._latent_in = self.inner_model.process_latent_in(latent_image)
        self._sigma_values = [float(v) for v in sigmas.detach().float().cpu()]
        self._plan = self._make_plan(noise.shape[-2], noise.shape[-1], self.total_steps or len(sigmas) - 1)
        self._windows = WindowConditioning(tuple(noise.shape[-2:]))
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, latent_shapes=latent_shapes)
        finally:
            self._windows.cleanup()
            self._windows = None

    def _make_plan(self, height: int, width: int, n_steps: int) -> cd.LocalPlan:
        rs = self.region_set
        if (rs.latent_height, rs.latent_width) != (height, width):
            rs = build_region_set(rs.layout, width * rs.factor, height * rs.factor, factor=rs.factor,
                                  feather_px=rs.feather_px, overlap=rs.overlap)
        boxes = [spec.latent_box for spec in rs.regions]
        return cd.make_local_plan(rs.latent_masks(), boxes, self.settings, n_steps,
                                  region_weights=[spec.weight for spec in rs.regions])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.flatten()[0])
        step = self.step_offset + cd.step_index(sigma, self._sigma_values)
        kind = cd.stage(step, self._plan.n_steps, self.settings)
        if kind == cd.GLOBAL:
            self.stats["global_steps"] += 1
            if self.settings.global_mode == "bias" or not self._plan.n_regions:
                self.stats["passes"].append((step, "global", tuple(x.shape[-2:])))
                with self._route("global", None, None):
                    return _finite(super().predict_noise(x, timestep, model_options, seed), step, "global")
            alpha_g = cd.global_alpha(step, self._plan.n_steps, self.settings)

            def fused(pass_index: int, x_in: torch.Tensor) -> torch.Tensor:
                if pass_index < self._plan.n_regions:
                    return self._region_pass(step, pass_index, x_in, timestep, model_options, seed, "global_")
                comfy.model_management.throw_exception_if_processing_interrupted()
                self.stats["passes"].append((step, "global", tuple(x_in.shape[-2:])))
                # The global expert: the gate alone routes this pass; regions act through alpha_g.
                with self._route("global", None, None, with_regions=False):
                    out = comfy.samplers.CFGGuider.predict_noise(self, x_in, timestep, model_options, seed)
                return _finite(out, step, "global")

            return cd.global_step(x, self._plan, alpha_g, fused)

        self.stats["local_steps"] += 1
        alpha = cd.local_alpha(step, self._plan.n_steps, self.settings)
        ms = self.inner_model.model_sampling
        x_ref = ms.noise_scaling(timestep.reshape(-1)[:1].to(x.dtype), self._noise.to(x),
                                 self._latent_in.to(x), max_denoise=False)

        def denoise(pass_index: int, x_in: torch.Tensor) -> torch.Tensor:
            if pass_index < self._plan.n_regions:
                return self._region_pass(step, pass_index, x_in, timestep, model_options, seed)
            comfy.model_management.throw_exception_if_processing_interrupted()
            window = self._background_window(alpha, x_in)
            if window is not None and (window[3] - window[1], window[2] - window[0]) != tuple(x_in.shape[-2:]):
                raise RuntimeError(f"MEPG Cross-Denoise: background pass on {tuple(x_in.shape[-2:])}, window {window}")
            positive, negative = self._pass_conds("positive", window)
            self.stats["passes"].append((step, "background", tuple(x_in.shape[-2:])))
            with self._route("local", None, window):
                out = comfy.samplers.sampling_function(self.inner_model, x_in, timestep, negative, positive,
                                                       self.cfg, model_options=model_options, seed=seed)
            return _finite(out, step, "background")

        return cd.local_step(x, x_ref, self._plan, alpha, denoise)

    def _region_pass(self, step: int, index: int, x_in: torch.Tensor, timestep, model_options, seed,
                     prefix: str = "") -> torch.Tensor:
        """Region ``index``'s prediction on its window crop ``x_in``: its prompt, routed to its experts."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        name, window = f"{prefix}region_{index}", self._plan.windows[index]
        if (window[3] - window[1], window[2] - window[0]) != tuple(x_in.shape[-2:]):
            raise RuntimeError(f"MEPG Cross-Denoise: {name} pass on {tuple(x_in.shape[-2:])}, window {window}")
        positive, negative = self._pass_conds(f"mepg_region_{index}", window)
        self.stats["passes"].append((step, name, tuple(x_in.shape[-2:])))
        with self._route("local", index, window):
            out = comfy.samplers.sampling_function(self.inner_model, x_in, timestep, negative, positive,
                                                   self.cfg, model_options=model_options, seed=seed)
        return _finite(out, step, f"{name} ({self.region_set.regions[index].label!r})")

    def _pass_conds(self, cond_key: str, window):
        """(positive, negative) processed conditions of a pass on ``window`` (None: the whole latent)."""
        crop = self._windows.crop
        return crop(cond_key, self.conds.get(cond_key), window), crop("negative", self.conds.get("negative"), window)

    def _background_window(self, alpha: float, x_in: torch.Tensor):
        """The window of a background pass (the one ``cd.local_step`` cut), or None for the whole latent."""
        if tuple(x_in.shape[-2:]) == tuple(self._plan.masks.shape[-2:]):
            return None
        _, bg_weight = cd.fusion_weights(self._plan, alpha)
        return cd.background_window(bg_weight, self.settings.context_margin, self.settings.align)

    def _route(self, kind, region_index, window, with_regions: bool = True):
        """Announce a pass to the MoE routing; ``with_regions=False``: a global pass routed by the gate alone."""
        if self.routing is None:
            return contextlib.nullcontext()
        if not with_regions:
            return self.routing.enter(kind, region_index, (), None)
        return self.routing.enter(kind, region_index, self.region_set.regions, self._plan.masks)


def _finite(prediction: torch.Tensor, step: int, what: str) -> torch.Tensor:
    """The prediction, or a clear error where it has NaN/Inf values (which would decode to a black image)."""
    if not bool(torch.isfinite(prediction).all()):
        raise ValueError(f"MEPG Cross-Denoise: the {what} prediction at step {step + 1} has NaN or infinite values; "
                         "a model, expert, LoRA or gate weight or a setting upstream is not finite. Stopped here "
                         "instead of returning a black image.")
    return prediction


def model_routing(model):
    """The MoE routing a Gated MoE Patch attached to this model, or None for a plain model."""
    attachment = model.get_attachment("mepg_moe")
    return None if attachment is None else attachment.routing


DEFAULT_GLOBAL = cd.CrossDenoiseSettings()


def settings_from_inputs(p1: float, interleave: int, alpha_start: float, alpha_end: float,
                         context_margin_px: int, node: str = "MEPG Cross-Denoise",
                         global_phase: str = DEFAULT_GLOBAL.global_mode,
                         global_alpha_start: float = DEFAULT_GLOBAL.global_alpha_start,
                         global_alpha_end: float = DEFAULT_GLOBAL.global_alpha_end) -> cd.CrossDenoiseSettings:
    for name, value, lo, hi in (("p1", p1, 0, 1), ("interleave", interleave, 0, None),
                                ("alpha_start", alpha_start, 0, 1), ("alpha_end", alpha_end, 0, 1),
                                ("context_margin_px", context_margin_px, 0, None),
                                ("global_alpha_start", global_alpha_start, 0, 1),
                                ("global_alpha_end", global_alpha_end, 0, 1)):
        check_number(node, name, value, lo, hi)
    check_choice(node, "global_phase", global_phase, cd.GLOBAL_MODES)
    return cd.CrossDenoiseSettings(p1=p1, interleave=interleave, alpha_start=alpha_start, alpha_end=alpha_end,
                                   context_margin=-(-context_margin_px // 8), align=4, global_mode=global_phase,
                                   global_alpha_start=global_alpha_start, global_alpha_end=global_alpha_end)


def global_phase_inputs() -> list:
    """Optional (so workflows saved before them load, with these defaults); the last inputs of each node."""
    return [
        io.Combo.Input("global_phase", options=list(cd.GLOBAL_MODES), default=DEFAULT_GLOBAL.global_mode,
                       optional=True,
                       tooltip="How regions take part in global steps. fusion (the paper's): the global pass "
                               "plus each region's window with its own prompt and expert, blended inside its "
                               "mask by global_alpha (costs 1 + window coverage passes per global step). bias: "
                               "one pass, the MoE gate favouring each region's experts inside its mask by the "
                               "patch's global_region_bias (region prompts take no part; cheaper)."),
        io.Float.Input("global_alpha_start", default=DEFAULT_GLOBAL.global_alpha_start, min=0.0, max=1.0,
                       step=0.05, optional=True,
                       tooltip="fusion: a region's weight inside its mask at the first global-phase step (and "
                               "at global steps interleaved in the local phase); the global pass gets the rest. "
                               "Below 0.5 the global pass leads, as in the paper."),
        io.Float.Input("global_alpha_end", default=DEFAULT_GLOBAL.global_alpha_end, min=0.0, max=1.0, step=0.05,
                       optional=True,
                       tooltip="fusion: a region's weight at the last step; it moves linearly between the two. "
                               "0 = the last step is the global pass alone (one pass, seams finished by it)."),
    ]


def schedule_inputs() -> list:
    return [
        io.Float.Input("p1", default=0.7, min=0.0, max=1.0, step=0.05,
                       tooltip="Share of the steps denoised region by region (local) before global steps. "
                               "0 = plain global sampling. The paper used 0.7 (0.5 for GenEval)."),
        io.Int.Input("interleave", default=4, min=0, max=100,
                     tooltip="During the local phase every n-th step is a global step, to keep the picture "
                             "aligned. 0 = never."),
        io.Float.Input("alpha_start", default=1.0, min=0.0, max=1.0, step=0.05,
                       tooltip="Weight of a region's own prediction inside its mask at the first local step "
                               "(1 = the region alone decides there; lower lets the global prompt blend in)."),
        io.Float.Input("alpha_end", default=1.0, min=0.0, max=1.0, step=0.05,
                       tooltip="Region weight at the last local step; alpha moves linearly between the two."),
        io.Int.Input("context_margin_px", default=32, min=0, max=1024, step=8,
                     tooltip="Each region's window is its box grown by this many pixels of context (then to a "
                             "multiple of 32 px), so objects are drawn with their surroundings in view. "
                             "Larger margins cost more time in the local phase."),
    ]


def sampling_inputs() -> list:
    """cfg, sampler, scheduler and the two prompts, in the order both Cross-Denoise KSamplers show them."""
    return [
        io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, for every region and global pass."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Any ComfyUI sampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Any ComfyUI scheduler."),
        io.Conditioning.Input("positive", tooltip="The global prompt's conditioning (whole picture)."),
        io.Conditioning.Input("negative", tooltip="The negative conditioning, used by every pass."),
    ]


class CrossDenoiseKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_CrossDenoiseKSampler",
            display_name="Cross-Denoise KSampler (MEPG)",
            category=f"{CATEGORY}/sampling",
            description=(
                "A KSampler that denoises each region of the layout in its own window with its own prompt "
                "(and expert, with a Gated MoE model) for the first p1 of the steps, then the whole picture "
                "with the global prompt. One full-canvas region with the global prompt equals a plain KSampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (a Gated MoE Patch output routes regions to experts)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed for the initial noise."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Number of denoising steps."),
                *sampling_inputs(),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (empty, or an image for img2img)."),
                RegionsType.Input("regions", tooltip="Regions from Region Mask Builder (with a CLIP connected)."),
                *schedule_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 keeps part of the input latent (img2img); p1 applies to the "
                                       "steps actually run."),
                *global_phase_inputs(),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, regions,
                p1, interleave, alpha_start, alpha_end, context_margin_px, denoise,
                global_phase=DEFAULT_GLOBAL.global_mode, global_alpha_start=DEFAULT_GLOBAL.global_alpha_start,
                global_alpha_end=DEFAULT_GLOBAL.global_alpha_end) -> io.NodeOutput:
        settings = settings_from_inputs(p1, interleave, alpha_start, alpha_end, context_margin_px,
                                        node="MEPG Cross-Denoise KSampler", global_phase=global_phase,
                                        global_alpha_start=global_alpha_start, global_alpha_end=global_alpha_end)
        samples = run_cross_denoise(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image, regions, settings, denoise)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)


def run_cross_denoise(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, regions,
                      settings, denoise, routing=None, *, disable_noise=False, start_step=None, last_step=None,
                      force_full_denoise=False):
    """The KSampler path (noise, sigmas, preview callback) with the cross-denoise guider.

    ``disable_noise`` / ``start_step`` / ``last_step`` / ``force_full_denoise`` mean what they mean to
    ComfyUI's ``common_ksampler`` (KSamplerAdvanced); the stage plan then numbers steps on the whole
    ``steps`` schedule, so a run split into hand-offs has the same local and global steps as one run.
    """
    node = "MEPG Cross-Denoise KSampler"
    check_number(node, "cfg", cfg, 0)
    check_number(node, "denoise", denoise, 0, 1)
    check_number(node, "steps", steps, 1)
    # ComfyUI's KSampler silently replaces an unknown scheduler or sampler by its first one.
    check_choice(node, "sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS)
    check_choice(node, "scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    sigmas = ksampler.sigmas
    total_steps = None
    if start_step is not None or last_step is not None:
        total_steps = len(sigmas) - 1
        sigmas = handoff_sigmas(sigmas, start_step, last_step, force_full_denoise)
        if sigmas is None:  # starts at or after the last step: nothing to do (as KSamplerAdvanced)
            return latent_image
    if sigmas.shape[-1] == 0:
        return latent_image
    guider = CrossDenoiseGuider(model, regions, settings, routing=routing or model_routing(model))
    if total_steps is not None:
        guider.total_steps, guider.step_offset = total_steps, int(start_step or 0)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


def handoff_sigmas(sigmas: torch.Tensor, start_step: int | None, last_step: int | None,
                   force_full_denoise: bool) -> torch.Tensor | None:
    """The part of a schedule a start/end-step run samples, exactly as ``comfy.samplers.KSampler.sample``
    cuts it; None when the run starts at or after the last step."""
    sigmas = sigmas.clone()
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


class CrossDenoiseGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_CrossDenoiseGuider",
            display_name="Cross-Denoise Guider (MEPG)",
            category=f"{CATEGORY}/sampling",
            description="The cross-denoise schedule as a GUIDER for SamplerCustomAdvanced (any sampler, "
                        "sigmas and noise source).",
            inputs=[
                io.Model.Input("model", tooltip="The model (a Gated MoE Patch output routes regions to experts)."),
                io.Conditioning.Input("positive", tooltip="The global prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning."),
                RegionsType.Input("regions", tooltip="Regions from Region Mask Builder (with a CLIP connected)."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                *schedule_inputs(),
                *global_phase_inputs(),
            ],
            outputs=[io.Guider.Output("guider", display_name="guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, regions, cfg, p1, interleave, alpha_start, alpha_end,
                context_margin_px, global_phase=DEFAULT_GLOBAL.global_mode,
                global_alpha_start=DEFAULT_GLOBAL.global_alpha_start,
                global_alpha_end=DEFAULT_GLOBAL.global_alpha_end) -> io.NodeOutput:
        settings = settings_from_inputs(p1, interleave, alpha_start, alpha_end, context_margin_px,
                                        node="MEPG Cross-Denoise Guider", global_phase=global_phase,
                                        global_alpha_start=global_alpha_start, global_alpha_end=global_alpha_end)
        check_number("MEPG Cross-Denoise Guider", "cfg", cfg, 0)
        guider = CrossDenoiseGuider(model, regions, settings, routing=model_routing(model))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
