"""deploy/examples/cilium/: the lab manifest runs the very policies policies.yaml documents, and
its pods are placed so that each of the article's rules has a pair it allows and one it denies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mesh.config.parse import parse_objects
from mesh.netpolicy import Direction, Verdict, decide
from meshctl.lab.manifest import plan

DIR = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "cilium"
POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DIR / name).read_text()) if d]


def test_lab_runs_the_documented_policies() -> None:
    def policies(name: str) -> list[dict[str, Any]]:
        return [d for d in _docs(name) if d["kind"] in POLICY_KINDS]

    assert policies("lab.yaml") == policies("policies.yaml")
    assert len(policies("lab.yaml")) == 5


def test_lab_manifest_plans_and_each_rule_has_both_sides() -> None:
    docs = _docs("lab.yaml")
    assert sorted(plan(docs).nodes) == ["node1", "node2"]
    # the lab fills in pod IPs; give them some here to ask the decision
    ips = {"frontend": "10.244.1.2", "intruder": "10.244.1.3", "outsider": "10.244.1.4",
           "backend": "10.244.2.2", "postgres": "10.244.2.3"}  # fmt: skip
    for d in docs:
        if d["kind"] == "Pod":
            d["status"] = {"podIP": ips[d["metadata"]["name"]]}
    snap = parse_objects(docs)
    outsider = snap.pod("shop", "outsider")
    assert outsider is not None and not snap.is_ambient(outsider)

    def ingress(src: str, dst: str, port: int, auth: bool) -> Verdict:
        d = decide(snap, ips[src], ips[dst], port, Direction.INGRESS, authenticated=auth)
        return d.verdict

    assert ingress("frontend", "backend", 8080, True) is Verdict.ALLOW
    # outsider wears frontend's labels without mTLS: mtls-backend's requirement wins
    assert ingress("outsider", "backend", 8080, False) is Verdict.DENY
    assert ingress("outsider", "backend", 9090, False) is Verdict.DENY
    assert ingress("backend", "postgres", 5432, True) is Verdict.ALLOW
    assert ingress("intruder", "postgres", 5432, True) is Verdict.DENY
    egress = decide(snap, ips["frontend"], "172.30.0.200", 8443, Direction.EGRESS)
    assert egress.verdict is Verdict.DENY
    egress = decide(snap, ips["postgres"], "172.30.0.200", 8443, Direction.EGRESS)
    assert egress.verdict is Verdict.ALLOW
