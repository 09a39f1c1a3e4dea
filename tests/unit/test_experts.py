"""Expert stacks: lazy site loading, validation, dtype, memory, hashes, names/tags and LoRA experts."""

from __future__ import annotations

import hashlib

import pytest
import torch
from mepg_expert_testing import PREFIX, SD15_CONTEXT, block_paths, unet_tensors, write_checkpoint
from safetensors.torch import save_file

from mepg_core import experts
from mepg_core.experts import (
    ExpertSpec,
    default_style_tags,
    diffusers_attention_names,
    discover_sites,
    is_site_key,
    load_expert_stack,
    read_unet_header,
    site_content_hash,
)
from mepg_core.styles import canonical_style, style_family

ROLES = experts.SITE_ROLES


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny SDXL-layout checkpoints and their tensors."""
    root = tmp_path_factory.mktemp("ckpts")
    base = unet_tensors(1)
    other = unet_tensors(2)
    return {
        "base": (write_checkpoint(root / "realismEngineSDXL_v30VAE.safetensors", base), base),
        "anime": (write_checkpoint(root / "animagineXL_v31.safetensors", other), other),
        "root": root,
    }


def site_keys_in_order(tensors):
    keys = []
    for block in block_paths():
        for role in ROLES:
            keys.append(f"{block}.{role}.weight")
            if role.startswith("ff."):
                keys.append(f"{block}.{role}.bias")
    assert all(k in tensors for k in keys)
    return keys


# ---------------------------------------------------------------------------------------------- sites


def test_sites_are_discovered_from_keys_in_execution_order(ckpts):
    _, base = ckpts["base"]
    sites = discover_sites(base)
    assert len(sites) == 8 * len(block_paths())  # 12 blocks here; never a hard-coded 70
    assert [s.block for s in sites[:: len(ROLES)]] == block_paths()
    by_path = {s.path: s for s in sites}
    k = by_path["input_blocks.7.1.transformer_blocks.1.attn2.to_k"]
    assert (k.out_features, k.in_features, k.has_bias, k.input_kind) == (16, 2048, False, "context")
    proj = by_path["middle_block.1.transformer_blocks.0.ff.net.0.proj"]
    assert (proj.out_features, proj.in_features, proj.has_bias, proj.input_kind) == (128, 16, True, "spatial")
    assert not is_site_key("input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight")
    assert is_site_key("output_blocks.5.1.transformer_blocks.0.ff.net.2.bias")


def test_incomplete_block_is_rejected(ckpts):
    _, base = ckpts["base"]
    broken = dict(base)
    del broken["middle_block.1.transformer_blocks.0.attn1.to_v.weight"]
    with pytest.raises(ValueError, match=r"middle_block\.1\.transformer_blocks\.0\.attn1\.to_v\.weight"):
        discover_sites(broken, "broken.safetensors")


def test_diffusers_names_follow_the_level_structure(ckpts):
    names = diffusers_attention_names(ckpts["base"][1].keys())
    assert names == {
        "input_blocks.4.1": "down_blocks.1.attentions.0",
        "input_blocks.5.1": "down_blocks.1.attentions.1",
        "input_blocks.7.1": "down_blocks.2.attentions.0",
        "input_blocks.8.1": "down_blocks.2.attentions.1",
        "input_blocks.1.1": "down_blocks.0.attentions.0",
        "input_blocks.2.1": "down_blocks.0.attentions.1",
        "middle_block.1": "mid_block.attentions.0",
        **{f"output_blocks.{n}.1": f"up_blocks.{n // 3}.attentions.{n % 3}" for n in range(9)},
    }
    # Only site keys known: the input-block sequence has gaps, so no guessing.
    assert diffusers_attention_names([k for k in ckpts["base"][1] if is_site_key(k)]) == {}


# ---------------------------------------------------------------------------------------------- loading


def test_stack_holds_each_experts_site_tensors(ckpts):
    (p0, t0), (p1, t1) = ckpts["base"], ckpts["anime"]
    stack = load_expert_stack([p0, p1])
    assert stack.num_experts == 2 and stack.dtype == torch.float32
    assert stack.blocks == block_paths()
    for site in stack.sites:
        assert stack.weights[site.path].shape == (2, site.out_features, site.in_features)
        assert torch.equal(stack.weights[site.path][0], t0[site.weight_key])
        assert torch.equal(stack.weights[site.path][1], t1[site.weight_key])
        if site.has_bias:
            assert torch.equal(stack.biases[site.path][1], t1[site.bias_key])
        else:
            assert stack.biases[site.path] is None
    assert stack.expert_tensors(1)["middle_block.1.transformer_blocks.0.ff.net.2.bias"].data_ptr() == (
        stack.biases["middle_block.1.transformer_blocks.0.ff.net.2"][1].data_ptr()
    )


def test_only_site_tensors_are_read(ckpts, monkeypatch):
    read_keys = []
    real_safe_open = experts.safe_open

    class RecordingHandle:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_slice(self, key):
            return self._handle.get_slice(key)

        def get_tensor(self, key):
            read_keys.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(experts, "safe_open", RecordingHandle)
    (p0, t0), (p1, _) = ckpts["base"], ckpts["anime"]
    load_expert_stack([p0, p1])
    expected = [PREFIX + k for k in site_keys_in_order(t0)]
    assert read_keys == expected * 2  # every site tensor once per expert, nothing else
    assert len(t0) > len(site_keys_in_order(t0))  # the files do hold other tensors


def test_unet_only_file_without_prefix_loads(ckpts, tmp_path):
    _, t0 = ckpts["base"]
    path = write_checkpoint(tmp_path / "unet_only.safetensors", t0, prefix="", extra_keys=False)
    stack = load_expert_stack([path, ckpts["base"][0]])
    assert stack.experts[0].content_hash == stack.experts[1].content_hash
    assert set(read_unet_header(path)) == set(t0)


def test_sd15_checkpoint_is_refused_naming_file_and_key(ckpts, tmp_path):
    path = write_checkpoint(tmp_path / "dreamshaper_8.safetensors", unet_tensors(3, context_dim=SD15_CONTEXT))
    with pytest.raises(ValueError) as error:
        load_expert_stack([ckpts["base"][0], path])
    message = str(error.value)
    assert "dreamshaper_8.safetensors" in message
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in message
    assert "context_dim 768" in message and "SD1" in message


def test_wrong_shape_missing_and_extra_keys_name_file_and_key(ckpts, tmp_path):
    base_path, base = ckpts["base"]
    wrong = dict(base)
    wrong["output_blocks.3.1.transformer_blocks.0.ff.net.2.weight"] = torch.zeros(8, 33)
    path = write_checkpoint(tmp_path / "wrong_shape.safetensors", wrong)
    with pytest.raises(
        ValueError,
        match=r"wrong_shape\.safetensors.*output_blocks\.3\.1\.transformer_blocks\.0\.ff\.net\.2\.weight.*\(8, 33\)",
    ):
        load_expert_stack([base_path, path])

    missing = {k: v for k, v in base.items() if k != "output_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"}
    path = write_checkpoint(tmp_path / "missing.safetensors", missing)
    with pytest.raises(
        ValueError,
        match=r"missing\.safetensors: missing 'output_blocks\.4\.1\.transformer_blocks\.0\.attn1\.to_k\.weight'",
    ):
        load_expert_stack([base_path, path])

    extra = dict(base)
    extra["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(8, 8)
    path = write_checkpoint(tmp_path / "extra.safetensors", extra)
    with pytest.raises(
        ValueError,
        match=r"extra\.safetensors: unexpected 'input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q\.weight'",
    ):
        load_expert_stack([base_path, path])


def test_only_safetensors_files_are_accepted(ckpts, tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"model\.ckpt.*\.safetensors"):
        load_expert_stack([ckpts["base"][0], pickled])
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_expert_stack([tmp_path / "nowhere.safetensors"])
    with pytest.raises(ValueError, match="at least one expert"):
        load_expert_stack([])


def test_reference_shapes_come_from_the_base_model(ckpts):
    _, t0 = ckpts["base"]
    reference = {"diffusion_model." + k: v for k, v in unet_tensors(9, context_dim=SD15_CONTEXT).items()}
    with pytest.raises(ValueError, match="realismEngineSDXL_v30VAE.safetensors.*context_dim 2048 vs 768"):
        load_expert_stack([ckpts["base"][0]], reference=reference)
    stack = load_expert_stack([ckpts["base"][0]], reference={k: tuple(v.shape) for k, v in t0.items()})
    assert len(stack.sites) == 8 * len(block_paths())


# ---------------------------------------------------------------------------------------------- dtype, memory, hash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_cast(ckpts, dtype):
    (p0, _), (p1, t1) = ckpts["base"], ckpts["anime"]
    stack = load_expert_stack([p0, p1], dtype=dtype)
    assert stack.dtype == dtype
    for site in stack.sites:
        assert stack.weights[site.path].dtype == dtype
        assert torch.equal(stack.weights[site.path][1], t1[site.weight_key].to(dtype))
        if site.has_bias:
            assert stack.biases[site.path].dtype == dtype
    # The content hash does not depend on the stack's dtype.
    assert stack.experts[0].content_hash == load_expert_stack([p0]).experts[0].content_hash


def test_default_dtype_is_the_files(tmp_path):
    path = write_checkpoint(tmp_path / "half.safetensors", unet_tensors(4, dtype=torch.float16))
    assert load_expert_stack([path]).dtype == torch.float16


def test_memory_accounting_is_the_sum_of_site_tensor_bytes(ckpts):
    (p0, t0), (p1, _) = ckpts["base"], ckpts["anime"]
    stack = load_expert_stack([p0, p1], dtype=torch.float16)
    expected = sum(t0[k].numel() * 2 for k in site_keys_in_order(t0))
    assert [e.site_bytes for e in stack.experts] == [expected, expected]
    assert stack.site_bytes_per_expert == expected
    assert stack.nbytes == 2 * expected


def test_content_hash(ckpts, tmp_path):
    (p0, t0), (p1, _) = ckpts["base"], ckpts["anime"]
    copy = write_checkpoint(tmp_path / "renamed_copy.safetensors", t0)
    stack = load_expert_stack([p0, p1, copy])
    hashes = [e.content_hash for e in stack.experts]
    assert hashes[0] == hashes[2] != hashes[1]
    # Documented formula: sha256 over (key, dtype, shape, bytes) of the site tensors in stack order.
    digest = hashlib.sha256()
    for key in site_keys_in_order(t0):
        tensor = t0[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert hashes[0] == digest.hexdigest() == site_content_hash((k, t0[k]) for k in site_keys_in_order(t0))
    # The same weights in memory have the same identity as the file.
    in_memory = load_expert_stack([ExpertSpec.from_tensors("live", {"diffusion_model." + k: v for k, v in t0.items()})])
    assert in_memory.experts[0].content_hash == hashes[0]


# ---------------------------------------------------------------------------------------------- names and tags


def test_default_names_and_tags(ckpts, tmp_path):
    (p0, t0), (p1, _) = ckpts["base"], ckpts["anime"]
    dup = write_checkpoint(tmp_path / "animagineXL_v31.safetensors", t0)
    stack = load_expert_stack([p0, p1, dup])
    assert stack.expert_names == ["realismEngineSDXL_v30VAE", "animagineXL_v31", "animagineXL_v31 (2)"]
    assert stack.experts[0].tags == ["realism"] and stack.experts[1].tags == ["anime"]
    assert default_style_tags("RealVisXL_V5.0") == ["realism"]
    assert default_style_tags("halcyonSDXL_v17") == ["halcyon"]
    assert default_style_tags("sdxl_v10") == []


def test_names_and_tags_are_editable_and_resolvable(ckpts):
    stack = load_expert_stack(
        [ckpts["base"][0], ExpertSpec.checkpoint(ckpts["anime"][0], name="Anime", tags=["anime", "2d"])]
    )
    assert stack.experts[1].name == "Anime" and stack.experts[1].tags == ["anime", "2d"]
    stack.rename_expert(0, "Photo")
    stack.set_tags("Photo", ["Realism", " photo "])
    assert stack.experts[0].tags == ["realism", "photo"]
    assert stack.expert_index("photo") == 0 and stack.expert_index("2D") == 1 and stack.expert_index(1) == 1
    with pytest.raises(ValueError, match="already named"):
        stack.rename_expert(0, "anime")
    with pytest.raises(KeyError, match="no expert"):
        stack.expert_index("watercolour")
    assert stack.style_prior("anime").tolist() == [0.0, 1.0]
    assert stack.style_prior("cubism") is None and stack.style_prior(None) is None


def test_region_styles_find_experts_tagged_in_other_words(ckpts):
    specs = [ExpertSpec.checkpoint(ckpts["base"][0], name="real", tags=["realism"]),
             ExpertSpec.checkpoint(ckpts["anime"][0], name="toon", tags=["anime"]),
             ExpertSpec.checkpoint(ckpts["anime"][0], name="brush", tags=["painting"]),
             ExpertSpec.checkpoint(ckpts["anime"][0], name="wash", tags=["Watercolour"])]
    stack = load_expert_stack(specs)
    # the planner's words for a style reach the tag a person or the file-name guess gave the expert
    assert stack.style_prior("photorealistic").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stack.style_prior("Photo style").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stack.style_prior("manga").tolist() == [0.0, 1.0, 0.0, 0.0]
    # an exact style wins over its family; the family is the fallback
    assert stack.style_prior("watercolor").tolist() == [0.0, 0.0, 0.0, 1.0]
    assert stack.style_prior("oil painting").tolist() == [0.0, 0.0, 1.0, 1.0]
    assert stack.style_prior("sketch") is None  # no illustration expert here
    assert stack.style_prior("toon").tolist() == [0.0, 1.0, 0.0, 0.0]  # an expert's name


def test_canonical_styles():
    assert canonical_style("  Hyper-Realistic  ") == "photo" and canonical_style("oil_painting") == "oil painting"
    assert canonical_style("watercolor-style") == "watercolor" and canonical_style("cubism") == "cubism"
    assert canonical_style(None) == "" and canonical_style("style") == "style"
    assert style_family("impressionist") == "painting" and style_family("cubism") is None


# ---------------------------------------------------------------------------------------------- LoRA experts


def _lora_pair(seed, out_features, in_features, rank=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)


def test_kohya_lora_expert_is_base_plus_delta(ckpts, tmp_path):
    base_path, base = ckpts["base"]
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    ff2 = "output_blocks.0.1.transformer_blocks.0.ff.net.2"
    up_q, down_q = _lora_pair(1, 8, 8)
    up_f, down_f = _lora_pair(2, 16, 64, rank=4)
    lora = {
        "lora_unet_" + q.replace(".", "_") + ".lora_up.weight": up_q,
        "lora_unet_" + q.replace(".", "_") + ".lora_down.weight": down_q,
        "lora_unet_" + q.replace(".", "_") + ".alpha": torch.tensor(1.0),
        "lora_unet_" + ff2.replace(".", "_") + ".lora_up.weight": up_f,
        "lora_unet_" + ff2.replace(".", "_") + ".lora_down.weight": down_f,
        "lora_unet_" + ff2.replace(".", "_") + ".alpha": torch.tensor(8.0),
        # Not MoE sites: ignored and reported.
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight": torch.zeros(8, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
    }
    lora_path = tmp_path / "pixelArt_style.safetensors"
    save_file(lora, str(lora_path))
    stack = load_expert_stack([base_path, ExpertSpec.lora(lora_path, base_path, strength=0.7)])
    expert = stack.experts[1]
    assert expert.name == "pixelArt_style" and expert.tags == ["pixel"] and expert.kind == "lora"
    assert expert.lora.applied_sites == [q, ff2]
    assert expert.lora.ignored_keys == sorted(k for k in lora if "to_out" in k or "lora_te1" in k)
    expected_q = base[q + ".weight"] + 0.7 * (1.0 / 2) * (up_q @ down_q)
    expected_ff = base[ff2 + ".weight"] + 0.7 * (8.0 / 4) * (up_f @ down_f)
    torch.testing.assert_close(stack.weights[q][1], expected_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(stack.weights[ff2][1], expected_ff, rtol=0, atol=1e-6)
    for site in stack.sites:
        if site.path not in (q, ff2):
            assert torch.equal(stack.weights[site.path][1], base[site.weight_key])
        if site.has_bias:
            assert torch.equal(stack.biases[site.path][1], base[site.bias_key])
    assert expert.content_hash != stack.experts[0].content_hash
    # A LoRA expert without the base in the stack reads the base itself: same weights, same hash.
    alone = load_expert_stack([ExpertSpec.lora(lora_path, base_path, strength=0.7)])
    assert torch.equal(alone.weights[q][0], stack.weights[q][1])
    assert alone.experts[0].content_hash == expert.content_hash
    # In half precision too: the row reused as base must hold the file's values, not rounded ones.
    half_pair = load_expert_stack([base_path, ExpertSpec.lora(lora_path, base_path, strength=0.7)], dtype=torch.float16)
    half_alone = load_expert_stack([ExpertSpec.lora(lora_path, base_path, strength=0.7)], dtype=torch.float16)
    assert torch.equal(half_pair.weights[q][1], half_alone.weights[q][0])
    assert torch.equal(half_pair.weights[ff2][1], half_alone.weights[ff2][0])
    other_strength = load_expert_stack([ExpertSpec.lora(lora_path, base_path, strength=0.5)])
    assert other_strength.experts[0].content_hash != expert.content_hash


def test_diffusion_model_lora_a_b_format_defaults_alpha_to_rank(ckpts, tmp_path):
    base_path, base = ckpts["base"]
    k = "middle_block.1.transformer_blocks.0.attn2.to_k"
    up, down = _lora_pair(3, 16, 2048, rank=3)
    lora_path = tmp_path / "lora_ab.safetensors"
    save_file({f"diffusion_model.{k}.lora_B.weight": up, f"diffusion_model.{k}.lora_A.weight": down}, str(lora_path))
    stack = load_expert_stack([ExpertSpec.lora(lora_path, base_path)])
    torch.testing.assert_close(stack.weights[k][0], base[k + ".weight"] + up @ down, rtol=0, atol=1e-5)
    assert stack.experts[0].lora.applied_sites == [k]


def test_diffusers_named_lora_keys_reach_the_right_sites(ckpts, tmp_path):
    base_path, base = ckpts["base"]
    up1, down1 = _lora_pair(4, 8, 2048)
    up2, down2 = _lora_pair(5, 128, 16)
    up3, down3 = _lora_pair(6, 16, 16)
    lora = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": down1,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": up1,
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight": down2,
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight": up2,
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_v_lora.down.weight": down3,
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_v_lora.up.weight": up3,
    }
    lora_path = tmp_path / "diffusers_lora.safetensors"
    save_file(lora, str(lora_path))
    stack = load_expert_stack([ExpertSpec.lora(lora_path, base_path)])
    targets = {
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k": up1 @ down1,
        "middle_block.1.transformer_blocks.0.attn1.to_v": up3 @ down3,
        "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj": up2 @ down2,
    }
    assert stack.experts[0].lora.applied_sites == list(targets)
    for path, delta in targets.items():
        torch.testing.assert_close(stack.weights[path][0], base[path + ".weight"] + delta, rtol=0, atol=1e-5)
    # A reference of site shapes alone hides the level structure; the base file's header supplies it.
    site_shapes = {k: tuple(v.shape) for k, v in base.items() if is_site_key(k)}
    with_reference = load_expert_stack([ExpertSpec.lora(lora_path, base_path)], reference=site_shapes)
    assert with_reference.experts[0].lora.applied_sites == list(targets)


def test_unusable_loras_are_refused(ckpts, tmp_path):
    base_path, _ = ckpts["base"]
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(16, 2)}, str(loha))
    with pytest.raises(
        ValueError, match=r"hada_w1_a.*middle_block\.1\.transformer_blocks\.0\.attn1\.to_q.*not support"
    ):
        load_expert_stack([ExpertSpec.lora(loha, base_path)])
    text_only = tmp_path / "text_only.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}, str(text_only))
    with pytest.raises(ValueError, match="text_only.safetensors: none of its 1 keys"):
        load_expert_stack([ExpertSpec.lora(text_only, base_path)])
    mismatched = tmp_path / "mismatched.safetensors"
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({q + ".lora_up.weight": torch.zeros(8, 2), q + ".lora_down.weight": torch.zeros(2, 9)}, str(mismatched))
    with pytest.raises(ValueError, match=r"mismatched\.safetensors.*lora_up.*\(8, 8\)"):
        load_expert_stack([ExpertSpec.lora(mismatched, base_path)])
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_expert_stack([ExpertSpec.lora(tmp_path / "style.pt", base_path)])
