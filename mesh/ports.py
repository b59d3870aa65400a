"""The mesh's well-known ports, in one place (Istio's numbers, DESIGN.md).

Redirect rules, listeners, manifests and the lab must agree on every one of them; a port
defined in several modules is one a change forgets.
"""

from __future__ import annotations

ADMIN_PORT = 15000  # /config_dump, /logging: loopback only
OUTBOUND_PORT = 15001  # redirected outbound connections, inside each pod
INBOUND_PLAINTEXT_PORT = 15006  # redirected inbound plaintext, inside each pod
HBONE_PORT = 15008  # inbound HBONE (mTLS HTTP/2 CONNECT): nodes, pods, waypoints
CA_PORT = 15012  # the CA service
METRICS_PORT = 15020  # Prometheus scrape
READINESS_PORT = 15021  # /healthz/ready
FLOWS_PORT = 15030  # /flows only, read-only, when --flows-addr opens it (Kubernetes pods/proxy)

# What the eBPF redirect never captures: the proxies' own ports (capturing them would loop).
PROXY_PORTS = (
    ADMIN_PORT,
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    METRICS_PORT,
    READINESS_PORT,
)
