"""`meshctl analyze`: each finding on a config that has exactly that problem, and silence on
the article's examples. Every check starts from the clean example and breaks one thing, so a
finding that fires for the wrong reason shows up as an extra line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mesh.config.parse import parse_objects
from meshctl.analyze import analyze

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "examples" / "cilium" / "policies.yaml"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _lines(docs: list[dict[str, Any]]) -> list[str]:
    return [str(f) for f in analyze(parse_objects(docs))]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "meshctl.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_clean_config_has_no_findings() -> None:
    assert _lines(_docs()) == []


def test_mixed_dataplane_labels() -> None:
    docs = _docs()
    _find(docs, "Namespace", "shop")["metadata"]["labels"]["istio-injection"] = "enabled"
    (line,) = _lines(docs)
    assert line.startswith("Warning [AM0001] (Namespace shop) is labelled both istio-injection")


def test_injection_alone_is_not_mixed() -> None:
    docs = _docs()
    labels = _find(docs, "Namespace", "shop")["metadata"]["labels"]
    labels["istio-injection"] = "enabled"
    del labels["istio.io/dataplane-mode"]
    # Not mixed; but with the namespace out of ambient, no waypoint sees backend's traffic.
    assert [x[:17] for x in _lines(docs)] == ["Warning [AM0003] "]


def test_policies_selecting_no_pods() -> None:
    docs = _docs()
    _find(docs, "CiliumNetworkPolicy", "mtls-backend")["spec"]["endpointSelector"] = {
        "matchLabels": {"app": "backnd"}
    }
    _find(docs, "NetworkPolicy", "postgres-from-backend")["spec"]["podSelector"] = {
        "matchLabels": {"app": "postgress"}
    }
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "typo", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "frontnd"}}, "action": "DENY"},
        }
    )
    # A selector matching only the waypoint's pod still selects no workload.
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "wp", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
            },
        }
    )
    assert _lines(docs) == [
        "Warning [AM0002] (AuthorizationPolicy shop/typo) selects no pods: it has no effect",
        "Warning [AM0002] (AuthorizationPolicy shop/wp) selects no pods: it has no effect",
        "Warning [AM0002] (NetworkPolicy shop/postgres-from-backend) spec.podSelector selects "
        "no pods: it has no effect",
        "Warning [AM0002] (CiliumNetworkPolicy shop/mtls-backend) spec.endpointSelector selects "
        "no pods: it has no effect",
    ]


def test_policy_in_root_namespace_selects_across_the_mesh() -> None:
    docs = _docs()
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "mesh-wide", "namespace": "istio-system"},
            "spec": {"selector": {"matchLabels": {"app": "backend"}}, "action": "DENY"},
        }
    )
    assert _lines(docs) == []


def test_cnp_l7_rule_without_waypoint() -> None:
    docs = _docs()
    del _find(docs, "Namespace", "shop")["metadata"]["labels"]["istio.io/use-waypoint"]
    (line,) = _lines(docs)
    assert line.startswith(
        "Warning [AM0003] (CiliumNetworkPolicy shop/allow-http-to-backend) has "
        "toPorts.rules.http but no waypoint serves backend-1"
    )


def test_pod_opted_out_of_ambient_has_no_waypoint() -> None:
    docs = _docs()
    _find(docs, "Pod", "backend-1")["metadata"]["labels"]["istio.io/dataplane-mode"] = "none"
    (line,) = _lines(docs)
    assert line.startswith("Warning [AM0003] (CiliumNetworkPolicy shop/allow-http-to-backend)")


def test_service_label_provides_the_waypoint() -> None:
    docs = _docs()
    del _find(docs, "Namespace", "shop")["metadata"]["labels"]["istio.io/use-waypoint"]
    _find(docs, "Service", "backend")["metadata"]["labels"] = {"istio.io/use-waypoint": "waypoint"}
    assert _lines(docs) == []


def test_waypoint_label_naming_a_missing_gateway_is_no_waypoint() -> None:
    docs = _docs()
    _find(docs, "Namespace", "shop")["metadata"]["labels"]["istio.io/use-waypoint"] = "nope"
    assert [x[:17] for x in _lines(docs)] == ["Warning [AM0003] "]


def test_authorization_policy_l7_without_waypoint() -> None:
    docs = _docs()
    l7_rules = [{"to": [{"operation": {"methods": ["GET"]}}]}]
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "by-selector", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "backend"}}, "rules": l7_rules},
        }
    )
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "at-waypoint", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}], "rules": l7_rules},
        }
    )
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "at-missing", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Gateway", "name": "gone"}], "rules": l7_rules},
        }
    )
    lines = _lines(docs)
    assert [x.split(")")[0] for x in lines] == [
        "Warning [AM0003] (AuthorizationPolicy shop/at-missing",
        "Warning [AM0003] (AuthorizationPolicy shop/by-selector",
    ]
    assert "targets Gateway gone, which has no waypoint" in lines[0]


def test_route_to_missing_service() -> None:
    docs = _docs()
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "backend", "port": 8080}],
                "rules": [
                    {
                        "backendRefs": [
                            {"name": "backend", "port": 8080},
                            {"name": "backend-v2", "port": 8080},
                        ]
                    }
                ],
            },
        }
    )
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "g", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "grpc"}]},
        }
    )
    assert sorted(_lines(docs)) == [
        "Warning [AM0004] (GRPCRoute shop/g) parentRef Service shop/grpc does not exist",
        "Warning [AM0004] (HTTPRoute shop/r) backendRef Service shop/backend-v2 does not exist",
    ]


def test_cli_exit_status_and_help(tmp_path: Path) -> None:
    clean = run("analyze", str(EXAMPLE))
    assert (clean.returncode, clean.stdout) == (0, "ok: no findings\n"), clean.stderr
    docs = _docs()
    _find(docs, "Namespace", "shop")["metadata"]["labels"]["istio-injection"] = "enabled"
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump_all(docs))
    warn = run("analyze", str(mixed))
    assert warn.returncode == 1
    assert warn.stdout.startswith("Warning [AM0001] (Namespace shop) ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\n")
    err = run("analyze", str(bad))
    assert err.returncode == 2
    assert err.stdout.startswith("Error (Service default/Bad_Name: metadata.name")
    helptext = run("analyze", "--help").stdout
    assert "1 warnings found" in helptext and "AM0001" in helptext


def test_request_principals_and_jwt_need_a_waypoint() -> None:
    docs = _docs()
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "jwt-only", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "backend"}},
                "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}],
            },
        }
    )
    for name, bind in (
        ("by-selector", {"selector": {"matchLabels": {"app": "backend"}}}),
        ("at-missing", {"targetRefs": [{"kind": "Gateway", "name": "gone"}]}),
        ("at-waypoint", {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}]}),
    ):
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "RequestAuthentication",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {**bind, "jwtRules": [{"issuer": "i", "jwksUri": "file:///k.json"}]},
            }
        )
    lines = _lines(docs)
    assert [x.split(")")[0] for x in lines] == [
        "Warning [AM0003] (AuthorizationPolicy shop/jwt-only",
        "Warning [AM0003] (RequestAuthentication shop/at-missing",
        "Warning [AM0003] (RequestAuthentication shop/by-selector",
    ]
    assert "no JWT is checked" in lines[2]


def test_cnp_egress_http_rules_are_reported() -> None:
    docs = _docs()
    docs.append(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "egress-l7", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "gone"}},
                "egress": [{"toPorts": [{"ports": [{"port": "80"}],
                                         "rules": {"http": [{"method": "GET"}]}}]}],
            },
        }
    )  # fmt: skip
    lines = [x for x in _lines(docs) if "egress-l7" in x]
    assert any("egress toPorts.rules.http" in x for x in lines), lines
