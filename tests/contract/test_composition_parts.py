"""Composition pieces checked directly on ComfyUI's own objects: window crops of conditioning and hints,
region-pass add-ons, area rows under regional routing, expert patches, refusal messages."""

from __future__ import annotations

import json

import inprocess
import pytest
import torch


@pytest.fixture(scope="module")
def wcond(comfy):
    return inprocess.pack_module("nodes.window_conditioning")


@pytest.fixture(scope="module")
def controlnet(comfy, tiny_extras):
    return comfy.node("ControlNetLoader")().load_controlnet(tiny_extras["controlnet"].name)[0]


def processed(**extra):
    return {"model_conds": {}, "uuid": object(), **extra}


def test_hint_parts_are_the_canvas_hint_cut_to_the_window(comfy, wcond, controlnet):
    import comfy.utils as comfy_utils

    hint = torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(0))  # another shape than the canvas
    first = controlnet.copy().set_cond_hint(hint, 0.7, (0.0, 0.9))
    second = controlnet.copy().set_cond_hint(hint.flip(-1), 1.0)
    second.set_previous_controlnet(first)
    crops = wcond.WindowConditioning((16, 16))
    whole, area = crops.crop("positive", [processed(control=second), processed(control=second, area=(16, 8, 0, 8))],
                             (0, 0, 12, 16))
    canvas_hint = comfy_utils.common_upscale(hint.flip(-1), 128, 128, "nearest-exact", "center")
    assert torch.equal(whole["control"].cond_hint_original, canvas_hint[..., :, :96])
    assert torch.equal(whole["control"].previous_controlnet.cond_hint_original,
                       comfy_utils.common_upscale(hint, 128, 128, "nearest-exact", "center")[..., :, :96])
    assert whole["control"].strength == 1.0 and whole["control"].previous_controlnet.strength == 0.7
    # an area condition's control sees its area's hint (as ComfyUI sizes it), cut to the window's part
    area_hint = comfy_utils.common_upscale(hint.flip(-1), 64, 128, "nearest-exact", "center")
    assert area["area"] == (16, 4, 0, 8)
    assert torch.equal(area["control"].cond_hint_original, area_hint[..., :, :32])
    assert whole["control"] is not second and crops.crop("positive", [processed(control=second)], None)[0]["control"] \
        is second
    crops.cleanup()


def test_controls_of_other_packs_are_refused_with_their_name(comfy, wcond, controlnet):
    import comfy.controlnet as comfy_controlnet

    class ScheduledControl(comfy_controlnet.ControlNet):
        pass

    other = ScheduledControl(None)
    other.cond_hint_original = torch.zeros(1, 3, 128, 128)
    with pytest.raises(ValueError, match="ScheduledControl.*Apply ControlNet"):
        wcond.WindowConditioning((16, 16)).crop("positive", [processed(control=other)], (0, 0, 8, 16))


def test_masks_areas_gligen_and_noise_shaped_inputs_are_cropped(comfy, wcond):
    import comfy.conds as comfy_conds

    mask = torch.zeros(1, 16, 16)
    mask[:, 8:, 10:] = 1.0
    concat = torch.arange(4 * 16 * 16, dtype=torch.float32).reshape(1, 4, 16, 16)
    pooled = torch.ones(1, 8)
    gligen = ("position", object(), [(pooled, 4, 4, 6, 6), (pooled, 2, 2, 14, 14)])
    conds = [processed(mask=mask, mask_strength=0.5),
             processed(area=(16, 8, 0, 8), strength=2.0),
             processed(area=(4, 4, 0, 12)),  # entirely right of the window: dropped
             processed(gligen=gligen, model_conds={"c_concat": comfy_conds.CONDNoiseShape(concat)})]
    masked, area, shifted = wcond.WindowConditioning((16, 16)).crop("positive", conds, (4, 4, 12, 12))
    assert torch.equal(masked["mask"], mask[:, 4:12, 4:12]) and masked["mask_strength"] == 0.5
    assert area["area"] == (8, 4, 0, 4) and area["strength"] == 2.0
    # the area's soft left edge, as ComfyUI weighs it on the whole canvas (2 cells ramp: 0.5, 1)
    assert area["mask"].shape == (1, 8, 8) and area["mask_strength"] == 1.0
    assert torch.equal(area["mask"][0, 0, 4:], torch.tensor([0.5, 1.0, 1.0, 1.0]))
    assert torch.equal(area["mask"][0, :, :4], torch.zeros(8, 4))
    assert shifted["gligen"][2] == [(pooled, 4, 4, 2, 2)]
    assert torch.equal(shifted["model_conds"]["c_concat"].cond, concat[..., 4:12, 4:12])
    with pytest.raises(ValueError, match="'c_concat'.*cannot be cropped"):
        wcond.WindowConditioning((16, 16)).crop("positive", [processed(model_conds={
            "c_concat": comfy_conds.CONDNoiseShape(torch.zeros(1, 4, 8, 8))})], (0, 0, 8, 8))


def test_region_passes_inherit_what_the_positive_attaches_to_the_picture(wcond, controlnet):
    control, hooks, region_hooks = controlnet.copy(), object(), object()
    text = torch.zeros(1, 77, 8)
    positive = [[text, {"control": control, "hooks": hooks, "pooled_output": 1}],
                [text, {"control": control, "hooks": hooks, "area": (8, 8, 0, 0)}]]
    region = [[text, {"pooled_output": 2}], [text, {"pooled_output": 3, "hooks": region_hooks}]]
    out = wcond.region_pass_conditioning(region, positive, "cat")
    assert [e[1]["pooled_output"] for e in out[:2]] == [2, 3] and all(e[1]["control"] is control for e in out[:2])
    assert out[0][1]["hooks"] is hooks and out[1][1]["hooks"] is region_hooks  # the region's own CLIP hooks win
    assert out[2] is positive[1]  # the area entry is carried as it is
    conflicting = [[text, {"control": control}], [text, {"control": controlnet.copy()}]]
    with pytest.raises(ValueError, match="different ControlNets.*'cat'"):
        wcond.region_pass_conditioning(region, conflicting, "cat")


