"""ExpertStackLoader / LoRAExpertLoader / GatedMoEPatch in real ComfyUI: equivalences with the base model."""

from __future__ import annotations

import json

import pytest
import torch

STEPS, CFG, SEED = 4, 4.0, 11


@pytest.fixture(scope="module")
def loaded(comfy, tiny_checkpoints):
    loader = comfy.node("CheckpointLoaderSimple")()
    base, clip, _ = loader.load_checkpoint(tiny_checkpoints["base"].name)[:3]
    names = ("photo", "anime", "watercolor")
    experts = {name: loader.load_checkpoint(tiny_checkpoints[name].name)[0] for name in names}
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a lighthouse by the sea"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return {"base": base, "clip": clip, "experts": experts, "pos": pos, "neg": neg}


def sample(comfy, model, loaded, latent=None, seed=SEED):
    latent = latent or {"samples": torch.zeros(1, 4, 24, 32)}
    return comfy.nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "normal", loaded["pos"], loaded["neg"],
                                       latent)[0]["samples"]


def stack(comfy, tiny_checkpoints, names=("photo", "anime", "watercolor")):
    portfolio = None
    for name in names:
        portfolio = comfy.node("MEPG_ExpertStackLoader").execute(
            tiny_checkpoints[name].name, "", name, expert_stack=portfolio).args[0]
    return portfolio


def patch(comfy, model, portfolio, include_base=True, gate_mode="uniform", gate_file="none", forced="", top_k=0,
          normalise=True, clip=None):
    return comfy.node("MEPG_GatedMoEPatch").execute(model, portfolio, include_base, gate_mode, gate_file, forced,
                                                    top_k, normalise, 1.0, 0.5, clip=clip).args[0]


def test_base_only_stack_equals_the_unpatched_model(comfy, loaded, tiny_checkpoints):
    base = loaded["base"]
    ref = sample(comfy, base, loaded)
    only_base = patch(comfy, base, None, include_base=True)
    assert (sample(comfy, only_base, loaded) - ref).abs().max() <= 1e-5
    # the base checkpoint file as the only expert, without the implicit base
    from_file = patch(comfy, base, stack(comfy, tiny_checkpoints, ["base"]), include_base=False)
    assert (sample(comfy, from_file, loaded) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["photo", "anime", "watercolor"])
def test_one_hot_gate_equals_that_experts_own_checkpoint(comfy, loaded, tiny_checkpoints, name):
    patched = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), gate_mode="forced", forced=name)
    own = sample(comfy, loaded["experts"][name], loaded)
    err = (sample(comfy, patched, loaded) - own).abs().max().item()
    assert err <= 1e-4, err
    assert (own - sample(comfy, loaded["base"], loaded)).abs().max() > 1e-2  # experts really differ


def test_uniform_mixture_differs_from_every_expert_and_is_deterministic(comfy, loaded, tiny_checkpoints):
    patched = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints))
    a, b = sample(comfy, patched, loaded), sample(comfy, patched, loaded)
    assert torch.equal(a, b)
    for model in [loaded["base"], *loaded["experts"].values()]:
        assert (a - sample(comfy, model, loaded)).abs().max() > 1e-3
    top1 = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), top_k=1)
    assert torch.isfinite(sample(comfy, top1, loaded)).all()


def test_unpatching_restores_the_base_bit_for_bit(comfy, loaded, tiny_checkpoints):
    base = loaded["base"]
    before = sample(comfy, base, loaded)
    patched = patch(comfy, base, stack(comfy, tiny_checkpoints), gate_mode="forced", forced="anime")
    sample(comfy, patched, loaded)
    after = sample(comfy, base, loaded)
    assert torch.equal(before, after)
    assert sample(comfy, patched, loaded).sub(before).abs().max() > 1e-2


