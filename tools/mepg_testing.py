"""Helpers shared by the test tiers and the demo (paths and fixture placement)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = ROOT / ".host" / "fixtures" / "checkpoints"
EXTRAS_DIR = ROOT / ".host" / "fixtures" / "extras"
ARTIFACTS = ROOT / "test-artifacts"
EXPERTS = ("photo", "anime", "watercolor")


def link_checkpoints(base: Path, checkpoints: dict[str, Path], folder: str = "checkpoints") -> None:
    """Make fixture files visible in ``base/models/<folder>`` (symlinks)."""
    target_dir = base / "models" / folder
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoints.values():
        link = target_dir / path.name
        if not link.exists():
            link.symlink_to(path)
