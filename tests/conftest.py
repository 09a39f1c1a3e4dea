"""Shared fixtures: the tiny SDXL-architecture checkpoints (made once, at test time, never committed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mepg_testing import ARTIFACTS, EXPERTS, FIXTURE_DIR, ROOT


@pytest.fixture(scope="session")
def tiny_checkpoints() -> dict[str, Path]:
    """``{"base": path, "photo": path, ...}``: seeded random tiny SDXL checkpoints.

    Written by ``tools/make_tiny_models.py`` in a subprocess (it imports ComfyUI); reused when present.
    """
    names = ["base", *EXPERTS]
    paths = {n: FIXTURE_DIR / f"tiny_sdxl_{n}.safetensors" for n in names}
    if not all(p.exists() for p in paths.values()):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_models.py"), "--out", str(FIXTURE_DIR),
                        "--experts", *EXPERTS], check=True, cwd=ROOT)
    return paths


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
