"""The config dump: JSON-serialisable and faithful to the snapshot."""

from __future__ import annotations

import json
from pathlib import Path

from mesh.config.dump import snapshot_to_json
from mesh.config.parse import load_snapshot

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "kinds.yaml"


def test_dump_example() -> None:
    dump = json.loads(json.dumps(snapshot_to_json(load_snapshot([EXAMPLE], version=3))))
    assert dump["version"] == 3
    web = next(w for w in dump["workloads"] if w["name"] == "web-1")
    assert web["identity"] == "spiffe://cluster.local/ns/shop/sa/web" and web["ambient"]
    (svc,) = dump["services"]
    assert svc["endpoints"] == {
        "80": [{"pod": "shop/web-1", "address": "10.77.1.5:8080", "node": "node1"}]
    }
    assert svc["waypoint"] == "shop/waypoint"
    assert dump["waypoints"][0]["pods"] == ["shop/waypoint-1"]
    assert dump["peer_authentications"][0]["mode"] == "STRICT"
    assert dump["http_routes"][0]["rules"][0]["timeouts"] == {
        "request": 10.0,
        "backend_request": 0.5,
    }
