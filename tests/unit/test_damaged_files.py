"""Damaged files give clear errors naming the file and its role: expert checkpoints, LoRAs and gate files
whose safetensors header or body is broken, gate files with bad metadata or NaN tensors, a planner model
folder with a bad config.json, and non-finite LoRA strengths."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from mepg_expert_testing import unet_tensors, write_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from mepg_core.experts import ExpertSpec, load_expert_stack, read_unet_header
from mepg_core.gate_files import load_gate_file, save_gate_file
from mepg_core.gating import GateSet
from mepg_core.planner.backends import ModelNotFoundError, check_model_config, load_causal_lm


def damage(path, how: str) -> Path:
    path = Path(path)
    data = path.read_bytes()
    if how == "header_too_large":
        path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif how == "header_too_small":
        path.write_bytes(b"tiny")
    elif how == "truncated":
        path.write_bytes(data[:-64])
    elif how == "header_json":
        size = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(data[:8] + b"{" * size + data[8 + size:])
    return path


DAMAGES = ["header_too_large", "header_too_small", "truncated", "header_json"]


@pytest.fixture(scope="module")
def stack_and_tensors():
    tensors = [unet_tensors(seed) for seed in (1, 2)]
    specs = [ExpertSpec.from_tensors(name, t) for name, t in zip(("photo", "anime"), tensors)]
    return load_expert_stack(specs), tensors


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_expert_checkpoint_names_file_and_role(tmp_path, how):
    path = damage(write_checkpoint(tmp_path / "photo.safetensors", unet_tensors(1)), how)
    for load in (lambda: read_unet_header(path),
                 lambda: load_expert_stack([ExpertSpec.from_tensors("base", unet_tensors(0)),
                                            ExpertSpec.checkpoint(path, name="photo")])):
        with pytest.raises(ValueError, match=rf"{path}: this expert checkpoint is damaged or not a safetensors file"):
            load()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_gate_file_names_file_and_role(stack_and_tensors, tmp_path, how):
    stack, _ = stack_and_tensors
    path = tmp_path / "gates.safetensors"
    save_gate_file(path, GateSet.random(stack, seed=1), stack)
    damage(path, how)
    with pytest.raises(ValueError, match=rf"{path}: this gate file is damaged or not a safetensors file"):
        load_gate_file(path, stack)


def rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("key, value, match", [
    ("mepg.experts", json.dumps([{"name": "photo"}, {"name": "anime"}]), r"'mepg.experts'\[0\] has no hash"),
    ("mepg.experts", json.dumps("photo, anime"), "'mepg.experts' must be a non-empty list of {name, hash} objects, "
                                                 "got 'photo, anime'"),
    ("mepg.experts", json.dumps(["photo", "anime"]), r"'mepg.experts'\[0\] must be an object with name and hash"),
    ("mepg.experts", json.dumps([{"name": "photo", "hash": 7}]), r"'mepg.experts'\[0\].hash must be a non-empty "
                                                                 "string, got 7"),
    ("mepg.experts", None, "'mepg.experts' is missing"),
    ("mepg.experts", "[" * 5000, "'mepg.experts' is nested more than 32 levels deep"),
    ("mepg.targets", json.dumps({"a": 1}), "'mepg.targets' must be a list of site paths"),
    ("mepg.gate_options", json.dumps({"temperature": "hot"}), "'mepg.gate_options'"),
    ("mepg.gate_options", json.dumps({"temperature": 10**400}), "'mepg.gate_options'"),
    ("mepg.sigma_features", "-4", "'mepg.sigma_features' must be >= 0"),
])
def test_damaged_gate_metadata_names_the_key(stack_and_tensors, tmp_path, key, value, match):
    stack, _ = stack_and_tensors
    path = tmp_path / "gates.safetensors"
    save_gate_file(path, GateSet.random(stack, seed=1), stack)
    rewrite_metadata(path, **{key: value})
    with pytest.raises(ValueError, match=rf"{path}: damaged gate-file metadata.*{match}"):
        load_gate_file(path, stack)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gate_tensors_are_refused_by_name(stack_and_tensors, tmp_path, value):
    stack, _ = stack_and_tensors
    gates = GateSet.random(stack, seed=1)
    target = next(iter(gates.params))
    weight, bias, sigma = gates.params[target]
    bad = weight.clone()
    bad[0, 0] = value
    gates.params[target] = (bad, bias, sigma)
    path = tmp_path / "gates.safetensors"
    save_gate_file(path, gates, stack)
    with pytest.raises(ValueError, match=rf"{path}: '{target}.gate_weight' has 1 NaN or infinite values"):
        load_gate_file(path, stack)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 10**400])
def test_a_non_finite_lora_strength_is_refused(strength):
    base = ExpertSpec.from_tensors("base", unet_tensors(0))
    with pytest.raises(ValueError, match="style.safetensors: LoRA strength must be a finite number"):
        ExpertSpec.lora("style.safetensors", base, strength=strength)


# --------------------------------------------------------------------------------------------------
# The transformers backend's model folder


@pytest.mark.parametrize("text, match", [
    ("{broken", r"config.json: the model's config is not valid JSON"),
    ("[1, 2]", "config.json: expected a JSON object, got list"),
    ("[" * 100_000, "config.json: the model's config is nested more than 32 levels deep"),
    ('{"hidden_size": 32}', "config.json: 'model_type' must name the architecture"),
    ('{"model_type": "qwen2", "hidden_size": "big"}', "config.json: 'hidden_size' must be a positive integer"),
    ('{"model_type": "qwen2", "num_hidden_layers": -3}', "'num_hidden_layers' must be a positive integer"),
    ('{"model_type": "qwen2", "vocab_size": 1000000000000}', "'vocab_size' must be a positive integer up to"),
    ('{"model_type": "qwen2", "hidden_size": NaN}', "config is not valid JSON .NaN is not allowed"),
])
def test_a_bad_config_json_is_named(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelNotFoundError, match=match) as info:
        check_model_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    with pytest.raises(ModelNotFoundError, match=match):
        load_causal_lm(tmp_path)


def test_what_transformers_refuses_is_still_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture"}')
    with pytest.raises(ModelNotFoundError, match=rf"cannot load a causal language model from {tmp_path}: \w+"):
        load_causal_lm(tmp_path)


def test_checks_do_not_refuse_a_good_gate_file(stack_and_tensors, tmp_path):
    stack, _ = stack_and_tensors
    path = tmp_path / "gates.safetensors"
    gates = GateSet.random(stack, seed=2)
    save_gate_file(path, gates, stack)
    target = next(iter(gates.params))
    assert torch.equal(load_gate_file(path, stack).gates.params[target][0], gates.params[target][0])
