"""The egress tables the connect4 program reads answer exactly as `mesh.netpolicy.decide()`:
the compiled LPM tables are looked up here as the program does (port table, else table 0;
longest prefix; VIPs on their own) and compared with decide() at many addresses and ports."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from typing import Any

import yaml

from bpf.policy import PodEgress, compile_egress, policy_id
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.netpolicy import Direction, decide

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "examples" / "cilium" / "policies.yaml"


def _pod(name: str, ip: str, labels: dict[str, str], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node1"},
        "status": {"podIP": ip},
    }


def _snap() -> Snapshot:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    docs += [
        _pod("tool", "10.77.1.20", {"app": "tool"}),
        _pod("lonely", "10.77.1.21", {"app": "lonely"}),
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "tool-out", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "tool"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.64/26"]}}
                        ],
                        "ports": [{"port": 443}],
                    },
                    {"to": [{"ipBlock": {"cidr": "198.51.100.96/27"}}]},  # inside the except
                    {"to": [{"podSelector": {"matchLabels": {"app": "backend"}}}]},
                    {"ports": [{"port": 53}]},
                ],
            },
        },
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "tool-world", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "tool"}},
                "egress": [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": "80"}]}]}],
            },
        },
    ]
    return parse_objects(docs)


def _lookup(eg: PodEgress, vips: set[str], ip: str, port: int) -> int:
    if ip in vips:
        return eg.vips.get((ip, port), 0)
    table = port if any(p == port for p, _ in eg.cidrs) else 0
    addr = ipaddress.IPv4Address(ip)
    best: tuple[int, int] | None = None
    for (p, net), v in eg.cidrs.items():
        if p == table and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, v)
    assert best is not None, "table 0/0 is always present"
    return best[1]


def _addresses(snap: Snapshot, rnd: random.Random) -> list[str]:
    out = [p.ip for p in snap.pods if p.ip] + [n.address for n in snap.nodes if n.address]
    for net in ("198.51.100.0/24", "10.77.0.0/16", "0.0.0.0/0", "10.96.0.0/16"):
        n = ipaddress.IPv4Network(net)
        out += [str(n[rnd.randrange(n.num_addresses)]) for _ in range(40)]
    out += ["198.51.100.64", "198.51.100.63", "198.51.100.127", "198.51.100.128", "0.0.0.0"]
    return out


def test_tables_agree_with_decide() -> None:
    snap = _snap()
    rnd = random.Random(19)
    vips = {s.cluster_ip for s in snap.services if s.cluster_ip}
    checked = 0
    for pod in snap.pods:
        eg = compile_egress(snap, pod)
        probe = decide(snap, pod, "203.0.113.1", 1, Direction.EGRESS)
        if eg is None:
            assert probe.policy is None  # nothing isolates it: the program only redirects
            continue
        for ip in _addresses(snap, rnd):
            if ip in vips:
                continue
            for port in (53, 80, 443, 5432, 8080, 9999):
                dst = snap.pod_by_ip(ip)
                auth = snap.is_ambient(pod) and dst is not None and snap.is_ambient(dst)
                d = decide(snap, pod, ip, port, Direction.EGRESS, authenticated=auth)
                got = _lookup(eg, vips, ip, port)
                assert bool(got) == d.allowed, (pod.key, ip, port, d)
                if got:
                    assert got == policy_id(d.policy or "")
                checked += 1
    assert checked > 1000


def test_isolated_pods_and_except_carve_out() -> None:
    snap = _snap()
    tool = snap.pod("shop", "tool")
    assert tool is not None
    eg = compile_egress(snap, tool)
    assert eg is not None and eg.deny_policy == "NetworkPolicy shop/tool-out"
    vips = {s.cluster_ip for s in snap.services if s.cluster_ip}
    assert _lookup(eg, vips, "198.51.100.10", 443)
    assert not _lookup(eg, vips, "198.51.100.70", 443)  # the except
    assert _lookup(eg, vips, "198.51.100.100", 443)  # a rule inside the except
    assert not _lookup(eg, vips, "198.51.100.10", 444)
    assert _lookup(eg, vips, "203.0.113.9", 80)  # world, port 80 (the CNP)
    assert not _lookup(eg, vips, "10.77.1.12", 80)  # a pod is not world
    assert _lookup(eg, vips, "10.77.1.12", 53)  # any peer on 53
    lonely = snap.pod("shop", "lonely")
    assert lonely is not None and compile_egress(snap, lonely) is None


def test_vip_allowed_when_an_endpoint_is() -> None:
    """Socket-LB semantics: the backend VIP is allowed to tool (backend pods are allowed on
    every port) on its service port only; the postgres VIP is not (postgres is not allowed)."""
    snap = _snap()
    tool = snap.pod("shop", "tool")
    assert tool is not None
    eg = compile_egress(snap, tool)
    assert eg is not None
    vips = {s.cluster_ip for s in snap.services if s.cluster_ip}
    assert _lookup(eg, vips, "10.96.1.11", 8080) == policy_id("NetworkPolicy shop/tool-out")
    assert not _lookup(eg, vips, "10.96.1.11", 8081)
    assert not _lookup(eg, vips, "10.96.1.12", 5432)
