"""LayoutFromJSON and RegionMaskBuilder inside real ComfyUI, alone and in graphs with a tiny SDXL model."""

from __future__ import annotations

import json

import pytest
import torch

LAYOUT = {
    "version": 1, "canvas": {"width": 1024, "height": 1024}, "global_prompt": "a quiet park at noon",
    "negative_prompt": "",
    "regions": [
        {"label": "dog", "prompt": "a brown dog sitting", "box": [80, 420, 420, 900], "style": "photo"},
        {"label": "bench", "prompt": "a green wooden bench", "box": [500, 500, 950, 850], "style": "anime"},
    ],
}


def build(comfy, layout: dict, **kw):
    layout_obj = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    args = {"width": 1024, "height": 1024, "feather_px": 0, "overlap": "smaller_on_top", "global_weight": 0.5}
    args.update(kw)
    return comfy.node("MEPG_RegionMaskBuilder").execute(layout_obj, **args).args


@pytest.mark.parametrize("w,h", [(832, 1216), (1000, 600), (1024, 1024)])
def test_masks_exact_at_odd_sizes(comfy, w, h):
    regions, _, masks, background, preview = build(comfy, LAYOUT, width=w, height=h)
    assert masks.shape == (2, h, w) and background.shape == (1, h, w) and preview.shape == (1, h, w, 3)
    for spec, mask in zip(regions.regions, masks):
        x1, y1, x2, y2 = spec.pixel_box
        assert mask.sum() == (x2 - x1) * (y2 - y1)
        assert mask[y1:y2, x1:x2].min() == 1
    assert torch.equal(masks.sum(0) + background[0], torch.ones(h, w))


def test_size_comes_from_a_latent(comfy):
    latent = {"samples": torch.zeros(1, 4, 75, 125)}
    regions, _, masks, _, _ = build(comfy, LAYOUT, width=64, height=64, latent=latent)
    assert (regions.width, regions.height) == (1000, 600)
    assert masks.shape == (2, 600, 1000)
    assert regions.latent_masks().shape == (2, 75, 125)


def test_region_conditioning_from_real_clip(comfy, tiny_checkpoints):
    clip = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[1]
    regions, cond, *_ = build(comfy, LAYOUT, clip=clip)
    # background (global, masked) + global everywhere + one entry per region
    assert len(cond) == 4
    assert tuple(cond[0][0].shape) == (1, 77, 2048)
    region_entries = cond[2:]
    for spec, (_tensor, extras) in zip(regions.regions, region_entries):
        assert torch.equal(extras["mask"][0], spec.latent_mask)
        assert extras["mask_strength"] == spec.weight
        assert spec.conditioning is not None
    # The style is part of the encoded region text, so two regions differ even with equal prompts.
    assert not torch.equal(region_entries[0][0], region_entries[1][0])


def test_feather_and_overlap_reach_the_masks(comfy):
    overlapping = json.loads(json.dumps(LAYOUT))
    overlapping["regions"][1]["box"] = [300, 500, 950, 850]
    _, _, hard, _, _ = build(comfy, overlapping, overlap="overlap")
    _, _, excl, bg, _ = build(comfy, overlapping, overlap="smaller_on_top", feather_px=8)
    assert hard.sum(0).max() == 2
    assert torch.allclose(excl.sum(0) + bg[0], torch.ones(1024, 1024), atol=1e-5)


def test_layout_errors_name_the_region(comfy):
    bad = json.loads(json.dumps(LAYOUT))
    bad["regions"][1]["box"] = [10, 10, 10, 90]
    with pytest.raises(ValueError, match=r"regions\[1\]\.box: zero area"):
        comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(bad))


def sampling_prompt(ckpt: str, positive_from_regions: bool, layout: dict, seed: int = 7) -> dict:
    """API-format graph: tiny checkpoint -> (layout -> regions conditioning | plain text) -> KSampler."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "plain": {"class_type": "CLIPTextEncode", "inputs": {"text": layout["global_prompt"], "clip": ["ckpt", 1]}},
        "layout": {"class_type": "MEPG_LayoutFromJSON", "inputs": {"json_text": json.dumps(layout)}},
        "regions": {"class_type": "MEPG_RegionMaskBuilder", "inputs": {
            "layout": ["layout", 0], "width": 1024, "height": 1024, "feather_px": 0, "overlap": "smaller_on_top",
            "global_weight": 0.5, "clip": ["ckpt", 1], "latent": ["latent", 0]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["regions", 1] if positive_from_regions else ["plain", 0],
            "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "mepg_contract"}},
    }
    return prompt


def final_latent(comfy) -> torch.Tensor:
    return comfy.output("sampler")[0][0]["samples"].clone()


def test_region_conditioning_drives_a_real_ksampler(comfy, tiny_checkpoints):
    result = comfy.run(sampling_prompt(tiny_checkpoints["base"].name, True, LAYOUT))
    assert result["outputs"]["save"]["images"], result
    with_regions = final_latent(comfy)
    comfy.run(sampling_prompt(tiny_checkpoints["base"].name, False, LAYOUT))
    plain = final_latent(comfy)
    assert with_regions.shape == (1, 4, 24, 32)
    assert torch.isfinite(with_regions).all()
    assert (with_regions - plain).abs().max() > 1e-3  # the regions change the picture


def test_full_canvas_region_with_the_global_prompt_equals_plain_ksampler(comfy, tiny_checkpoints):
    same = {**LAYOUT, "regions": [{"label": "park", "prompt": LAYOUT["global_prompt"], "box": [0, 0, 1000, 1000]}]}
    comfy.run(sampling_prompt(tiny_checkpoints["base"].name, True, same))
    regions = final_latent(comfy)
    comfy.run(sampling_prompt(tiny_checkpoints["base"].name, False, same))
    plain = final_latent(comfy)
    # The tiny random model's latents reach a few hundred; averaging identical predictions with
    # different weights reorders float32 sums, so compare relative to the latent's magnitude.
    err = (regions - plain).abs().max().item()
    scale = plain.abs().max().item()
    assert err <= 2e-6 * scale, (err, scale)


def test_a_bad_layout_fails_alone_and_the_next_prompt_runs(comfy, tiny_checkpoints):
    bad = json.loads(json.dumps(LAYOUT))
    bad["regions"][0]["box"] = [1, 2, "three", 4]
    with pytest.raises(AssertionError, match=r"regions\[0\]\.box: x2 is not a number"):
        comfy.run(sampling_prompt(tiny_checkpoints["base"].name, True, bad))
    result = comfy.run(sampling_prompt(tiny_checkpoints["base"].name, True, LAYOUT, seed=8))
    assert result["outputs"]["save"]["images"]
