"""ComfyUI with this pack loaded inside the current process (contract tests, benchmarks).

The pack is loaded the way ComfyUI loads any custom node: from ``custom_nodes/comfyui-mepg`` under a
base directory of our own, as a package named after that folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import comfy_env
import host

_loaded: Path | None = None


def load_pack(base: Path, *, with_tiny_models: bool = True):
    """Start ComfyUI's node registry with the pack; returns ComfyUI's ``nodes`` module."""
    global _loaded
    if _loaded is not None:
        if _loaded != base:
            raise RuntimeError(f"ComfyUI already loaded with base {_loaded}; one base per process")
        import nodes

        return nodes
    host.prepare_base(base, with_tiny_models=with_tiny_models)
    comfy_env.activate(base)
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    import nodes

    run_coroutine(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _loaded = base
    return nodes


def run_coroutine(coro):
    """``asyncio.run`` that also works when this thread already runs an event loop (e.g. Playwright's
    sync API in the same test session): the coroutine then runs on a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def pack_module(name: str):
    """A module of the loaded pack, e.g. ``pack_module("nodes.cross_denoise_nodes")``.

    ComfyUI registers a folder pack in ``sys.modules`` under its path with dots replaced by ``_x_``.
    """
    import importlib

    if _loaded is None:
        raise RuntimeError("load_pack() first")
    package = str(_loaded / "custom_nodes" / host.PACK_LINK_NAME).replace(".", "_x_")
    return importlib.import_module(f"{package}.{name}")
