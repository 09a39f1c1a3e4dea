"""Which ComfyUI versions the pack is tested on, and the warning for a host older than those.

Pure Python (no ComfyUI import): ``nodes/extension.py`` passes in the host's version string.
"""

from __future__ import annotations

import re

# The hosts the CI runs every contract, e2e and browser test on (make test, make test-compat).
TESTED = ((0, 3, 75), (0, 33, 0))
OLDEST_TESTED = min(TESTED)


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"0.3.75"`` -> ``(0, 3, 75)``; leading numeric parts only (``"0.4.0rc1"`` -> ``(0, 4, 0)``); None when
    there is no number at the start."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if match is None:
        return None
    return tuple(int(p) for p in match.group(1).split("."))


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def support_warning(host_version: str | None) -> str | None:
    """The warning to log for a ComfyUI of ``host_version`` (None: it has no version module, as very old
    trees), or None when it is not older than the oldest tested one."""
    tested = " and ".join(_dotted(v) for v in TESTED)
    parsed = parse_version(host_version) if host_version is not None else None
    if parsed is not None and parsed >= OLDEST_TESTED:
        return None
    shown = f"ComfyUI {host_version}" if host_version is not None else "a ComfyUI without a version number"
    return (f"MEPG: this is {shown}, older than {_dotted(OLDEST_TESTED)}, the oldest version the pack is tested on "
            f"(tested: {tested}). The nodes may fail in ways the tests never saw; update ComfyUI.")
