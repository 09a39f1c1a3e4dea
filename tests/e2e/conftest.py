"""A real ComfyUI server on a free loopback port with the pack (and the tiny-model node) mounted."""

from __future__ import annotations

from pathlib import Path

import pytest
from host import ComfyServer, free_port, prepare_base
from mepg_testing import ARTIFACTS, ROOT, link_checkpoints

BASE = ROOT / ".host" / "e2e-base"


@pytest.fixture(scope="session")
def server(tiny_checkpoints):
    prepare_base(BASE, with_tiny_models=True)
    link_checkpoints(BASE, tiny_checkpoints)
    srv = ComfyServer(port=free_port(), base=BASE, log_path=ARTIFACTS / "e2e-server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
