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
BASE_DIR = Path(os.environ.get("MEPG_BASE_DIR", ROOT / ".host" / "base")).resolve()


def activate(base_dir: Path | None = None) -> Path:
    """Put ComfyUI on sys.path with CPU settings; return the ComfyUI directory."""
    if not (COMFY_DIR / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {COMFY_DIR}; run `make setup` first")
    path = str(COMFY_DIR)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_auto_launch = True
    if base_dir is not None:
        args.base_directory = str(base_dir)
    import utils.extra_config  # noqa: F401  (must precede `import nodes`; see comfyui-host.md)

    return COMFY_DIR
