"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS, shared by ztunnel and the waypoint."""

from mesh.hbone import h2fix

h2fix.install()

from mesh.hbone.connection import (  # noqa: E402 (after the fix, before any h2 use)
    SOURCE_PRINCIPAL_HEADER,
    ConnectRequest,
    HboneConnection,
    HboneError,
    HboneStream,
)
from mesh.hbone.limits import ConnectionGate, HboneLimits  # noqa: E402
from mesh.hbone.pool import HbonePool, dial, serve  # noqa: E402

__all__ = [
    "SOURCE_PRINCIPAL_HEADER",
    "ConnectRequest",
    "ConnectionGate",
    "HboneConnection",
    "HboneError",
    "HboneLimits",
    "HbonePool",
    "HboneStream",
    "dial",
    "serve",
]
