"""kTLS tests run only in a kernel that has kTLS: scripts/ktls-guest.sh boots Debian's stock
kernel under QEMU and runs them there. Anywhere else they are skipped with the probe's reason,
so the host test run collects them without failing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh import ktls


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    support = ktls.probe()
    mark = pytest.mark.ktls
    skip = pytest.mark.skip(
        reason=f"needs a kernel with kTLS (run scripts/ktls-guest.sh): {support.reason}"
    )
    for item in items:
        if "/tests/ktls/" in str(item.fspath):
            item.add_marker(mark)
            if not support.available:
                item.add_marker(skip)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """ztunnel runs on uvloop, so these tests do; test_default_loop.py uses asyncio's."""
    import uvloop

    if item.path.name == "test_default_loop.py":
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")
