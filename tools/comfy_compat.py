"""Where the ComfyUI hosts the tests run on differ in their internals, and one way to meet each.

The tiers run on ComfyUI 0.3.75 (``make test``) and 0.33.0 (``make test-compat``). Tests use ComfyUI's
public behaviour; where they must reach into internals, they go through these helpers, which depend on
what the running host has (feature checks), never on a version number:

- ``PromptExecutor(cache_args=...)``: newer hosts read ``cache_args["ram_inactive"]``; ComfyUI's own
  ``main.py`` passes ``lru``, ``ram`` and (since it exists) ``ram_inactive``, and older hosts ignore keys they
  do not use, so :data:`EXECUTOR_CACHE_ARGS` carries all three.
- The outputs cache: ``caches.outputs.get(node_id)`` returns the entry on 0.3.75 and a coroutine on 0.33
  (:func:`cached_output`).
- Progress: 0.33's ``ProgressBar`` forwards at most one update per 100 ms / 0.5 % (first, last and
  preview updates always); a test of what the pack reports turns that throttle off (:func:`record_progress`).
- Missing files: a combo value that names no file is rejected when the prompt is queued on 0.33 and may
  fail only when the node runs elsewhere (:func:`failure_of`, either way the message a user sees).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import comfy_env

EXECUTOR_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


def host_version(comfy_dir: Path | None = None) -> tuple[int, ...]:
    """The version of the ComfyUI tree (``comfyui_version.py``), read without importing it."""
    text = (Path(comfy_dir or comfy_env.COMFY_DIR) / "comfyui_version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([0-9.]+)""", text)
    if match is None:
        raise ValueError(f"no __version__ in {comfy_dir or comfy_env.COMFY_DIR}/comfyui_version.py")
    return tuple(int(p) for p in match.group(1).split("."))


def cached_output(executor, node_id: str) -> list:
    """The output tuple (as a list) an executed node left in ``executor``'s outputs cache."""
    import inprocess

    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = inprocess.run_coroutine(entry)
    if entry is None:
        raise KeyError(f"node {node_id} has no cached output")
    return entry.outputs if hasattr(entry, "outputs") else entry[0]


def record_progress(monkeypatch) -> list[tuple[int, int]]:
    """Collect every ``(value, total)`` the pack reports through ComfyUI's progress bar hook, with the host's
    update throttle (where it has one) turned off for the test."""
    import comfy.utils as comfy_utils

    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: seen.append((value, total)))
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy_utils, name):
            monkeypatch.setattr(comfy_utils, name, 0)
    return seen


def failure_of(server, prompt: dict, timeout: float = 300.0) -> str:
    """The error a user sees for a prompt that must fail: the rejection when it is queued (HTTP 400, or the
    node errors ComfyUI lists while it runs the outputs that need no refused input) or the execution error
    when it runs. Raises AssertionError when it succeeds."""
    import json

    from host import error_message

    status, body = server.queue(prompt)
    if status != 200:
        return json.dumps(body)
    entry = server.wait(body["prompt_id"], timeout)
    if body.get("node_errors"):
        # Refused in part: ComfyUI ran only the outputs that do not depend on the refused input.
        return json.dumps(body["node_errors"])
    message = error_message(entry)
    if entry["status"].get("status_str") != "error" or message is None:
        raise AssertionError(f"the prompt did not fail: {entry['status']}")
    return message
