"""The pack as ComfyUI sees it: registration, schemas, and a committed snapshot of the public surface."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("node_schema_snapshot.json")
PACK_NODES = {
    "MEPG_LayoutFromJSON", "MEPG_RegionMaskBuilder", "MEPG_ExpertStackLoader", "MEPG_LoRAExpertLoader",
    "MEPG_GatedMoEPatch", "MEPG_CrossDenoiseKSampler", "MEPG_CrossDenoiseGuider", "MEPG_LLMLayoutPlanner",
    "MEPG_LayoutEditor", "MEPG_TrainMoEGate", "MEPG_SaveMoEGate", "MEPG_RegionalMoERouting",
    "MEPG_CrossDenoiseKSamplerAdvanced",
}


def pack_node_ids(comfy) -> set[str]:
    return {k for k in comfy.mappings if k.startswith("MEPG_")}


def public_surface(comfy) -> dict:
    """Node id -> input names/types (required, optional) and output names/types, from ComfyUI's own info."""
    surface = {}
    for node_id in sorted(pack_node_ids(comfy)):
        info = comfy.node(node_id).GET_NODE_INFO_V1()
        inputs = {}
        for kind in ("required", "optional"):
            inputs[kind] = {name: spec[0] if isinstance(spec[0], str) else "COMBO"
                            for name, spec in info["input"].get(kind, {}).items()}
        surface[node_id] = {
            "inputs": inputs,
            "outputs": [[n, t] for n, t in zip(info["output_name"], info["output"])],
        }
    return surface


def test_pack_nodes_are_registered(comfy):
    assert PACK_NODES <= pack_node_ids(comfy)
    assert "CheckpointLoaderSimple" in comfy.mappings and "KSampler" in comfy.mappings


def test_every_node_is_documented_for_people(comfy):
    for node_id in pack_node_ids(comfy):
        schema = comfy.node(node_id).GET_SCHEMA()
        assert schema.display_name and schema.description, node_id
        assert schema.category.startswith("MEPG"), node_id
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
        out_ids = {o.id for o in schema.outputs}
        assert not out_ids & {i.id for i in schema.inputs}, f"{node_id}: an output id repeats an input id"
    # the frontend's node help pages: web/docs/<node id>.md, titled with the display name
    docs = Path(__file__).resolve().parents[2] / "web" / "docs"
    for node_id in pack_node_ids(comfy):
        page = docs / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no help page {page.name}"
        title = page.read_text(encoding="utf-8").splitlines()[0]
        assert title == f"# {comfy.node(node_id).GET_SCHEMA().display_name}", (node_id, title)


def test_public_surface_matches_snapshot(comfy):
    """Saved workflows store node ids, input names and output positions: changing them breaks users.

    Additions are fine but must be acknowledged: rerun with UPDATE_SNAPSHOT=1 to rewrite the file.
    """
    current = public_surface(comfy)
    if os.environ.get("UPDATE_SNAPSHOT") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    saved = json.loads(SNAPSHOT.read_text())
    breaking = []
    for node_id, old in saved.items():
        new = current.get(node_id)
        if new is None:
            breaking.append(f"{node_id}: node removed or renamed")
            continue
        for kind in ("required", "optional"):
            for name, typ in old["inputs"][kind].items():
                now = {**new["inputs"]["required"], **new["inputs"]["optional"]}.get(name)
                if now is None:
                    breaking.append(f"{node_id}.{name}: input removed or renamed")
                elif now != typ:
                    breaking.append(f"{node_id}.{name}: type {typ} -> {now}")
        for name in new["inputs"]["required"]:
            if name not in old["inputs"]["required"]:
                breaking.append(f"{node_id}.{name}: new required input (old API prompts lack it)")
        for i, (name, typ) in enumerate(old["outputs"]):
            if i >= len(new["outputs"]) or new["outputs"][i][1] != typ:
                breaking.append(f"{node_id}: output {i} ({name}: {typ}) moved, removed or retyped")
    assert not breaking, "breaking changes to saved workflows:\n" + "\n".join(breaking)
    assert current == saved, "the pack's public surface grew; rerun with UPDATE_SNAPSHOT=1 and commit the file"


def test_tiny_checkpoints_load_with_the_standard_loader(comfy, tiny_checkpoints):
    loader = comfy.node("CheckpointLoaderSimple")()
    model, clip, vae = loader.load_checkpoint(tiny_checkpoints["base"].name)[:3]
    assert type(model.model).__name__ == "SDXL"
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red apple"))
    assert tuple(cond[0][0].shape) == (1, 77, 2048)
    assert tuple(cond[0][1]["pooled_output"].shape) == (1, 1280)
    assert vae is not None
    for name in ("photo", "anime", "watercolor"):
        m, c, v = loader.load_checkpoint(tiny_checkpoints[name].name)[:3]
        assert type(m.model).__name__ == "SDXL" and c is None and v is not None


@pytest.mark.parametrize("node_id", sorted(PACK_NODES))
def test_schema_validates(comfy, node_id):
    comfy.node(node_id).GET_SCHEMA().validate()


def test_a_comfyui_older_than_the_tested_ones_gets_one_warning(comfy, monkeypatch, caplog):
    import logging

    import comfyui_version
    import inprocess

    extension = inprocess.pack_module("nodes.extension")
    assert extension.warn_if_unsupported() is None  # this host is one the CI tests
    monkeypatch.setattr(comfyui_version, "__version__", "0.3.60")
    monkeypatch.setattr(extension, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="mepg"):
        for _ in range(3):  # the pack may be asked again (node list refreshes): still one line
            assert "0.3.60" in extension.warn_if_unsupported()
    said = [r.getMessage() for r in caplog.records if r.name == "mepg" and "older than 0.3.75" in r.getMessage()]
    assert len(said) == 1 and "ComfyUI 0.3.60" in said[0] and "0.33.0" in said[0]
