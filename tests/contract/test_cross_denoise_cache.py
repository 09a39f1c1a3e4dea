"""The cross-attention key/value cache of cross-denoise runs, in real ComfyUI on the tiny SDXL fixture:
exactly today's pictures with it, on plain and Gated MoE models; nothing left on the model after a run."""

from __future__ import annotations

import json

import inprocess
import pytest
import torch

from .test_cross_denoise import cross, empty, encode, layout_of, plain, regions_for
from .test_moe_patch import patch, stack

THREE = (("cat", "a black cat", [50, 100, 450, 600]), ("kite", "a red kite", [500, 50, 950, 450]),
         ("bench", "a wooden bench", [300, 650, 800, 950]))


@pytest.fixture(scope="module")
def base(comfy, tiny_checkpoints):
    model, clip, _ = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[:3]
    return model, clip


@pytest.fixture
def reports(monkeypatch):
    """Every cache report of the runs in the test (spies on the guider's end-of-run report)."""
    cache_mod = inprocess.pack_module("mepg_core.context_cache")
    seen = []
    original = cache_mod.ContextProjectionCache.report

    def spy(self):
        out = original(self)
        seen.append(out)
        return out

    monkeypatch.setattr(cache_mod.ContextProjectionCache, "report", spy)
    return seen


def cache_off(monkeypatch):
    guider = inprocess.pack_module("nodes.cross_denoise_nodes").CrossDenoiseGuider
    monkeypatch.setattr(guider, "context_cache_bytes", 0)


def projections(model):
    cache_mod = inprocess.pack_module("mepg_core.context_cache")
    return cache_mod.cross_attention_projections(model.model.diffusion_model)


@pytest.mark.parametrize("global_phase", ["bias", "fusion"])
def test_cached_run_equals_the_uncached_run_bit_for_bit(comfy, base, reports, monkeypatch, global_phase):
    """Kills: a cache keyed without the context (every prompt would get the first prompt's keys), or one
    that returns keys of another site or a stale weight state: the pictures would differ. Also checks the
    cache was used (hits) and each site computed each distinct context once (misses)."""
    model, clip = base
    regions = regions_for(comfy, clip, layout_of("a garden", *THREE), 256, 192)
    kw = dict(interleave=2, global_phase=global_phase, global_alpha_start=0.5, global_alpha_end=0.0, steps=5)
    with_cache = cross(comfy, model, clip, regions, empty(256, 192), **kw)
    report = reports[-1]
    sites = len(projections(model))
    assert sites > 0 and report["hits"] > 0
    # global+negative and each region's prompt+negative: 4 distinct contexts, each projected once per site
    assert report["contexts"] == 4 and report["misses"] == 4 * sites and report["bypassed"] == 0
    assert report["bytes"] > 0 and report["bytes_per_context"] * 4 <= report["bytes"]
    cache_off(monkeypatch)
    without = cross(comfy, model, clip, regions, empty(256, 192), **kw)
    assert reports[-1]["hits"] == 0
    assert torch.equal(with_cache, without)


def test_weight_patch_change_between_runs_and_plain_sampling_untouched(comfy, base):
    """Kills: a cache that outlives its run or keeps keys of the unpatched weights (a LoRA-like weight
    patch on to_k would be ignored), and wrappers left on the model (plain sampling would go through them)."""
    model, clip = base
    regions = regions_for(comfy, clip, layout_of("a garden", *THREE[:1]), 256, 192)
    before = plain(comfy, model, clip, empty(256, 192))
    first = cross(comfy, model, clip, regions, empty(256, 192))
    path, module = projections(model)[0]
    assert "forward" not in module.__dict__  # the wrapper is gone after the run
    patched = model.clone()
    key = f"diffusion_model.{path}.weight"
    patched.add_patches({key: (torch.full_like(module.weight, 0.05),)}, 1.0)
    changed = cross(comfy, patched, clip, regions, empty(256, 192))
    assert not torch.equal(first, changed)
    again = cross(comfy, model, clip, regions, empty(256, 192))
    assert torch.equal(first, again)
    assert torch.equal(before, plain(comfy, model, clip, empty(256, 192)))


def test_moe_model_cached_run_equals_the_uncached_run(comfy, tiny_checkpoints, reports, monkeypatch):
    """Kills: a MoE key without the routing of the pass (a region forced to one expert would reuse the
    keys its neighbour's expert made for the same text): regions share the negative prompt, so their
    uncond rows differ only by expert, and the pictures would differ."""
    loader = comfy.node("CheckpointLoaderSimple")()
    base_model, clip = loader.load_checkpoint(tiny_checkpoints["base"].name)[:2]
    layout = {"version": 1, "global_prompt": "a harbour", "regions": [
        {"label": "boat", "prompt": "a boat", "box": [0, 300, 500, 1000], "expert": "anime"},
        {"label": "gull", "prompt": "a boat", "box": [550, 0, 1000, 500], "expert": "photo"}]}
    lay = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    regions = comfy.node("MEPG_RegionMaskBuilder").execute(lay, 256, 192, 0, "smaller_on_top", 0.5, clip=clip).args[0]
    patched = patch(comfy, base_model, stack(comfy, tiny_checkpoints), gate_mode="uniform")

    def run():
        return comfy.node("MEPG_CrossDenoiseKSampler").execute(
            patched, 5, 4, 4.0, "euler", "normal", encode(clip, "a harbour"), encode(clip, "blurry"),
            empty(256, 192), regions, p1=0.75, interleave=2, alpha_start=1.0, alpha_end=1.0, context_margin_px=32,
            denoise=1.0, global_phase="fusion", global_alpha_start=0.5).args[0]["samples"]

    with_cache = run()
    assert reports[-1]["hits"] > 0
    # the two regions have the same prompt (one context) but different experts: more misses than sites
    sites = len(projections(patched))
    assert reports[-1]["contexts"] == 2 and reports[-1]["misses"] > 2 * sites
    cache_off(monkeypatch)
    assert torch.equal(with_cache, run())
