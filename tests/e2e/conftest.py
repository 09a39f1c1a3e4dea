"""A real ComfyUI server on a free loopback port with the pack (and the tiny-model node) mounted."""

from __future__ import annotations

from pathlib import Path

import pytest
from mepg_testing import serve_fixture_host


@pytest.fixture(scope="session")
def server(tiny_checkpoints):
    with serve_fixture_host("e2e", tiny_checkpoints) as srv:
        yield srv


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
