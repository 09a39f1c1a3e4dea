"""Helpers shared by the test tiers and the demo (paths and fixture placement)."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_env import WORK_DIR

ROOT = Path(__file__).resolve().parents[1]
# The tiny checkpoints are the same files for every host; bases and artifacts are the host's own.
FIXTURE_DIR = ROOT / ".host" / "fixtures" / "checkpoints"
EXTRAS_DIR = ROOT / ".host" / "fixtures" / "extras"
ARTIFACTS = Path(os.environ.get("MEPG_ARTIFACTS", ROOT / "test-artifacts")).resolve()
EXPERTS = ("photo", "anime", "watercolor")
FIXTURE_VERSION = "2"  # bump when tools/make_tiny_models.py writes different checkpoints


def fixture_is_current(path: Path) -> bool:
    """Whether a tiny SDXL checkpoint exists and was written by the current fixture generator."""
    if not path.exists():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("mepg_fixture_version") == FIXTURE_VERSION


def link_checkpoints(base: Path, checkpoints: dict[str, Path], folder: str = "checkpoints") -> None:
    """Make fixture files visible in ``base/models/<folder>`` (symlinks)."""
    target_dir = base / "models" / folder
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoints.values():
        link = target_dir / path.name
        if not link.exists():
            link.symlink_to(path)


GATE_DATASET = "mepg_gate_dataset"


def write_gate_dataset(base: Path, name: str = GATE_DATASET) -> str:
    """A small image + caption data set in ``base/input/<name>`` (four random 64x64 images, one caption file
    each), for the gate-training workflow; returns ``name``."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = base / "input" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red apple on a table", "an anime cat", "a watercolor boat", "a photo of a dog"]):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(folder / f"sample{i}.png")
        (folder / f"sample{i}.txt").write_text(caption)
    return name


def tiny_files_of(tiny_checkpoints: dict[str, Path], tiny_extras: dict[str, Path]) -> dict:
    """File names for :func:`tiny_workflow` from the session's fixtures."""
    return {"base": tiny_checkpoints["base"].name, "experts": [tiny_checkpoints[n].name for n in EXPERTS],
            "lora": tiny_extras["lora"].name}


def tiny_workflow(api: dict, files: dict, max_side: int = 160, steps: int = 3, dataset: str | None = None) -> dict:
    """A shipped API workflow on the tiny fixtures: checkpoint, expert, LoRA (and data set) names replaced,
    sizes scaled so the longer side is ``max_side`` (multiples of 8, at least 64), sampler steps ``steps``,
    gate training 2 steps; everything else as shipped. ``files``: see :func:`tiny_files_of`."""
    import json

    wf = json.loads(json.dumps(api))
    sizes = [(n["inputs"]["width"], n["inputs"]["height"]) for n in wf.values()
             if n["class_type"] == "EmptyLatentImage"] or [(1024, 1024)]
    scale = max_side / max(sizes[0])
    experts = iter(files["experts"] * 16)
    for node in wf.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = files["base"]
        elif cls == "MEPG_ExpertStackLoader":
            inputs["ckpt_name"] = next(experts)
        elif cls == "MEPG_LoRAExpertLoader":
            inputs["lora_name"] = files["lora"]
        elif cls == "LoadImageTextDataSetFromFolder" and dataset:
            inputs["folder"] = dataset
        elif cls == "MEPG_TrainMoEGate":
            inputs.update(steps=2, warmup_steps=1, grad_accumulation=1)
        elif cls == "MEPG_SaveMoEGate":
            inputs.update(name="e2e_tiny_gates", overwrite=True)
        if cls in ("EmptyLatentImage", "MEPG_RegionMaskBuilder", "MEPG_LLMLayoutPlanner"):
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = max(64, int(round(inputs[key] * scale / 8)) * 8)
        if isinstance(inputs.get("steps"), int) and cls != "MEPG_TrainMoEGate":
            inputs["steps"] = steps
    return wf


def serve_fixture_host(name: str, checkpoints: dict[str, Path]):
    """A real ComfyUI server on a free loopback port, with base ``.host/<name>-base`` holding the pack,
    the tiny-model node and ``checkpoints``; its log goes to ``test-artifacts/<name>-server.log``.
    Use as ``with serve_fixture_host(...) as server:`` (the server stops when the block ends)."""
    from host import ComfyServer, free_port, prepare_base

    base = WORK_DIR / f"{name}-base"
    prepare_base(base, with_tiny_models=True)
    link_checkpoints(base, checkpoints)
    return ComfyServer(port=free_port(), base=base, log_path=ARTIFACTS / f"{name}-server.log")
