"""The per-snapshot ingress table: the same answers as `decide()`, a miss for pods no policy
isolates, rebuilt when the snapshot changes, and a memo that stays bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mesh.config.parse import parse_objects
from mesh.ingress_policy import IngressPolicy, isolated_for_ingress
from mesh.netpolicy import Direction, Verdict, decide

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "cilium" / "policies.yaml"
FRONTEND, BACKEND, POSTGRES = "10.77.1.10", "10.77.1.11", "10.77.1.12"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def test_isolated_pods_are_the_policies_targets() -> None:
    snap = parse_objects(_docs())
    assert isolated_for_ingress(snap) == {BACKEND, POSTGRES}


def test_answers_match_decide() -> None:
    snap = parse_objects(_docs())
    table = IngressPolicy()
    for src in (FRONTEND, BACKEND, POSTGRES, "198.51.100.7"):
        for dst in (FRONTEND, BACKEND, POSTGRES):
            for port in (5432, 8080, 9090):
                for auth in (False, True):
                    got = table.check(snap, src, dst, port, authenticated=auth)
                    want = decide(snap, src, dst, port, Direction.INGRESS, authenticated=auth)
                    if dst == FRONTEND:
                        assert got is None
                        assert want.verdict is Verdict.ALLOW
                    else:
                        assert got == want


def test_new_snapshot_rebuilds_and_memo_is_bounded() -> None:
    docs = _docs()
    table = IngressPolicy(memo_limit=4)
    snap = parse_objects(docs)
    assert table.check(snap, FRONTEND, POSTGRES, 5432, authenticated=True) is not None
    for i in range(20):
        table.check(snap, f"198.51.100.{i}", POSTGRES, 5432, authenticated=True)
        assert len(table._memo) <= 4
    policies = ("NetworkPolicy", "CiliumNetworkPolicy")
    opened = parse_objects([d for d in docs if d["kind"] not in policies])
    assert table.check(opened, FRONTEND, POSTGRES, 5432, authenticated=True) is None
