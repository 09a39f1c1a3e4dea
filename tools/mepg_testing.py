"""Helpers shared by the test tiers and the demo (paths and fixture placement)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = ROOT / ".host" / "fixtures" / "checkpoints"
ARTIFACTS = ROOT / "test-artifacts"
EXPERTS = ("photo", "anime", "watercolor")


def link_checkpoints(base: Path, checkpoints: dict[str, Path]) -> None:
    """Make the fixture checkpoints visible in ``base/models/checkpoints`` (symlinks)."""
    target_dir = base / "models" / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoints.values():
        link = target_dir / path.name
        if not link.exists():
            link.symlink_to(path)
