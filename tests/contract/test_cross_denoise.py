"""CrossDenoiseKSampler / CrossDenoiseGuider in real ComfyUI on the tiny SDXL fixture."""

from __future__ import annotations

import json

import pytest
import torch

SCHEDULE = {"p1": 0.7, "interleave": 0, "alpha_start": 1.0, "alpha_end": 1.0, "context_margin_px": 32}


@pytest.fixture(scope="module")
def base(comfy, tiny_checkpoints):
    model, clip, vae = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[:3]
    return model, clip


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def regions_for(comfy, clip, layout: dict, width: int, height: int, feather_px: int = 0):
    layout_obj = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    return comfy.node("MEPG_RegionMaskBuilder").execute(
        layout_obj, width=width, height=height, feather_px=feather_px, overlap="smaller_on_top",
        global_weight=0.5, clip=clip).args[0]


def layout_of(global_prompt, *regions):
    return {"version": 1, "global_prompt": global_prompt,
            "regions": [{"label": label, "prompt": prompt, "box": box} for label, prompt, box in regions]}


def cross(comfy, model, clip, regions, latent, *, seed=3, steps=6, sampler="euler", scheduler="normal", cfg=4.0,
          denoise=1.0, global_prompt="a garden", **schedule):
    settings = {**SCHEDULE, **schedule}
    out = comfy.node("MEPG_CrossDenoiseKSampler").execute(
        model, seed, steps, cfg, sampler, scheduler, encode(clip, global_prompt), encode(clip, "blurry"),
        latent, regions, denoise=denoise, **settings).args[0]
    return out["samples"]


def plain(comfy, model, clip, latent, *, seed=3, steps=6, sampler="euler", scheduler="normal", cfg=4.0, denoise=1.0,
          global_prompt="a garden"):
    return comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, encode(clip, global_prompt),
                                       encode(clip, "blurry"), latent, denoise=denoise)[0]["samples"]


def empty(width, height, batch=1):
    return {"samples": torch.zeros(batch, 4, height // 8, width // 8)}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_full_canvas_region_with_global_prompt_equals_plain_ksampler(comfy, base, sampler):
    """Bias mode: exactly (one pass a global step). Fusion: the region's pass is the global pass again, so
    ``(1 - a) D + a D`` differs from ``D`` by rounding only (measured 2.5e-7 … 1.8e-6 relative)."""
    model, clip = base
    regions = regions_for(comfy, clip, layout_of("a garden", ("garden", "a garden", [0, 0, 1000, 1000])), 256, 192)
    latent = empty(256, 192)
    b = plain(comfy, model, clip, latent, sampler=sampler)
    bias = cross(comfy, model, clip, regions, latent, sampler=sampler, interleave=3, global_phase="bias")
    assert (bias - b).abs().max().item() <= 1e-4
    fused = cross(comfy, model, clip, regions, latent, sampler=sampler, interleave=3)
    assert rel_err(fused, b) <= 1e-5, rel_err(fused, b)


def test_p1_zero_is_global_only(comfy, base):
    """Bias mode, or fusion with global_alpha 0, at p1 = 0 is a plain KSampler (one pass a step); fusion
    with the default schedule brings the region prompts into the global steps."""
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]), ("dog", "a dog", [500, 100, 900, 500]))
    regions = regions_for(comfy, clip, layout, 256, 192)
    latent = empty(256, 192)
    b = plain(comfy, model, clip, latent)
    assert torch.equal(cross(comfy, model, clip, regions, latent, p1=0.0, global_phase="bias"), b)
    zero = cross(comfy, model, clip, regions, latent, p1=0.0, global_alpha_start=0.0, global_alpha_end=0.0)
    assert torch.equal(zero, b)
    assert rel_err(cross(comfy, model, clip, regions, latent, p1=0.0), b) > 1e-3


def test_regions_change_the_result(comfy, base):
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, clip, layout, 256, 192)
    latent = empty(256, 192)
    assert rel_err(cross(comfy, model, clip, regions, latent), plain(comfy, model, clip, latent)) > 1e-3


@pytest.mark.parametrize("feather_px,cat_box", [(0, [80, 300, 420, 900]), (16, [80, 300, 420, 900]),
                                                (0, [0, 0, 500, 1000])])
def test_locality_one_region_prompt_changes_only_its_mask(comfy, base, feather_px, cat_box):
    """With no global step yet (p1 = 1, no interleave), a region's prompt reaches nothing outside its mask.
    A cat filling the left half also shrinks the background pass to the right half's window."""
    model, clip = base
    boxes = {"cat": cat_box, "dog": [560, 120, 940, 600]}
    a_layout = layout_of("a garden", ("cat", "a black cat", boxes["cat"]), ("dog", "a brown dog", boxes["dog"]))
    b_layout = layout_of("a garden", ("cat", "a glowing blue robot", boxes["cat"]),
                         ("dog", "a brown dog", boxes["dog"]))
    ra = regions_for(comfy, clip, a_layout, 320, 256, feather_px)
    rb = regions_for(comfy, clip, b_layout, 320, 256, feather_px)
    latent = empty(320, 256)
    xa = cross(comfy, model, clip, ra, latent, p1=1.0, steps=5)
    xb = cross(comfy, model, clip, rb, latent, p1=1.0, steps=5)
    cat_support = ra.regions[0].latent_mask > 0
    diff = (xa - xb).abs().amax(dim=(0, 1))
    assert diff[cat_support].max() > 1e-2  # the changed region really changed
    assert diff[~cat_support].max() == 0, diff[~cat_support].max()


