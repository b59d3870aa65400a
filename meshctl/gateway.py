"""The waypoint Gateway object, as both `meshctl waypoint` and the lab declare it.

Its own module so the command and the lab both import it and neither imports the other.
"""

from __future__ import annotations

from typing import Any

from mesh.ports import HBONE_PORT


def gateway_manifest(namespace: str, name: str) -> dict[str, Any]:
    """The waypoint Gateway as Istio ambient declares it (class waypoint, HBONE on 15008)."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {
            "gatewayClassName": "waypoint",
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }
