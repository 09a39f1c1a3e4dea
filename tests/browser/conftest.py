"""The real ComfyUI server and frontend, driven by Debian's Chromium through Playwright (the Python package).

The browser is never downloaded: ``scripts/setup_host.sh`` installs Debian's ``chromium`` package and the
tests launch ``/usr/bin/chromium`` headless with its background networking, updates and sync off and a
fresh profile. Every browser test is marked ``browser``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mepg_testing import serve_fixture_host

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--no-default-browser-check", "--metrics-recording-only",
]


@pytest.fixture(scope="session")
def browser_server(tiny_checkpoints):
    with serve_fixture_host("browser", tiny_checkpoints) as srv:
        yield srv


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium (Debian's); Playwright gives every launch a fresh temporary --user-data-dir."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (scripts/setup_host.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium):
    """A new browser context (no shared storage between tests) with one page, 1600x1000 CSS pixels."""
    context = chromium.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)
