"""Every device profile parses and carries the keys the toolkit relies on."""

from __future__ import annotations

import tomllib

import pytest
from conftest import ROOT

PROFILES = sorted((ROOT / "devices").glob("*.toml"))


def test_there_is_a_generic_cpu_profile():
    assert "x86_64-cpu.toml" in [p.name for p in PROFILES]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_shape(path):
    profile = tomllib.loads(path.read_text())
    assert profile["name"] == path.stem
    assert profile["arch"] in {"x86_64", "aarch64", "arm64"}
    assert isinstance(profile["training_supported"], bool)
    assert profile["ram_budget_mb"] > 0 and profile["threads"] >= 0
    assert profile["providers"]["serve"] and all(p.endswith("ExecutionProvider") for p in profile["providers"]["serve"])
