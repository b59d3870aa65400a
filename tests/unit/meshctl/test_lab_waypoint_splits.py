"""Which splits the lab's waypoint demo drives, and with which client: an HTTPRoute's with the
HTTP/1.1 client, a GRPCRoute's with real gRPC calls of a method its first rule matches."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mesh.config.parse import parse_objects
from meshctl.lab.waypoint_demo import _client, splits

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "kinds.yaml"


def as_grpc(docs: list[dict[str, Any]], method: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = copy.deepcopy(docs)
    for d in out:
        if d["kind"] == "HTTPRoute":
            d["kind"] = "GRPCRoute"
            for rule in d["spec"]["rules"]:
                rule["matches"] = [{"method": method}] if method is not None else []
                del rule["timeouts"], rule["retry"]
    return out


def test_http_and_grpc_route_splits_get_their_own_clients() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    [http] = splits(parse_objects(docs))
    assert http.route.key == "shop/web" and http.grpc_method is None
    assert _client(http, 5)[:3] == ["python", "-m", "mesh.apps.client"]

    snap = parse_objects(as_grpc(docs, {"service": "shop.Web"}))
    assert [r.kind for r in snap.http_routes] == ["GRPCRoute"]
    [grpc] = splits(snap)
    assert grpc.grpc_method == "/shop.Web/Who" and grpc.weights == http.weights
    cmd = _client(grpc, 5)
    assert cmd[:3] == ["python", "-m", "mesh.apps.grpc_client"]
    assert cmd[cmd.index("--method") + 1] == "/shop.Web/Who"
    assert cmd[cmd.index("--count") + 1] == "5"

    [grpc] = splits(parse_objects(as_grpc(docs, {"service": "a.B", "method": "Get"})))
    assert grpc.grpc_method == "/a.B/Get"
    [grpc] = splits(parse_objects(as_grpc(docs, None)))
    assert grpc.grpc_method == "/ambientmesh.demo.Echo/Who"


def test_grpc_route_matching_only_by_regex_is_not_driven() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    regex = {"type": "RegularExpression", "service": "shop\\..*"}
    assert splits(parse_objects(as_grpc(docs, regex))) == []
