"""Composition suite: what users connect around the MEPG nodes, as graphs of core nodes + ours.

Each test runs API-format graphs through ComfyUI's own executor and asserts the equivalence the
combination should have (exact where the math says exact). Every row records its measured difference
in ``test-artifacts/composition.json`` (name, measured, bound) for the report.

Sizes are tiny on purpose: 128x128 px (a 16x16 latent), 1-4 steps.
"""

from __future__ import annotations

import json

import pytest
import torch

W = H = 128
SEED = 5
CFG = 4.0
ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def report(artifacts_dir):
    yield
    path = artifacts_dir / "composition.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **ROWS}, indent=2, sort_keys=True) + "\n")


def record(name: str, measured: float, bound: float, kind: str = "max |a-b| / max |b|") -> float:
    ROWS[name] = {"measured": float(measured), "bound": bound, "kind": kind}
    return measured


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Graph:
    """An API-format prompt built node by node; ids follow the order of ``add``, so equal graphs reuse
    ComfyUI's cached outputs (checkpoint loads) across prompts."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = f"n{len(self.nodes)}_{class_type}"
        self.nodes[node_id] = {"class_type": class_type, "inputs": {k: v for k, v in inputs.items() if v is not None}}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def run(comfy, graph: Graph, *wanted: str) -> list[torch.Tensor]:
    """Execute ``graph`` (with a sink on every wanted node) and return their first outputs' samples."""
    prompt = dict(graph.nodes)
    for i, node_id in enumerate(wanted):
        prompt[f"sink{i}"] = {"class_type": "PreviewAny", "inputs": {"source": out(node_id)}}
    comfy.run(prompt)
    results = []
    for node_id in wanted:
        entry = comfy.executor.caches.outputs.get(node_id)
        value = entry.outputs if hasattr(entry, "outputs") else entry[0]
        results.append(value[0][0]["samples"].clone())
    return results


def run_error(comfy, graph: Graph, wanted: str) -> str:
    with pytest.raises(AssertionError) as info:
        run(comfy, graph, wanted)
    return str(info.value)


# -- graph pieces ----------------------------------------------------------------------------------------

def layout_json(*regions, global_prompt="a garden") -> str:
    return json.dumps({"version": 1, "global_prompt": global_prompt, "canvas": {"width": W, "height": H}, "regions": [
        {"label": r[0], "prompt": r[1], "box": r[2], **({"expert": r[3]} if len(r) > 3 else {})} for r in regions]})


FULL = ("garden", "a garden", [0, 0, 1000, 1000])
LEFT = ("cat", "a black cat", [0, 0, 500, 1000])


