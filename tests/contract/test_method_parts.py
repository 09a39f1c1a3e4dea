"""Parts of the method that the headline equivalences skip, checked in real ComfyUI on the tiny models.

The equivalences (one expert ⇒ w ≡ 1, a full-canvas region has no background, p1 = 0 never runs a local
step) hold by construction whatever the background pass, alpha, interleaving, step indexing or global-step
routing do. Each test here runs the real tiny SDXL denoiser through the nodes and compares against a
reference that does not share the code under test; its docstring names the planted bug it kills
(``tools/mutation_check.py`` plants them).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

W, H, SEED, CFG = 256, 192, 5, 4.0
BASE = {"interleave": 0, "alpha_start": 1.0, "alpha_end": 1.0, "context_margin_px": 32}


@pytest.fixture(scope="module")
def env(comfy, tiny_checkpoints):
    loader = comfy.node("CheckpointLoaderSimple")()
    base, clip, _ = loader.load_checkpoint(tiny_checkpoints["base"].name)[:3]
    anime = loader.load_checkpoint(tiny_checkpoints["anime"].name)[0]

    def enc(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return {"base": base, "anime": anime, "clip": clip, "enc": enc, "neg": enc("blurry")}


def regions(comfy, env, *specs, feather_px=0):
    layout = {"version": 1, "global_prompt": "a garden", "regions": [
        {"label": label, "prompt": prompt, "box": box, **extra} for label, prompt, box, *rest in specs
        for extra in [rest[0] if rest else {}]]}
    lay = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    return comfy.node("MEPG_RegionMaskBuilder").execute(lay, width=W, height=H, feather_px=feather_px,
                                                        overlap="smaller_on_top", global_weight=0.5,
                                                        clip=env["clip"]).args[0]


CAT = ("cat", "a black cat", [0, 0, 500, 1000])  # the left half: 16 of the latent's 32 columns


def empty():
    return {"samples": torch.zeros(1, 4, H // 8, W // 8)}


def cross(comfy, env, model, regs, *, steps, p1, global_prompt="a garden", sampler="euler", **kw):
    return comfy.node("MEPG_CrossDenoiseKSampler").execute(
        model, SEED, steps, CFG, sampler, "normal", env["enc"](global_prompt), env["neg"], empty(), regs,
        p1=p1, denoise=1.0, **{**BASE, **kw}).args[0]["samples"]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------- routing


SITE_SUFFIXES = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".ff")


class _ReferenceSite(nn.Module):
    """``w_base · base(x) + w_anime · anime(x)`` per token: tokens of the region's cells on the anime
    expert alone, every other token (and text tokens) half and half. Built from the two checkpoints'
    own modules; knows nothing of the pack."""

    def __init__(self, base_module, anime_module, spatial: bool, inside: torch.Tensor):
        super().__init__()
        self.base_module, self.anime_module, self.spatial, self.inside = base_module, anime_module, spatial, inside

    def forward(self, x, *args, **kwargs):
        b, a = self.base_module(x, *args, **kwargs), self.anime_module(x, *args, **kwargs)
        w_anime = torch.full((x.shape[1],), 0.5)
        if self.spatial:
            h, w = self.inside.shape
            f = 1
            while -(-h // f) * -(-w // f) != x.shape[1]:
                f *= 2
            w_anime = torch.where(self.inside[::f, ::f].reshape(-1), 1.0, 0.5)
        w_anime = w_anime.to(x)[None, :, None]
        return (1 - w_anime) * b + w_anime * a


def test_global_steps_route_a_regions_tokens_to_its_expert(comfy, env, tiny_checkpoints):
    """Bias mode, global_region_bias 1, uniform gates, every step global (p1 = 0), a region on the left half
    forced to 'anime': the region's tokens must be the anime expert's alone and the rest half base, half
    anime. The reference is the base checkpoint with every q/k/v and FF module replaced by that per-token
    mix of the base's and the anime checkpoint's own modules, run by a plain KSampler.

    Planted bug this kills: global steps that ignore each region's own experts (a prior of ones: the
    region's tokens get the uniform mix)."""
    regs = regions(comfy, env, ("cat", "a black cat", [0, 0, 500, 1000], {"expert": "anime"}))
    stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints["anime"].name, "anime", "anime").args[0]
    moe = comfy.node("MEPG_GatedMoEPatch").execute(env["base"], stack, True, "uniform", "none", "", 0, True, 1.0,
                                                   1.0).args[0]
    got = cross(comfy, env, moe, regs, steps=3, p1=0.0, global_phase="bias")

    import comfy.model_management as mm

    inside = torch.zeros(H // 8, W // 8, dtype=torch.bool)
    inside[:, : W // 16] = True
    ref_model = env["base"].clone()
    mm.unload_all_models()  # a MoE patch left applied on the shared base model would hide its own modules
    base_net, anime_net = env["base"].model.diffusion_model, env["anime"].model.diffusion_model
    anime_modules = dict(anime_net.named_modules())
    count = 0
    for path, module in base_net.named_modules():
        if ".transformer_blocks." in path and path.endswith(SITE_SUFFIXES):
            spatial = not path.endswith((".attn2.to_k", ".attn2.to_v"))
            ref_model.add_object_patch(f"diffusion_model.{path}",
                                       _ReferenceSite(module, anime_modules[path], spatial, inside))
            count += 1
            assert not type(module).__name__.startswith("Gated"), path
    assert count == len(moe.get_attachment("mepg_moe").stack.blocks) * 7
    ref = comfy.nodes.common_ksampler(ref_model, SEED, 3, CFG, "euler", "normal", env["enc"]("a garden"),
                                      env["neg"], empty())[0]["samples"]
    assert rel(got, ref) <= 1e-4, rel(got, ref)
    uniform = comfy.nodes.common_ksampler(moe, SEED, 3, CFG, "euler", "normal", env["enc"]("a garden"),
                                          env["neg"], empty())[0]["samples"]
    assert rel(uniform, ref) > 1e-3  # the region's routing is visible in the output


# ---------------------------------------------------------------------------------------------- background


def test_the_background_pass_draws_outside_the_regions_with_the_global_prompt(comfy, env):
    """All steps local (p1 = 1, no interleave), one region on the left half, no feather: the global prompt
    reaches the picture only through the background pass. Changing it must change the right half and,
    at one step (the output is the fused prediction itself), leave the region's cells untouched.

    Planted bugs this kills: skipping the background pass (the right half no longer depends on the global
    prompt); running it on the region's cells (the region's cells change with the global prompt)."""
    regs = regions(comfy, env, CAT)
    inside = regs.regions[0].latent_mask > 0
    for steps in (1, 3):
        a = cross(comfy, env, env["base"], regs, steps=steps, p1=1.0, global_prompt="a garden")
        b = cross(comfy, env, env["base"], regs, steps=steps, p1=1.0, global_prompt="a snowy city at night")
        diff = (a - b).abs().amax(dim=(0, 1))
        assert diff[~inside].min() > 1e-3, (steps, diff[~inside].min())  # every background cell follows it
        if steps == 1:
            assert diff[inside].max() == 0


# ---------------------------------------------------------------------------------------------- alpha


@pytest.mark.parametrize("phase", ["local", "global"])
def test_alpha_blends_the_region_and_the_other_pass_linearly(comfy, env, phase):
    """One step, so the output is the fused prediction. Local (p1 = 1): inside the region
    ``out(a) = a·D_region + (1 - a)·D_background``; global (fusion, p1 = 0):
    ``out(a) = a·m·D_region + (1 - a·m)·D_global`` everywhere. With the passes' predictions taken from the
    runs at a = 1 and a = 0, a = 0.5 must be their mean (the passes see the same input at every a), and
    must differ from both.

    Planted bugs this kills: alpha ignored in the local fusion or in the global schedule (out(0.5) = out(1)),
    the global-alpha schedule read at the wrong step."""
    regs = regions(comfy, env, CAT)
    inside = regs.regions[0].latent_mask > 0
    if phase == "local":
        def run(a):
            return cross(comfy, env, env["base"], regs, steps=1, p1=1.0, alpha_start=a, alpha_end=a)
    else:
        def run(a):
            return cross(comfy, env, env["base"], regs, steps=1, p1=0.0, global_phase="fusion",
                         global_alpha_start=a, global_alpha_end=0.0)
    one, zero, half = run(1.0), run(0.0), run(0.5)
    where = inside if phase == "local" else torch.ones_like(inside)
    mean = (one + zero) / 2
    assert rel(half[..., where], mean[..., where]) <= 1e-5, rel(half[..., where], mean[..., where])
    assert rel(one[..., inside], zero[..., inside]) > 1e-2  # the two passes really differ


# ---------------------------------------------------------------------------------------------- step plan


def hand_off(comfy, env, regs, segments, steps, global_prompt="a garden"):
    """Run ``segments`` [(kind, start, end)] as a chain: local segments by Cross-Denoise KSampler Advanced
    with p1 = 1 (every step local whatever the step index), global ones by ComfyUI's own KSamplerAdvanced."""
    latent, pos = empty(), env["enc"](global_prompt)
    for n, (kind, start, end) in enumerate(segments):
        last = n == len(segments) - 1
        if kind == "local":
            out = comfy.node("MEPG_CrossDenoiseKSamplerAdvanced").execute(
                env["base"], "enable" if n == 0 else "disable", SEED, steps, CFG, "euler", "normal", pos,
                env["neg"], latent, regs, start, end, "disable" if last else "enable", p1=1.0,
                **BASE).args[0]
        else:
            out = comfy.nodes.common_ksampler(env["base"], SEED, steps, CFG, "euler", "normal", pos, env["neg"],
                                              latent, disable_noise=n > 0, start_step=start, last_step=end,
                                              force_full_denoise=last)[0]
        latent = out
    return latent["samples"]


@pytest.mark.parametrize("phase", ["bias", "fusion"])
def test_local_and_global_steps_land_on_the_planned_step_numbers(comfy, env, phase):
    """6 steps, p1 = 0.5: steps 1-3 local, 4-6 global. The reference is a hand-off chain whose local part
    cannot misplace a step (p1 = 1 there) and whose global part is ComfyUI's own KSamplerAdvanced; with a
    region covering the whole canvas the local passes never show the reference latent, so the chain is
    exact. In fusion mode global_alpha is 0 (the global pass alone, as KSamplerAdvanced does).

    Planted bugs this kills: an off-by-one sigma-to-step index (a step moves between the phases), the
    stage rule ``t <= p1·N`` read as ``t < p1·N``."""
    regs = regions(comfy, env, ("all", "a red house", [0, 0, 1000, 1000]))
    got = cross(comfy, env, env["base"], regs, steps=6, p1=0.5, global_phase=phase, global_alpha_start=0.0,
                global_alpha_end=0.0)
    ref = hand_off(comfy, env, regs, [("local", 0, 3), ("global", 3, 6)], 6)
    assert rel(got, ref) <= 1e-5, rel(got, ref)
    wrong = hand_off(comfy, env, regs, [("local", 0, 2), ("global", 2, 6)], 6)
    assert rel(wrong, ref) > 1e-3  # one step moved is visible


def test_the_global_alpha_schedule_falls_step_by_step(comfy, env):
    """Fusion, p1 = 0, 3 steps, global_alpha 0.5 → 0: steps 1-2 fuse the region at 0.5 and 0.25, step 3
    is the global pass alone. Reference: Cross-Denoise KSampler Advanced runs each step on its own with a
    constant global_alpha (0.5, then 0.25), then ComfyUI's KSamplerAdvanced the last step.

    Planted bugs this kills: the schedule ignored (the start value at every global step), or read one
    step off."""
    regs = regions(comfy, env, CAT)
    got = cross(comfy, env, env["base"], regs, steps=3, p1=0.0, global_phase="fusion", global_alpha_start=0.5,
                global_alpha_end=0.0)
    latent, pos = empty(), env["enc"]("a garden")
    for n, a in enumerate((0.5, 0.25)):
        latent = comfy.node("MEPG_CrossDenoiseKSamplerAdvanced").execute(
            env["base"], "enable" if n == 0 else "disable", SEED, 3, CFG, "euler", "normal", pos, env["neg"],
            latent, regs, n, n + 1, "enable", p1=0.0, global_phase="fusion", global_alpha_start=a,
            global_alpha_end=a, **BASE).args[0]
    ref = comfy.nodes.common_ksampler(env["base"], SEED, 3, CFG, "euler", "normal", pos, env["neg"], latent,
                                      disable_noise=True, start_step=2, last_step=3, force_full_denoise=True)[0]
    assert rel(got, ref["samples"]) <= 1e-5, rel(got, ref["samples"])
    constant = cross(comfy, env, env["base"], regs, steps=3, p1=0.0, global_phase="fusion", global_alpha_start=0.5,
                     global_alpha_end=0.5)
    assert rel(constant, got) > 1e-4  # measured 5.5e-4: 55 times the tolerance above


def test_interleaved_global_steps_land_where_the_plan_puts_them(comfy, env):
    """4 steps, p1 = 1, interleave 2: local, global, local, global. Reference: the same hand-off chain.

    Planted bugs this kills: never interleaving (all four steps local), interleaving on the wrong steps
    (``i % n == 0``: global, local, global, local)."""
    regs = regions(comfy, env, ("all", "a red house", [0, 0, 1000, 1000]))
    got = cross(comfy, env, env["base"], regs, steps=4, p1=1.0, interleave=2, global_phase="bias")
    ref = hand_off(comfy, env, regs, [("local", 0, 1), ("global", 1, 2), ("local", 2, 3), ("global", 3, 4)], 4)
    assert rel(got, ref) <= 1e-5, rel(got, ref)
    never = cross(comfy, env, env["base"], regs, steps=4, p1=1.0, interleave=0, global_phase="bias")
    assert rel(never, ref) > 1e-3


def test_every_evaluation_of_a_two_stage_sampler_is_counted_in_the_step_of_its_sigma(comfy, env):
    """heun evaluates at sigma_i and, as step i's corrector, at sigma_(i+1) (not after the last step). An
    evaluation belongs to the step whose interval ``(sigma_(j+1), sigma_j]`` holds its sigma, so the
    corrector at sigma_(i+1) takes step i+1's kind. The guider's pass log of a real run (6 steps, p1 0.7,
    interleave 2: L G L G G G; a local evaluation is 2 passes, region and background) must match that.

    Planted bug this kills: an off-by-one sigma-to-step index (every evaluation one step early or late)."""
    regs = regions(comfy, env, CAT)
    cd = __import__("inprocess").pack_module("mepg_core.cross_denoise")
    guider = comfy.node("MEPG_CrossDenoiseGuider").execute(
        env["base"], env["enc"]("a garden"), env["neg"], regs, CFG, 0.7, 2, 1.0, 1.0, 32,
        global_phase="bias").args[0]
    noise = comfy.node("RandomNoise").execute(SEED).args[0]
    sampler = comfy.node("KSamplerSelect").execute("heun").args[0]
    sigmas = comfy.node("BasicScheduler").execute(env["base"], "normal", 6, 1.0).args[0]
    comfy.node("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, empty())
    plan = cd.stage_plan(6, guider.settings)
    assert plan == ["local", "global", "local", "global", "global", "global"]
    kinds = {}
    for step, name, _ in guider.stats["passes"]:
        kinds.setdefault(step, set()).add("global" if name == "global" else "local")
    assert kinds == {i: {kind} for i, kind in enumerate(plan)}, kinds
    per_step = [sum(1 for s, _, _ in guider.stats["passes"] if s == i) for i in range(6)]
    evaluations = [1] + [2] * 5  # sigma_0 once; sigma_1…sigma_5 as a corrector and as a step's first call
    assert per_step == [n * (2 if kind == "local" else 1) for n, kind in zip(evaluations, plan)], per_step