@pytest.mark.parametrize("w,h", [(832, 1216), (1000, 600)])
def test_odd_sizes(comfy, base, w, h):
    model, clip = base
    layout = layout_of("a street", ("car", "a red car", [50, 600, 500, 950]), ("tree", "a tree", [600, 50, 950, 700]))
    regions = regions_for(comfy, clip, layout, w, h, feather_px=24)
    out = cross(comfy, model, clip, regions, empty(w, h), steps=3, global_prompt="a street")
    assert out.shape == (1, 4, h // 8, w // 8) and torch.isfinite(out).all()


def test_regions_built_for_another_size_are_rescaled(comfy, base):
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, clip, layout, 1024, 1024)
    out = cross(comfy, model, clip, regions, empty(256, 192), steps=3)
    assert out.shape == (1, 4, 24, 32)


def test_batch_img2img_and_determinism(comfy, base):
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, clip, layout, 256, 192)
    start = {"samples": torch.randn(2, 4, 24, 32, generator=torch.Generator().manual_seed(0))}
    a = cross(comfy, model, clip, regions, start, denoise=0.5, steps=6)
    b = cross(comfy, model, clip, regions, start, denoise=0.5, steps=6)
    assert a.shape == (2, 4, 24, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    c = cross(comfy, model, clip, regions, start, denoise=0.5, steps=6, seed=4)
    assert not torch.equal(a, c)


def test_guider_with_sampler_custom_advanced_matches_the_ksampler_node(comfy, base):
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, clip, layout, 256, 192)
    latent = empty(256, 192)
    guider = comfy.node("MEPG_CrossDenoiseGuider").execute(
        model, encode(clip, "a garden"), encode(clip, "blurry"), regions, 4.0, **SCHEDULE).args[0]
    noise = comfy.node("RandomNoise").execute(3).args[0]
    sampler = comfy.node("KSamplerSelect").execute("euler").args[0]
    sigmas = comfy.node("BasicScheduler").execute(model, "normal", 6, 1.0).args[0]
    out = comfy.node("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, latent).args[0]["samples"]
    ref = cross(comfy, model, clip, regions, latent)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_missing_region_conditioning_is_a_clear_error(comfy, base):
    model, clip = base
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, None, layout, 256, 192)
    with pytest.raises(ValueError, match=r"region 0 \('cat'\) has no conditioning"):
        cross(comfy, model, clip, regions, empty(256, 192))


def test_cancelling_leaves_nothing_behind(comfy, base, tiny_checkpoints):
    import comfy.model_management as mm
    import inprocess

    moe_routing = inprocess.pack_module("mepg_core.moe_routing")
    model, clip = base
    stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints["anime"].name, "anime", "anime").args[0]
    patched = comfy.node("MEPG_GatedMoEPatch").execute(model, stack, True, "uniform", "none", "", 0, True, 1.0,
                                                       0.5).args[0]
    layout = layout_of("a garden", ("cat", "a black cat", [100, 400, 400, 900]))
    regions = regions_for(comfy, clip, layout, 256, 192)
    latent = empty(256, 192)
    before = cross(comfy, patched, clip, regions, latent)
    plain_before = plain(comfy, model, clip, latent)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            cross(comfy, patched, clip, regions, latent)
    finally:
        mm.interrupt_current_processing(False)
    assert moe_routing.MoERouting.current_pass() is None
    assert torch.equal(cross(comfy, patched, clip, regions, latent), before)
    assert torch.equal(plain(comfy, model, clip, latent), plain_before)


def with_weights(layout: dict, *weights: float) -> dict:
    out = json.loads(json.dumps(layout))
    for region, weight in zip(out["regions"], weights):
        region["weight"] = weight
    return out


def test_region_weight_is_its_strength_in_fusion(comfy, base):
    """Weights 0, 0.5, 1 and 10 give different pictures (10 differs from 1 where masks are feathered or
    overlap); weight 0 equals the layout without that region in the local phase (p1 = 1, no interleave)."""
    model, clip = base
    cat = ("cat", "a black cat", [100, 300, 600, 900])
    dog = ("dog", "a white dog", [450, 100, 900, 600])
    layout = layout_of("a garden", cat, dog)
    latent = empty(128, 96)
    run = dict(steps=3, p1=1.0, interleave=0, context_margin_px=16)
    outs = {}
    for w in (0.0, 0.5, 1.0, 10.0):
        regions = regions_for(comfy, clip, with_weights(layout, w, 1.0), 128, 96, feather_px=16)
        outs[w] = cross(comfy, model, clip, regions, latent, **run)
    for a, b in ((0.0, 0.5), (0.5, 1.0), (1.0, 10.0)):
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    only_dog = regions_for(comfy, clip, layout_of("a garden", dog), 128, 96, feather_px=16)
    without = cross(comfy, model, clip, only_dog, latent, **run)
    assert (outs[0.0] - without).abs().max().item() <= 1e-5