class Base:
    """The nodes most graphs start with: checkpoint, prompts, empty latent."""

    def __init__(self, comfy, tiny_checkpoints, graph: Graph | None = None, clip_hooks: bool = False):
        g = self.g = graph or Graph()
        self.ckpt = g.add("CheckpointLoaderSimple", ckpt_name=tiny_checkpoints["base"].name)
        self.model, self.clip, self.vae = out(self.ckpt, 0), out(self.ckpt, 1), out(self.ckpt, 2)
        clip = self.clip
        if clip_hooks:
            hooks = g.add("CreateHookLora", lora_name="tiny_sdxl_lora.safetensors", strength_model=1.0,
                          strength_clip=1.0)
            clip = out(g.add("SetClipHooks", clip=self.clip, apply_to_conds=True, schedule_clip=False,
                             hooks=out(hooks)))
        self.prompt_clip = clip
        self.pos = out(g.add("CLIPTextEncode", text="a garden", clip=clip))
        self.neg = out(g.add("CLIPTextEncode", text="blurry", clip=clip))
        self.latent = out(g.add("EmptyLatentImage", width=W, height=H, batch_size=1))

    def regions(self, *regions, clip=None, width=W, height=H) -> list:
        layout = self.g.add("MEPG_LayoutFromJSON", json_text=layout_json(*regions))
        return out(self.g.add("MEPG_RegionMaskBuilder", layout=out(layout), width=width, height=height,
                              feather_px=0, overlap="smaller_on_top", global_weight=0.5,
                              clip=clip or self.clip))

    def ksampler(self, model=None, pos=None, neg=None, latent=None, steps=3, denoise=1.0) -> str:
        return self.g.add("KSampler", model=model or self.model, seed=SEED, steps=steps, cfg=CFG,
                          sampler_name="euler", scheduler="normal", positive=pos or self.pos,
                          negative=neg or self.neg, latent_image=latent or self.latent, denoise=denoise)

    def cross(self, regions, model=None, pos=None, neg=None, steps=3, p1=0.7, interleave=0, **extra) -> str:
        return self.g.add("MEPG_CrossDenoiseKSampler", model=model or self.model, seed=SEED, steps=steps, cfg=CFG,
                          sampler_name="euler", scheduler="normal", positive=pos or self.pos,
                          negative=neg or self.neg, latent_image=self.latent, regions=regions, p1=p1,
                          interleave=interleave, alpha_start=1.0, alpha_end=1.0, context_margin_px=32, denoise=1.0,
                          **extra)

    def moe(self, tiny_checkpoints, model=None, gate_mode="forced", forced="anime", gate_file="none") -> list:
        stack = None
        for name in ("photo", "anime", "watercolor"):
            stack = out(self.g.add("MEPG_ExpertStackLoader", ckpt_name=tiny_checkpoints[name].name, name=name,
                                   style_tags=name, expert_stack=stack))
        return out(self.g.add("MEPG_GatedMoEPatch", model=model or self.model, expert_stack=stack, include_base=True,
                              gate_mode=gate_mode, gate_file=gate_file, forced_expert=forced, top_k=0,
                              normalise=True, temperature=1.0, global_region_bias=0.5,
                              clip=self.clip if gate_mode == "style_centroid" else None))

    def checkpoint(self, tiny_checkpoints, name: str) -> list:
        return out(self.g.add("CheckpointLoaderSimple", ckpt_name=tiny_checkpoints[name].name), 0)

    def lora(self, model) -> list:
        return out(self.g.add("LoraLoaderModelOnly", model=model, lora_name="tiny_sdxl_lora.safetensors",
                              strength_model=1.0))

    def hint(self) -> list:
        """A hint image with a left and a right half (so crops of it differ)."""
        left = self.g.add("EmptyImage", width=W, height=H, batch_size=1, color=0x2060C0)
        right = self.g.add("EmptyImage", width=W // 2, height=H, batch_size=1, color=0xF0A010)
        return out(self.g.add("ImageCompositeMasked", destination=out(left), source=out(right), x=W // 2, y=0,
                              resize_source=False))

    def controlnet(self, image, pos=None, neg=None) -> tuple[list, list]:
        loader = self.g.add("ControlNetLoader", control_net_name="tiny_sdxl_controlnet.safetensors")
        apply = self.g.add("ControlNetApplyAdvanced", positive=pos or self.pos, negative=neg or self.neg,
                           control_net=out(loader), image=image, strength=1.0, start_percent=0.0, end_percent=1.0)
        return out(apply, 0), out(apply, 1)


# -- 1. conditioning add-ons in window passes ------------------------------------------------------------

def test_full_canvas_cross_denoise_with_controlnet_equals_ksampler_with_controlnet(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    pos, neg = b.controlnet(b.hint())
    cross, ks, plain = b.cross(b.regions(FULL), pos=pos, neg=neg), b.ksampler(pos=pos, neg=neg), b.ksampler()
    x_cross, x_ks, x_plain = run(comfy, b.g, cross, ks, plain)
    assert rel(x_ks, x_plain) > 1e-2  # the ControlNet really acts
    assert record("full-canvas Cross-Denoise + ControlNet vs KSampler + ControlNet", rel(x_cross, x_ks), 1e-5) <= 1e-5


def test_a_region_window_sees_its_own_part_of_the_hint(comfy, tiny_checkpoints):
    """One local step: a region's cells come from its window's pass alone. Changing the hint outside that
    window leaves them unchanged; changing it inside changes them (a centre crop of the whole hint, the
    old behaviour, would move them in both cases)."""
    inside, outside = [], []
    for right_color in (0xF0A010, 0x10F0A0):  # the right half differs: outside the cat's window
        b = Base(comfy, tiny_checkpoints)
        left = b.g.add("EmptyImage", width=W, height=H, batch_size=1, color=0x2060C0)
        right = b.g.add("EmptyImage", width=32, height=H, batch_size=1, color=right_color)
        hint = out(b.g.add("ImageCompositeMasked", destination=out(left), source=out(right), x=W - 32, y=0,
                           resize_source=False))
        pos, neg = b.controlnet(hint)
        outside.append(run(comfy, b.g, b.cross(b.regions(LEFT), pos=pos, neg=neg, steps=1, p1=1.0))[0])
    for left_color in (0x2060C0, 0xC02060):  # the left edge differs: inside the cat's window
        b = Base(comfy, tiny_checkpoints)
        left = b.g.add("EmptyImage", width=W, height=H, batch_size=1, color=0x808080)
        edge = b.g.add("EmptyImage", width=16, height=H, batch_size=1, color=left_color)
        hint = out(b.g.add("ImageCompositeMasked", destination=out(left), source=out(edge), x=0, y=0,
                           resize_source=False))
        pos, neg = b.controlnet(hint)
        inside.append(run(comfy, b.g, b.cross(b.regions(LEFT), pos=pos, neg=neg, steps=1, p1=1.0))[0])
    cat = (slice(None), slice(None), slice(None), slice(0, 8))  # the cat's latent columns
    changed_outside = (outside[0] - outside[1])[cat].abs().max().item()
    changed_inside = (inside[0] - inside[1])[cat].abs().max().item()
    record("region cells vs a hint change outside its window (1 local step)", changed_outside, 0.0, "max |a-b|")
    record("region cells vs a hint change inside its window (1 local step, must move)", changed_inside, 1e-4,
           "max |a-b| (lower bound)")
    assert changed_outside == 0.0
    assert changed_inside > 1e-4


def changed_cells(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=(0, 1)) > 0


def test_an_area_condition_changes_the_same_latent_cells(comfy, tiny_checkpoints):
    """ConditioningSetArea over latent columns 8-15, one step: KSampler and a Cross-Denoise local step
    (the cat's window holds columns 0-11) change exactly the area's cells."""
    b = Base(comfy, tiny_checkpoints)
    extra = b.g.add("CLIPTextEncode", text="a red lantern", clip=b.clip)
    area = b.g.add("ConditioningSetArea", conditioning=out(extra), width=64, height=H, x=64, y=0, strength=1.0)
    pos = out(b.g.add("ConditioningCombine", conditioning_1=b.pos, conditioning_2=out(area)))
    regions = b.regions(LEFT)
    nodes = [b.ksampler(pos=pos, steps=1), b.ksampler(steps=1), b.cross(regions, pos=pos, steps=1, p1=1.0),
             b.cross(regions, steps=1, p1=1.0)]
    ks_with, ks_without, cd_with, cd_without = run(comfy, b.g, *nodes)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[:, 8:] = True
    wrong_ks = int((changed_cells(ks_with, ks_without) != want).sum())
    wrong_cd = int((changed_cells(cd_with, cd_without) != want).sum())
    record("area cond: cells KSampler changes outside/inside-missing the area", wrong_ks, 0, "cells")
    record("area cond: cells Cross-Denoise changes outside/inside-missing the area", wrong_cd, 0, "cells")
    assert wrong_ks == 0 and wrong_cd == 0


def test_a_masked_condition_changes_the_same_cells_and_composes_exactly(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    canvas = b.g.add("SolidMask", value=0.0, width=W, height=H)
    spot = b.g.add("SolidMask", value=1.0, width=48, height=64)
    mask = out(b.g.add("MaskComposite", destination=out(canvas), source=out(spot), x=80, y=64, operation="add"))
    extra = b.g.add("CLIPTextEncode", text="a red lantern", clip=b.clip)
    masked = b.g.add("ConditioningSetMask", conditioning=out(extra), mask=mask, strength=1.0,
                     set_cond_area="default")
    pos = out(b.g.add("ConditioningCombine", conditioning_1=b.pos, conditioning_2=out(masked)))
    nodes = [b.ksampler(pos=pos, steps=1), b.ksampler(steps=1),
             b.cross(b.regions(LEFT), pos=pos, steps=1, p1=1.0), b.cross(b.regions(LEFT), steps=1, p1=1.0),
             b.cross(b.regions(FULL), pos=pos), b.ksampler(pos=pos)]
    ks_with, ks_without, cd_with, cd_without, full_cd, full_ks = run(comfy, b.g, *nodes)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[8:16, 10:16] = True
    wrong_ks = int((changed_cells(ks_with, ks_without) != want).sum())
    wrong_cd = int((changed_cells(cd_with, cd_without) != want).sum())
    record("mask cond: cells Cross-Denoise changes outside/missing the mask (1 local step)", wrong_cd, 0, "cells")
    err = record("full-canvas Cross-Denoise + Combine(global, masked prompt) vs KSampler", rel(full_cd, full_ks), 1e-5)
    assert wrong_ks == 0 and wrong_cd == 0
    assert err <= 1e-5


def test_region_mask_builder_conditioning_as_the_positive(comfy, tiny_checkpoints):
    """The builder's own conditioning output (global on the background + masked regions) as the positive:
    it used to crash window passes; with one full-canvas region it equals KSampler up to rounding."""
    b = Base(comfy, tiny_checkpoints)
    layout = b.g.add("MEPG_LayoutFromJSON", json_text=layout_json(FULL))
    builder = b.g.add("MEPG_RegionMaskBuilder", layout=out(layout), width=W, height=H, feather_px=0,
                      overlap="smaller_on_top", global_weight=0.5, clip=b.clip)
    two = b.regions(LEFT, ("dog", "a dog", [500, 0, 1000, 1000]))
    two_builder = b.g.add("MEPG_RegionMaskBuilder", layout=out(b.g.add("MEPG_LayoutFromJSON", json_text=layout_json(
        LEFT, ("dog", "a dog", [500, 0, 1000, 1000])))), width=W, height=H, feather_px=0, overlap="smaller_on_top",
        global_weight=0.5, clip=b.clip)
    nodes = [b.cross(out(builder, 0), pos=out(builder, 1)), b.ksampler(pos=out(builder, 1)),
             b.cross(two, pos=out(two_builder, 1))]
    full_cd, full_ks, two_cd = run(comfy, b.g, *nodes)
    assert torch.isfinite(two_cd).all()
    assert record("full-canvas Cross-Denoise, builder conditioning as positive, vs KSampler", rel(full_cd, full_ks),
                  1e-4) <= 1e-4


def test_region_passes_keep_the_global_positives_hooks(comfy, tiny_checkpoints):
    """A LoRA hook on the prompts' CLIP (CreateHookLora + SetClipHooks); the regions are encoded with the
    plain CLIP. Full canvas: equal to KSampler with the hooked prompts, so region passes ran with the hook."""
    b = Base(comfy, tiny_checkpoints, clip_hooks=True)
    plain = b.g.add("CLIPTextEncode", text="a garden", clip=b.clip)
    nodes = [b.cross(b.regions(FULL)), b.ksampler(), b.ksampler(pos=out(plain))]
    x_cross, x_ks, x_unhooked = run(comfy, b.g, *nodes)
    assert rel(x_ks, x_unhooked) > 1e-2  # the hook matters
    assert record("full-canvas Cross-Denoise + LoRA hook vs KSampler + LoRA hook", rel(x_cross, x_ks), 1e-5) <= 1e-5


# -- 2. routing in other samplers, hand-off --------------------------------------------------------------

def routed(b: Base, model, regions, route="region expert", other_shapes="refuse") -> list:
    return out(b.g.add("MEPG_RegionalMoERouting", model=model, regions=regions, route=route,
                       other_shapes=other_shapes))


def test_regional_routing_in_a_plain_ksampler(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    moe = b.moe(tiny_checkpoints, gate_mode="uniform")
    forced_full = b.regions(("all", "a garden", [0, 0, 1000, 1000], "anime"))
    anime = b.checkpoint(tiny_checkpoints, "anime")
    two = b.regions(("cat", "a cat", [0, 0, 500, 1000], "photo"), ("dog", "a dog", [500, 0, 1000, 1000], "anime"))
    big_latent = out(b.g.add("EmptyLatentImage", width=W + 64, height=H + 64, batch_size=1))
    nodes = [b.ksampler(model=routed(b, moe, forced_full)), b.ksampler(model=anime),
             b.ksampler(model=routed(b, moe, two, route="favour region expert")),
             b.cross(two, model=moe, p1=0.0, global_phase="bias"),
             b.ksampler(model=routed(b, moe, forced_full), latent=big_latent),
             b.ksampler(model=anime, latent=big_latent), b.ksampler(model=moe)]
    forced, own, favour, cross_global, big_forced, big_own, uniform = run(comfy, b.g, *nodes)
    e1 = record("KSampler on Regional MoE Routing (full-canvas region forced to anime) vs the anime checkpoint",
                rel(forced, own), 1e-5)
    e2 = record("KSampler on Regional MoE Routing (favour) vs Cross-Denoise p1=0 global steps",
                rel(favour, cross_global),
                1e-5)
    e3 = record("Regional routing on a larger latent (layout rescaled) vs the anime checkpoint",
                rel(big_forced, big_own),
                1e-5)
    assert e1 <= 1e-5 and e2 <= 1e-5 and e3 <= 1e-5
    assert rel(favour, uniform) > 1e-3  # the regions really route


def test_regional_routing_refuses_crops_of_another_shape_or_routes_them_by_the_gate(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    moe = b.moe(tiny_checkpoints, gate_mode="uniform")
    regions = b.regions(("cat", "a cat", [0, 0, 500, 1000], "photo"))
    crop = out(b.g.add("EmptyLatentImage", width=W, height=64, batch_size=1))
    message = run_error(comfy, b.g, b.ksampler(model=routed(b, moe, regions), latent=crop))
    assert "another shape" in message and "other_shapes" in message
    b = Base(comfy, tiny_checkpoints)
    moe = b.moe(tiny_checkpoints, gate_mode="uniform")
    regions = b.regions(("cat", "a cat", [0, 0, 500, 1000], "photo"))
    crop = out(b.g.add("EmptyLatentImage", width=W, height=64, batch_size=1))
    gate, plain = run(comfy, b.g, b.ksampler(model=routed(b, moe, regions, other_shapes="gate"), latent=crop),
                      b.ksampler(model=moe, latent=crop))
    assert record("Regional routing, other_shapes=gate, on a crop vs the gate alone", rel(gate, plain), 0.0) == 0.0


def test_sampler_custom_advanced_with_a_routed_model_equals_ksampler(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    moe = b.moe(tiny_checkpoints, gate_mode="uniform")
    model = routed(b, moe, b.regions(("cat", "a cat", [0, 0, 500, 1000], "photo")))
    guider = b.g.add("CFGGuider", model=model, positive=b.pos, negative=b.neg, cfg=CFG)
    custom = b.g.add("SamplerCustomAdvanced", noise=out(b.g.add("RandomNoise", noise_seed=SEED)), guider=out(guider),
                     sampler=out(b.g.add("KSamplerSelect", sampler_name="euler")),
                     sigmas=out(b.g.add("BasicScheduler", model=model, scheduler="normal", steps=3, denoise=1.0)),
                     latent_image=b.latent)
    x_custom, x_ks = run(comfy, b.g, custom, b.ksampler(model=model))
    assert record("SamplerCustomAdvanced + CFGGuider on a routed model vs KSampler", rel(x_custom, x_ks), 1e-5) <= 1e-5


def advanced(b: Base, regions, latent, start, end, add_noise="enable", leftover="disable", steps=4, p1=0.5):
    return b.g.add("MEPG_CrossDenoiseKSamplerAdvanced", model=b.model, add_noise=add_noise, noise_seed=SEED,
                   steps=steps, cfg=CFG, sampler_name="euler", scheduler="normal", positive=b.pos, negative=b.neg,
                   latent_image=latent, regions=regions, start_at_step=start, end_at_step=end,
                   return_with_leftover_noise=leftover, p1=p1, interleave=0, alpha_start=1.0, alpha_end=1.0,
                   context_margin_px=32)


def ks_advanced(b: Base, latent, start, end, add_noise="enable", leftover="disable", steps=4):
    return b.g.add("KSamplerAdvanced", model=b.model, add_noise=add_noise, noise_seed=SEED, steps=steps, cfg=CFG,
                   sampler_name="euler", scheduler="normal", positive=b.pos, negative=b.neg, latent_image=latent,
                   start_at_step=start, end_at_step=end, return_with_leftover_noise=leftover)


def test_cross_denoise_hands_off_like_ksampler_advanced(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    full, two = b.regions(FULL), b.regions(LEFT, ("dog", "a dog", [500, 0, 1000, 1000]))
    first_ks = ks_advanced(b, b.latent, 0, 2, leftover="enable")
    ks_then_cd = advanced(b, full, out(first_ks), 2, 10000, add_noise="disable")
    first_cd = advanced(b, full, b.latent, 0, 2, leftover="enable")
    cd_then_ks = ks_advanced(b, out(first_cd), 2, 10000, add_noise="disable")
    split_a = advanced(b, two, b.latent, 0, 2, leftover="enable")  # the local phase (p1 = 0.5 of 4 steps)
    split_b = advanced(b, two, out(split_a), 2, 10000, add_noise="disable")
    single = b.cross(two, steps=4, p1=0.5)
    ks_mid, cd_mid = ks_advanced(b, b.latent, 1, 3, leftover="enable"), advanced(b, full, b.latent, 1, 3,
                                                                                leftover="enable", p1=0.0)
    nodes = [ks_then_cd, cd_then_ks, b.ksampler(steps=4), split_b, single, ks_mid, cd_mid]
    x_ks_cd, x_cd_ks, x_ks, x_split, x_single, x_ks_mid, x_cd_mid = run(comfy, b.g, *nodes)
    e1 = record("KSamplerAdvanced(0-2, leftover) -> Cross-Denoise Advanced(2-4, no noise) vs KSampler",
                rel(x_ks_cd, x_ks),
                1e-5)
    e2 = record("Cross-Denoise Advanced(0-2, leftover) -> KSamplerAdvanced(2-4, no noise) vs KSampler",
                rel(x_cd_ks, x_ks),
                1e-5)
    e3 = record("Cross-Denoise Advanced split at the end of the local phase vs one Cross-Denoise run",
                rel(x_split, x_single), 1e-5)
    e4 = record("Cross-Denoise Advanced(1-3, leftover, p1=0) vs KSamplerAdvanced(1-3, leftover)",
                rel(x_cd_mid, x_ks_mid),
                1e-5)
    assert max(e1, e2, e3, e4) <= 1e-5
    assert rel(x_ks_mid, x_ks) > 1e-2  # leftover noise is really left


# -- 3. LoRAs at the MoE sites ---------------------------------------------------------------------------

def test_forced_expert_plus_lora_equals_that_checkpoint_plus_lora(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    anime = b.checkpoint(tiny_checkpoints, "anime")
    after = b.lora(b.moe(tiny_checkpoints))
    before = b.moe(tiny_checkpoints, model=b.lora(b.model))
    nodes = [b.ksampler(model=after), b.ksampler(model=before), b.ksampler(model=b.lora(anime)),
             b.ksampler(model=anime)]
    x_after, x_before, x_ref, x_anime = run(comfy, b.g, *nodes)
    assert rel(x_ref, x_anime) > 1e-2  # the LoRA touches the MoE sites
    e1 = record("forced expert + LoRA applied after the patch vs checkpoint + LoRA", rel(x_after, x_ref), 1e-5)
    e2 = record("forced expert + LoRA applied before the patch vs checkpoint + LoRA", rel(x_before, x_ref), 1e-5)
    assert e1 <= 1e-5 and e2 <= 1e-5


def test_forced_expert_plus_lora_hook_equals_that_checkpoint_plus_lora_hook(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints, clip_hooks=True)
    anime = b.checkpoint(tiny_checkpoints, "anime")
    x_moe, x_ref = run(comfy, b.g, b.ksampler(model=b.moe(tiny_checkpoints)), b.ksampler(model=anime))
    assert record("forced expert + LoRA hook (SetClipHooks) vs checkpoint + LoRA hook", rel(x_moe, x_ref), 1e-5) <= 1e-5


def test_a_lora_changes_the_uniform_mixture_of_every_expert(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    uniform = b.moe(tiny_checkpoints, gate_mode="uniform")
    x_lora, x_plain = run(comfy, b.g, b.ksampler(model=b.lora(uniform)), b.ksampler(model=uniform))
    assert record("uniform mixture with vs without a LoRA (must move)", rel(x_lora, x_plain), 1e-2,
                  "max |a-b| / max |b| (lower bound)") > 1e-2


# -- 4. merges and saves ---------------------------------------------------------------------------------

def test_merging_into_a_patched_model_merges_every_expert(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    photo, anime = b.checkpoint(tiny_checkpoints, "photo"), b.checkpoint(tiny_checkpoints, "anime")
    merged_moe = b.g.add("ModelMergeSimple", model1=b.moe(tiny_checkpoints), model2=photo, ratio=0.5)
    merged_ckpt = b.g.add("ModelMergeSimple", model1=anime, model2=photo, ratio=0.5)
    x_moe, x_ref, x_anime = run(comfy, b.g, b.ksampler(model=out(merged_moe)), b.ksampler(model=out(merged_ckpt)),
                                b.ksampler(model=anime))
    assert rel(x_ref, x_anime) > 1e-2
    assert record("ModelMergeSimple(forced anime MoE, photo, 0.5) vs ModelMergeSimple(anime, photo, 0.5)",
                  rel(x_moe, x_ref), 1e-5) <= 1e-5


def test_a_patched_model_as_model2_of_a_merge_is_refused(comfy, tiny_checkpoints):
    b = Base(comfy, tiny_checkpoints)
    merged = b.g.add("ModelMergeSimple", model1=b.model, model2=b.moe(tiny_checkpoints), ratio=0.5)
    message = run_error(comfy, b.g, b.ksampler(model=out(merged)))
    assert "second model of a merge" in message and "model1" in message


@pytest.mark.parametrize("save", ["CheckpointSave", "ModelSave"])
def test_saving_a_patched_model_is_refused_and_leaves_nothing_behind(comfy, tiny_checkpoints, save):
    b = Base(comfy, tiny_checkpoints)
    before = run(comfy, b.g, b.ksampler())[0]
    b = Base(comfy, tiny_checkpoints)
    moe = b.moe(tiny_checkpoints, gate_mode="uniform")
    inputs = {"model": moe, "filename_prefix": "mepg_should_not_exist"}
    if save == "CheckpointSave":
        inputs.update(clip=b.clip, vae=b.vae)
    prompt = dict(b.g.nodes)
    prompt["save"] = {"class_type": save, "inputs": inputs}
    with pytest.raises(AssertionError) as info:
        comfy.run(prompt)
    message = str(info.value)
    assert "Gated MoE model" in message and "gate" in message and "workflow" in message
    b = Base(comfy, tiny_checkpoints)
    assert torch.equal(run(comfy, b.g, b.ksampler())[0], before)


# -- 5. storage dtypes and batch-expanding patches -------------------------------------------------------

def random_gate_file_for(comfy, model, tiny_checkpoints, name: str) -> str:
    """A gate file with random (non-uniform) gates for the stack ``Base.moe`` builds on ``model``."""
    import folder_paths
    import inprocess

    gating = inprocess.pack_module("mepg_core.gating")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    stack = None
    for expert in ("photo", "anime", "watercolor"):
        stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints[expert].name, expert, expert,
                                                             expert_stack=stack).args[0]
    patched = comfy.node("MEPG_GatedMoEPatch").execute(model, stack, True, "uniform", "none", "", 0, True, 1.0,
                                                       0.5).args[0]
    experts = patched.get_attachment("mepg_moe").stack
    gate_files.save_gate_file(f"{folder_paths.get_folder_paths('mepg_gates')[0]}/{name}",
                              gating.GateSet.random(experts, seed=3, std=2.0), experts, gating.GateOptions())
    folder_paths.filename_list_cache.clear()
    return name


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_models_with_every_gate_mode(comfy, tiny_checkpoints, weight_dtype):
    fp8_base = comfy.node("UNETLoader")().load_unet(tiny_checkpoints["base"].name, weight_dtype)[0]
    gate_name = random_gate_file_for(comfy, fp8_base, tiny_checkpoints, f"tiny_random_{weight_dtype}.safetensors")
    b = Base(comfy, tiny_checkpoints)
    unet = out(b.g.add("UNETLoader", unet_name=tiny_checkpoints["base"].name, weight_dtype=weight_dtype))
    nodes = [b.ksampler(model=b.moe(tiny_checkpoints, model=unet, gate_mode=mode,
                                    gate_file=gate_name if mode == "trained" else "none"))
             for mode in ("uniform", "forced", "trained", "style_centroid")]
    anime = out(b.g.add("UNETLoader", unet_name=tiny_checkpoints["anime"].name, weight_dtype=weight_dtype))
    nodes.append(b.ksampler(model=anime))
    uniform, forced, trained, centroid, own = run(comfy, b.g, *nodes)
    for x in (uniform, forced, trained, centroid):
        assert torch.isfinite(x).all()
    assert rel(uniform, trained) > 1e-3 and rel(uniform, centroid) > 1e-3  # the gates really differ
    assert record(f"{weight_dtype}: forced expert vs that checkpoint loaded {weight_dtype}", rel(forced, own),
                  1e-5) <= 1e-5


def test_hypertile_with_gate_routing_and_refused_with_regions(comfy, tiny_checkpoints):
    size = 256  # HyperTile tiles the second level's 16x16 tokens into 4x4 tiles here
    b = Base(comfy, tiny_checkpoints)
    b.latent = out(b.g.add("EmptyLatentImage", width=size, height=size, batch_size=1))

    def hypertile(model):
        return out(b.g.add("HyperTile", model=model, tile_size=32, swap_size=2, max_depth=1, scale_depth=False))

    anime = b.checkpoint(tiny_checkpoints, "anime")
    moe = b.moe(tiny_checkpoints)
    x_moe, x_ref, x_untiled = run(comfy, b.g, b.ksampler(model=hypertile(moe)), b.ksampler(model=hypertile(anime)),
                                  b.ksampler(model=anime))
    assert rel(x_ref, x_untiled) > 1e-4  # HyperTile really tiled
    assert record("forced expert + HyperTile vs checkpoint + HyperTile", rel(x_moe, x_ref), 1e-5) <= 1e-5
    regions = b.regions(("cat", "a cat", [0, 0, 500, 1000], "photo"), width=size, height=size)
    tiled_moe = hypertile(b.moe(tiny_checkpoints, gate_mode="uniform"))
    message = run_error(comfy, b.g, b.cross(regions, model=tiled_moe, p1=0.5, global_phase="bias"))
    assert "HyperTile" in message
    # Fusion global steps route whole passes (gate, or a region's window), never tokens by region: they run.
    (fused,) = run(comfy, b.g, b.cross(regions, model=tiled_moe, p1=0.5))
    assert torch.isfinite(fused).all()
