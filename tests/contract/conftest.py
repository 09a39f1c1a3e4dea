"""The pack loaded by real ComfyUI inside the test process, the way ComfyUI loads custom nodes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy_compat
import inprocess
import pytest
from comfy_env import WORK_DIR
from mepg_testing import link_checkpoints

BASE = WORK_DIR / "contract-base"


class _SilentServer:
    """What PromptExecutor needs from a server: a client id and somewhere to send events."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))


@dataclass
class ComfyInProcess:
    nodes: Any
    execution: Any
    mappings: dict
    server: _SilentServer = field(default_factory=_SilentServer)
    executor: Any = None

    def node(self, node_id: str):
        return self.mappings[node_id]

    def output(self, node_id: str) -> list:
        """What node ``node_id`` of the last prompt returned (its outputs, from the executor's cache)."""
        return comfy_compat.cached_output(self.executor, node_id)

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns the executor's history result.

        Raises AssertionError with ComfyUI's own messages when validation or execution fails.
        """
        prompt_id = str(uuid.uuid4())
        valid = inprocess.run_coroutine(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")
        if self.executor is None:
            self.executor = self.execution.PromptExecutor(
                self.server, cache_type=self.execution.CacheType.CLASSIC,
                cache_args=dict(comfy_compat.EXECUTOR_CACHE_ARGS))
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            raise AssertionError(f"execution failed: {errors}")
        return self.executor.history_result


@pytest.fixture(scope="session")
def comfy(tiny_checkpoints, tiny_extras) -> ComfyInProcess:
    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    import execution
    link_checkpoints(BASE, tiny_checkpoints)
    link_checkpoints(BASE, {"sd15": tiny_extras["sd15"]})
    link_checkpoints(BASE, {"lora": tiny_extras["lora"]}, folder="loras")
    link_checkpoints(BASE, {"controlnet": tiny_extras["controlnet"]}, folder="controlnet")
    link_checkpoints(BASE, tiny_checkpoints, folder="diffusion_models")  # for UNETLoader (fp8 weights)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    return ComfyInProcess(nodes=nodes, execution=execution, mappings=nodes.NODE_CLASS_MAPPINGS)


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.contract)
