"""Make the checkout's ComfyUI importable in this process (CPU, no server), the way ComfyUI's main does.

Import this before any ComfyUI module. ComfyUI's directory goes first on sys.path: ComfyUI's own
modules ``import nodes`` and ``import utils``, which must never resolve to anything of ours.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("MEPG_COMFYUI_DIR", ROOT / ".host" / "ComfyUI")).resolve()
# Where the test tiers put this host's base directories (a second host keeps its own: user settings, caches).
WORK_DIR = Path(os.environ.get("MEPG_HOST_WORK_DIR", ROOT / ".host")).resolve()
BASE_DIR = Path(os.environ.get("MEPG_BASE_DIR", WORK_DIR / "base")).resolve()


def activate(base_dir: Path | None = None) -> Path:
    """Put ComfyUI on sys.path with CPU settings (``MEPG_DEVICE=cuda``: ComfyUI's own device choice);
    return the ComfyUI directory."""
    if not (COMFY_DIR / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {COMFY_DIR}; run `make setup` first")
    path = str(COMFY_DIR)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    # The tiers run on the CPU; scripts/gpu_check.sh sets MEPG_DEVICE=cuda to run them on a GPU.
    args.cpu = os.environ.get("MEPG_DEVICE", "cpu") == "cpu"
    args.disable_auto_launch = True
    if base_dir is not None:
        args.base_directory = str(base_dir)
    import utils.extra_config  # noqa: F401  (must precede `import nodes`; see comfyui-host.md)

    return COMFY_DIR
