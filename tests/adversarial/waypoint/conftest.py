"""One real waypoint process for the module's attacks (starting one costs seconds), and the
baseline of its fds and RSS once warmed up (see wpkit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.adversarial.waypoint.wpkit import Waypoint, start


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wp(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Waypoint]:
    tmp: Path = tmp_path_factory.mktemp("adversarial-waypoint")
    w, stop = await start(tmp)
    try:
        for _ in range(3):
            await w.good()
        yield w
    finally:
        await stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def baseline(wp: Waypoint) -> tuple[int, int]:
    return wp.proc.fds(), wp.proc.rss_kib()
