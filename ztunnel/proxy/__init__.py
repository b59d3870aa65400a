"""The node proxy's connection roles, one module each (DESIGN.md §6): inbound HBONE (:15008),
outbound (:15001), inbound plaintext (:15006); `node` holds what they share."""

from ztunnel.proxy.inbound import InboundHbone
from ztunnel.proxy.inbound_plaintext import InboundPlaintext
from ztunnel.proxy.node import Node, original_dst
from ztunnel.proxy.outbound import Outbound, Route, route_outbound

__all__ = [
    "InboundHbone",
    "InboundPlaintext",
    "Node",
    "Outbound",
    "Route",
    "original_dst",
    "route_outbound",
]
