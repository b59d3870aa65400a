"""The adversarial suite: hostile peers and pods against real ztunnel code and processes.

`test_hbone_*` run ztunnel's roles in this process on loopback (real TLS, h2, sockets), so they
can count this process's fds; `test_lab_*` attack real ztunnel processes in a lab (root: netns,
cgroups, BPF) and read the ztunnel's own /proc. The lab helpers are the e2e suite's
(tests/e2e/lab/labkit.py), imported from there rather than copied.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (the lab: netns, cgroups, BPF); CI runs as root")
    for item in items:
        if "/tests/adversarial/test_lab_" in str(item.fspath):
            item.add_marker(skip)