def test_patched_and_base_in_one_graph(comfy, tiny_checkpoints):
    def graph(with_patched: bool, with_base: bool) -> dict:
        g = {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoints["base"].name}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red boat", "clip": ["ckpt", 1]}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
            "s1": {"class_type": "MEPG_ExpertStackLoader", "inputs": {
                "ckpt_name": tiny_checkpoints["anime"].name, "name": "anime", "style_tags": "anime"}},
            "moe": {"class_type": "MEPG_GatedMoEPatch", "inputs": {
                "model": ["ckpt", 0], "expert_stack": ["s1", 0], "include_base": True, "gate_mode": "forced",
                "gate_file": "none", "forced_expert": "anime", "top_k": 0, "normalise": True, "temperature": 1.0,
                "global_region_bias": 0.5}},
        }
        for name, model in (("k_patched", ["moe", 0]), ("k_base", ["ckpt", 0])):
            if (name == "k_patched" and with_patched) or (name == "k_base" and with_base):
                g[name] = {"class_type": "KSampler", "inputs": {
                    "model": model, "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                    "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
                g[name + "_save"] = {"class_type": "SaveImage", "inputs": {
                    "images": [name + "_dec", 0], "filename_prefix": "mepg_contract_moe"}}
                g[name + "_dec"] = {"class_type": "VAEDecode", "inputs": {"samples": [name, 0], "vae": ["ckpt", 2]}}
        return g

    def latent_of(node):
        entry = comfy.executor.caches.outputs.get(node)
        value = entry.outputs if hasattr(entry, "outputs") else entry[0]
        return value[0][0]["samples"].clone()

    comfy.run(graph(True, True))
    both = latent_of("k_patched"), latent_of("k_base")
    comfy.executor.reset()
    comfy.run(graph(False, True))
    alone_base = latent_of("k_base")
    comfy.executor.reset()
    comfy.run(graph(True, False))
    alone_patched = latent_of("k_patched")
    # ComfyUI may batch cond and uncond differently when two models are loaded (its memory estimate),
    # which reorders float sums: equal up to rounding, relative to the latents' magnitude.
    scale = alone_base.abs().max()
    assert (both[1] - alone_base).abs().max() <= 1e-5 * scale
    assert (both[0] - alone_patched).abs().max() <= 1e-5 * scale
    assert (both[0] - both[1]).abs().max() > 1e-2 * scale


def test_loras_applied_before_the_patch_are_kept(comfy, loaded, tiny_checkpoints, tiny_extras):
    lora_model = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(
        loaded["base"], tiny_extras["lora"].name, 1.0)[0]
    with_lora = sample(comfy, lora_model, loaded)
    assert (with_lora - sample(comfy, loaded["base"], loaded)).abs().max() > 1e-3  # the LoRA matters
    patched = patch(comfy, lora_model, stack(comfy, tiny_checkpoints), gate_mode="forced", forced="base")
    assert (sample(comfy, patched, loaded) - with_lora).abs().max() <= 1e-4


def test_lora_expert_equals_the_lora_applied_model(comfy, loaded, tiny_extras):
    portfolio = comfy.node("MEPG_LoRAExpertLoader").execute(tiny_extras["lora"].name, 1.0, "inked", "ink").args[0]
    patched = patch(comfy, loaded["base"], portfolio, gate_mode="forced", forced="inked")
    lora_model = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(
        loaded["base"], tiny_extras["lora"].name, 1.0)[0]
    assert (sample(comfy, patched, loaded) - sample(comfy, lora_model, loaded)).abs().max() <= 1e-4


def test_bad_experts_fail_clearly_and_leave_nothing_patched(comfy, loaded, tiny_checkpoints, tiny_extras, tmp_path):
    base = loaded["base"]
    before = sample(comfy, base, loaded)
    sd15 = comfy.node("MEPG_ExpertStackLoader").execute(tiny_extras["sd15"].name, "old", "").args[0]
    with pytest.raises(ValueError, match=r"tiny_sd15_like\.safetensors.*attn2\.to_k"):
        patch(comfy, base, sd15)
    with pytest.raises(Exception, match="no_such_model"):
        comfy.node("MEPG_ExpertStackLoader").execute("no_such_model.safetensors", "", "")
    with pytest.raises(ValueError, match="forced_expert"):
        patch(comfy, base, stack(comfy, tiny_checkpoints), gate_mode="forced", forced="")
    with pytest.raises(ValueError, match="unicorn"):
        patch(comfy, base, stack(comfy, tiny_checkpoints), gate_mode="forced", forced="unicorn")
    with pytest.raises(ValueError, match="already in the stack"):
        stack(comfy, tiny_checkpoints, ["photo", "photo"])
    assert torch.equal(sample(comfy, base, loaded), before)


def test_gate_file_for_another_stack_is_rejected(comfy, loaded, tiny_checkpoints):
    import folder_paths
    import inprocess

    gating = inprocess.pack_module("mepg_core.gating")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    patched = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints, ["photo", "anime"]))
    attachment = patched.get_attachment("mepg_moe")
    gates = gating.GateSet.random(attachment.stack, seed=1)
    gate_dir = folder_paths.get_folder_paths("mepg_gates")[0]
    path = f"{gate_dir}/two_experts.safetensors"
    gate_files.save_gate_file(path, gates, attachment.stack, gating.GateOptions())
    folder_paths.filename_list_cache.clear()
    ok = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints, ["photo", "anime"]), gate_mode="trained",
               gate_file="two_experts.safetensors")
    assert torch.isfinite(sample(comfy, ok, loaded)).all()
    with pytest.raises(ValueError, match="MEPG Gated MoE Patch"):
        patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), gate_mode="trained",
              gate_file="two_experts.safetensors")


