"""The lab's waypoint demo drives HTTP/1.1 splits only: a GRPCRoute split is not one of them
(its HTTP/1.1 client would never match a GRPCRoute and would report a broken split)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mesh.config.parse import parse_objects
from meshctl.lab.waypoint_demo import splits

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "kinds.yaml"


def test_grpc_route_split_is_not_an_http_demo_split() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    assert [s.route.key for s in splits(parse_objects(docs))] == ["shop/web"]
    for d in docs:
        if d["kind"] == "HTTPRoute":
            d["kind"] = "GRPCRoute"
            for rule in d["spec"]["rules"]:
                rule["matches"] = [{"method": {"service": "shop.Web"}}]
                del rule["timeouts"], rule["retry"]
    snap = parse_objects(docs)
    assert [r.kind for r in snap.http_routes] == ["GRPCRoute"]
    assert splits(snap) == []
