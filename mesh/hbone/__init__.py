"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS, shared by ztunnel and the waypoint."""

from mesh.hbone.connection import ConnectRequest, HboneConnection, HboneError, HboneStream
from mesh.hbone.pool import HbonePool, dial, serve

__all__ = [
    "ConnectRequest",
    "HboneConnection",
    "HboneError",
    "HbonePool",
    "HboneStream",
    "dial",
    "serve",
]
