"""Fixtures: a wire-level fake API server on 127.0.0.1:0 and a real kubernetes_asyncio client
pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client as k8s

from tests.fakes.kube_apiserver import FakeApiServer


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api_client(apiserver: FakeApiServer) -> AsyncIterator[k8s.ApiClient]:
    cfg = k8s.Configuration(host=apiserver.url)
    cfg.api_key = {"BearerToken": "test-token"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    api = k8s.ApiClient(configuration=cfg)
    try:
        yield api
    finally:
        await api.close()
