"""The supported-version statement: which hosts count as tested, and the warning for older ones."""

from __future__ import annotations

import tomllib
from mepg_testing import ROOT

from mepg_core.host_support import OLDEST_TESTED, TESTED, parse_version, support_warning


def test_versions_parse_by_their_leading_numbers():
    assert parse_version("0.3.75") == (0, 3, 75)
    assert parse_version("v0.33.0") == (0, 33, 0)
    assert parse_version("0.4.0rc1") == (0, 4, 0)
    assert parse_version("unknown") is None


def test_only_hosts_older_than_the_oldest_tested_are_warned_about():
    assert OLDEST_TESTED == (0, 3, 75)
    for ok in ("0.3.75", "0.3.76", "0.33.0", "0.38.2", "1.0"):
        assert support_warning(ok) is None, ok
    for old in ("0.3.74", "0.3.9", "0.2.99"):  # 0.3.9 < 0.3.75: compared as numbers, not as text
        message = support_warning(old)
        assert message is not None and old in message and "0.3.75" in message and "0.33.0" in message
    assert "without a version" in support_warning(None)
    assert "0.3.75" in support_warning("nightly")


def test_pyproject_names_the_tested_versions():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert tool["requires-comfyui"] == ">=" + ".".join(map(str, OLDEST_TESTED))
    readme = (ROOT / "README.md").read_text()
    for version in TESTED:
        assert ".".join(map(str, version)) in readme