def test_cross_denoise_routes_each_window_to_its_regions_expert(comfy, loaded, tiny_checkpoints):
    """A full-canvas region forced to 'anime', all steps local: equals the anime checkpoint's KSampler."""
    clip = loaded["clip"]
    layout = {"version": 1, "global_prompt": "a lighthouse by the sea", "regions": [
        {"label": "sea", "prompt": "a lighthouse by the sea", "box": [0, 0, 1000, 1000], "expert": "anime"}]}
    lay = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    regions = comfy.node("MEPG_RegionMaskBuilder").execute(lay, 256, 192, 0, "smaller_on_top", 0.5, clip=clip).args[0]
    patched = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints))
    out = comfy.node("MEPG_CrossDenoiseKSampler").execute(
        patched, SEED, STEPS, CFG, "euler", "normal", loaded["pos"], loaded["neg"],
        {"samples": torch.zeros(1, 4, 24, 32)}, regions, p1=1.0, interleave=0, alpha_start=1.0, alpha_end=1.0,
        context_margin_px=32, denoise=1.0,
    ).args[0]["samples"]
    own = sample(comfy, loaded["experts"]["anime"], loaded)
    assert (out - own).abs().max().item() <= 1e-4


@pytest.mark.parametrize("global_phase", ["bias", "fusion"])
def test_routing_contexts_seen_during_local_and_global_passes(comfy, loaded, tiny_checkpoints, global_phase):
    clip = loaded["clip"]
    layout = {"version": 1, "global_prompt": "a harbour", "regions": [
        {"label": "boat", "prompt": "a boat", "box": [0, 300, 500, 1000], "style": "watercolor"},
        {"label": "gull", "prompt": "a gull", "box": [550, 0, 1000, 500], "expert": "photo"}]}
    lay = comfy.node("MEPG_LayoutFromJSON").execute(json.dumps(layout)).args[0]
    regions = comfy.node("MEPG_RegionMaskBuilder").execute(lay, 256, 192, 0, "smaller_on_top", 0.5, clip=clip).args[0]
    patched = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints))
    attachment = patched.get_attachment("mepg_moe")
    seen = []
    original = attachment.routing.context_for

    def spy(batch, cond_or_uncond, sigma, hw, frame=None):
        ctx = original(batch, cond_or_uncond, sigma, hw, frame=frame)
        seen.append((attachment.routing.current_pass(), ctx, hw))
        return ctx

    attachment.routing.context_for = spy
    try:
        comfy.node("MEPG_CrossDenoiseKSampler").execute(
            patched, SEED, 4, CFG, "euler", "normal", loaded["pos"], loaded["neg"],
            {"samples": torch.zeros(1, 4, 24, 32)}, regions, p1=0.5, interleave=0, alpha_start=1.0, alpha_end=1.0,
            context_margin_px=32, denoise=1.0, global_phase=global_phase, global_alpha_start=0.5)
    finally:
        attachment.routing.context_for = original
    stack_ = attachment.stack
    local = [(p, c, hw) for p, c, hw in seen if p is not None and p.kind == "local"]
    assert {p.region_index for p, _, _ in local} == {0, 1}
    for p, ctx, _ in local:
        route = ctx.routes[0]
        if p.region_index == 0:  # a style: a prior on the gate, allowing only the watercolor expert
            want = [1.0 if i == stack_.expert_index("watercolor") else 0.0 for i in range(stack_.num_experts)]
            assert route.kind == "prior" and list(route.weights) == want
        else:  # a forced expert stays forced
            assert route.kind == "forced" and route.expert == stack_.expert_index("photo")
        assert ctx.row_region.tolist() == [0] * ctx.batch_size
    glob = [(p, c, hw) for p, c, hw in seen if p is not None and p.kind == "global"]
    assert glob, "the global phase was not announced"
    if global_phase == "fusion":  # the global pass is the gate's; regions come in through their own windows
        assert all(ctx.region_map is None and not ctx.routes for _, ctx, _ in glob)
        return
    for _, ctx, hw in glob:
        assert ctx.region_map.shape[1:] == hw
        assert {int(v) for v in ctx.region_map.unique()} == {-1, 0, 1}
        assert all(r.kind == "prior" for r in ctx.routes)


def test_style_centroid_gates_are_training_free_and_deterministic(comfy, loaded, tiny_checkpoints):
    with pytest.raises(ValueError, match="needs a CLIP"):
        patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), gate_mode="style_centroid")
    a = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), gate_mode="style_centroid", clip=loaded["clip"])
    b = patch(comfy, loaded["base"], stack(comfy, tiny_checkpoints), gate_mode="style_centroid", clip=loaded["clip"])
    gates_a = a.get_attachment("mepg_moe").modules.gate_set()
    gates_b = b.get_attachment("mepg_moe").modules.gate_set()
    assert gates_a.mode == "linear"
    for path, (weight, bias, _) in gates_a.params.items():
        assert torch.equal(weight, gates_b.params[path][0]) and torch.equal(bias, gates_b.params[path][1])
        assert weight.abs().sum() > 0
    out = sample(comfy, a, loaded)
    assert torch.isfinite(out).all()
    for model in [loaded["base"], *loaded["experts"].values()]:
        assert (out - sample(comfy, model, loaded)).abs().max() > 1e-3
