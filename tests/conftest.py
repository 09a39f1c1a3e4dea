"""Shared fixtures: the tiny SDXL-architecture checkpoints (made once, at test time, never committed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mepg_testing import ARTIFACTS, EXPERTS, EXTRAS_DIR, FIXTURE_DIR, ROOT, fixture_is_current


@pytest.fixture(scope="session")
def tiny_checkpoints() -> dict[str, Path]:
    """``{"base": path, "photo": path, ...}``: seeded random tiny SDXL checkpoints.

    Written by ``tools/make_tiny_models.py`` in a subprocess (it imports ComfyUI); reused when present.
    """
    names = ["base", *EXPERTS]
    paths = {n: FIXTURE_DIR / f"tiny_sdxl_{n}.safetensors" for n in names}
    extras = tiny_extra_paths()
    if not all(p.exists() for p in extras.values()) or not all(fixture_is_current(p) for p in paths.values()):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_models.py"), "--out", str(FIXTURE_DIR),
                        "--experts", *EXPERTS, "--extras", str(EXTRAS_DIR)], check=True, cwd=ROOT)
    return paths


def tiny_extra_paths() -> dict[str, Path]:
    return {"lora": EXTRAS_DIR / "tiny_sdxl_lora.safetensors", "sd15": EXTRAS_DIR / "tiny_sd15_like.safetensors",
            "controlnet": EXTRAS_DIR / "tiny_sdxl_controlnet.safetensors"}


@pytest.fixture(scope="session")
def tiny_extras(tiny_checkpoints) -> dict[str, Path]:
    """``{"lora": path, "sd15": path, "controlnet": path}``: a LoRA and a ControlNet for the tiny base and an
    SD1.x-shaped checkpoint."""
    return tiny_extra_paths()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
