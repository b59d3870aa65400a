"""Join a waypoint stream to the current config: authority → service → routes → endpoints.

One `WaypointStreams` lives for the process; each accepted stream (an HBONE CONNECT once the
core lands, a plain socket in tests) asks `for_authority` for an `Http1Stream` bound to the
snapshot current at that moment, so a config swap affects new streams and in-flight requests
finish on the config they started with. `dial` is the only I/O: plain TCP to the pod today,
HBONE to the pod's node ztunnel (node address:15008, else pod ip:15008) when the core lands.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from mesh.config.model import BackendRef
from waypoint.http1 import Authorize, Http1Stream
from waypoint.routing import Request
from waypoint.service import NoBackend, ServiceRoutes, Target

Dial = Callable[[Target], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
OnRequest = Callable[[Request, int, float, int, int], None]


class WaypointStreams:
    def __init__(
        self,
        routes: Callable[[], ServiceRoutes],
        dial: Dial,
        *,
        authorize: Authorize | None = None,
        on_request: OnRequest | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._routes = routes
        self._dial = dial
        self._authorize = authorize
        self._on_request = on_request
        self._rng = rng or random.Random()

    def for_authority(self, authority: str) -> Http1Stream | None:
        """None when the authority is not a Service VIP:port in the current snapshot."""
        sr = self._routes()
        found = sr.for_authority(authority)
        if found is None:
            return None
        svc, port, table = found

        async def connect(
            ref: BackendRef | None,
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            try:
                target = sr.pick(svc, port, ref)
            except NoBackend as exc:
                raise ConnectionRefusedError(str(exc)) from exc
            return await self._dial(target)

        return Http1Stream(
            lambda: table,
            connect,
            authorize=self._authorize,
            on_request=self._on_request,
            rng=self._rng,
        )
