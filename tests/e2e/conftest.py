"""End-to-end tests need root: real network namespaces, cgroups, netfilter and BPF."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, cgroups, BPF); CI runs as root")
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(skip)