def test_area_rows_of_a_regional_model_are_routed_by_their_crop(comfy, tiny_checkpoints):
    moe_routing = inprocess.pack_module("mepg_core.moe_routing")
    model, clip = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[:2]
    stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints["anime"].name, "anime", "anime").args[0]
    patched = comfy.node("MEPG_GatedMoEPatch").execute(model, stack, True, "uniform", "none", "", 0, True, 1.0,
                                                       0.5).args[0]
    layout = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps({"version": 1, "global_prompt": "a garden",
                                                                   "regions": [{"label": "right", "prompt": "a dog",
                                                                                "box": [500, 0, 1000, 1000],
                                                                                "expert": "anime"}]})).args[0]
    regions = comfy.node("MEPG_RegionMaskBuilder").execute(layout, 128, 128, 0, "smaller_on_top", 0.5).args[0]
    routed = comfy.node("MEPG_RegionalMoERouting").execute(patched, regions, "region expert", "refuse").args[0]
    encode = clip.encode_from_tokens_scheduled
    area = comfy.node("ConditioningSetArea")().append(encode(clip.tokenize("a red lantern")), 64, 128, 64, 0, 1.0)[0]
    positive = encode(clip.tokenize("a garden")) + area
    seen = []
    original = moe_routing.MoERouting.context_for

    def spy(self, batch, cond_or_uncond, sigma, hw, frame=None):
        ctx = original(self, batch, cond_or_uncond, sigma, hw, frame=frame)
        seen.append((tuple(hw), ctx.region_map))
        return ctx

    moe_routing.MoERouting.context_for = spy
    try:
        comfy.nodes.common_ksampler(routed, 1, 1, 4.0, "euler", "normal", positive, encode(clip.tokenize("")),
                                    {"samples": torch.zeros(1, 4, 16, 16)})
    finally:
        moe_routing.MoERouting.context_for = original
    area_calls = [m for hw, m in seen if hw == (16, 8)]
    assert area_calls and all(bool((m == 0).all()) for m in area_calls)  # columns 8-15: all in the region
    full_calls = [m for hw, m in seen if hw == (16, 16)]
    assert full_calls and all({int(v) for v in m.unique()} == {-1, 0} for m in full_calls)


def test_expert_patches_left_behind_by_a_partial_load_are_applied_and_restored(comfy, tiny_checkpoints, tiny_extras):
    composition = inprocess.pack_module("nodes.moe_composition")
    model = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[0]
    lora = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(model, tiny_extras["lora"].name, 1.0)[0]
    stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints["anime"].name, "anime", "anime").args[0]
    patched = comfy.node("MEPG_GatedMoEPatch").execute(lora, stack, True, "uniform", "none", "", 0, True, 1.0,
                                                       0.5).args[0]
    experts = patched.get_attachment("mepg_moe").experts
    mirror = experts.for_model(patched)
    assert mirror is not experts.base and mirror.patches
    import comfy.utils as comfy_utils

    key = next(iter(mirror.patches))
    before = comfy_utils.get_attr(mirror.model, key).detach().clone()
    composition._patch_left_behind(mirror, None, 0, False, False)  # as ON_LOAD after a low-VRAM load
    assert not torch.equal(comfy_utils.get_attr(mirror.model, key), before)
    mirror.unpatch_model()
    assert torch.equal(comfy_utils.get_attr(mirror.model, key), before)


def test_the_save_refusal_names_the_gate_file_to_keep(comfy):
    expert_nodes = inprocess.pack_module("nodes.expert_nodes")
    composition = inprocess.pack_module("nodes.moe_composition")
    message = composition.save_refusal(expert_nodes.gate_source("trained", "my_gates.safetensors", ""))
    assert "models/mepg_gates/my_gates.safetensors" in message and "workflow" in message


def test_a_lora_the_experts_were_not_loaded_with_stops_the_model_call(comfy, tiny_checkpoints, tiny_extras):
    """A caller that loads the model without ComfyUI's sampling preparation (so without the experts made
    for its LoRA) gets an error, not a silently LoRA-less expert mix; loading it with its experts works."""
    import comfy.model_management as mm
    import comfy.patcher_extension as extension

    composition = inprocess.pack_module("nodes.moe_composition")
    model = comfy.node("CheckpointLoaderSimple")().load_checkpoint(tiny_checkpoints["base"].name)[0]
    stack = comfy.node("MEPG_ExpertStackLoader").execute(tiny_checkpoints["anime"].name, "anime", "anime").args[0]
    patched = comfy.node("MEPG_GatedMoEPatch").execute(model, stack, True, "uniform", "none", "", 0, True, 1.0,
                                                       0.5).args[0]
    with_lora = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(patched, tiny_extras["lora"].name, 1.0)[0]
    (routing_wrapper,) = with_lora.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, composition.KEY)
    calls = []

    def call():
        routing_wrapper(lambda *args, **kwargs: calls.append(1), torch.zeros(1, 4, 8, 8), torch.zeros(1), None, None,
                        None, {})

    mm.load_models_gpu([with_lora])  # the model alone: no experts carrying its LoRA
    with_lora.pre_run()
    try:
        with pytest.raises(RuntimeError, match="experts were not loaded with"):
            call()
        composition.load_moe_models(with_lora)
        call()
        assert calls == [1]
    finally:
        with_lora.cleanup()
