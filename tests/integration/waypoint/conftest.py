"""The loopback mesh fixture for waypoint integration tests (see waypointkit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.waypoint.waypointkit import Mesh, start_mesh, stop_mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tmp_path)
    try:
        yield m
    finally:
        await stop_mesh(m)
