"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS, shared by ztunnel and the waypoint."""

from mesh.hbone.connection import (
    SOURCE_PRINCIPAL_HEADER,
    ConnectRequest,
    HboneConnection,
    HboneError,
    HboneStream,
)
from mesh.hbone.pool import HbonePool, dial, serve

__all__ = [
    "SOURCE_PRINCIPAL_HEADER",
    "ConnectRequest",
    "HboneConnection",
    "HboneError",
    "HbonePool",
    "HboneStream",
    "dial",
    "serve",
]
