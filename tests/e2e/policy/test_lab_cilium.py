"""The article's CiliumNetworkPolicy examples and a NetworkPolicy, for real on the lab
(deploy/examples/cilium/lab.yaml: real netns, cgroups, capture, two ztunnels).

Ingress is ztunnel's, decided before it dials the pod: the denied caller's request fails, the
destination ztunnel logs and counts the denial under the policy's name, and the allowed pairs
get answers from the app. Egress is the kernel's (the cgroup connect() program, issue 19 part A):
until it is in the tree the egress denial is marked as expected to fail, strictly, so the test
turns red the day it starts passing and the marker is removed. The L7 rule has no waypoint in
this lab: `meshctl analyze` must say so rather than let it pass silently.

One lab per capture mode serves every test of the module (bringing it up is the slow part); the
tests only read, except the last, which relabels a pod and puts the label back.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.config.parse import load_snapshot
from meshctl.analyze import L7_WITHOUT_WAYPOINT, analyze
from meshctl.lab import observe
from meshctl.lab.demo import wait_for_app
from meshctl.lab.lab import Lab
from meshctl.lab.processes import REPO_ROOT, child_env, podexec_argv
from meshctl.lab.ztunnels import ZtunnelFeatures
from tests.e2e.lab.labkit import leftovers, remove_roots, seen, unique_paths

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "cilium" / "lab.yaml"
WORLD_IP = "172.30.0.200"  # on the lab's underlay bridge: no pod, node or service has it
WORLD_PORT = 8443
NP = "NetworkPolicy shop/postgres-from-backend"

CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(5)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
    "except OSError as e:\n"
    "    print('errno', e.errno)\n"
)


HOLD = (
    "import socket,sys,time\n"
    "s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
    "s.sendall(b'GET / HTTP/1.1\\r\\nHost: pg\\r\\n\\r\\n')\n"
    "print('answered', len(s.recv(65536)) > 0, flush=True)\n"
    "s.settimeout(float(sys.argv[3])); t=time.monotonic()\n"
    "try:\n"
    "    while s.recv(65536): pass\n"
    "    print('closed', flush=True)\n"
    "except TimeoutError:\n"
    "    print('open', flush=True)\n"
    "except OSError:\n"
    "    print('closed', flush=True)\n"
)


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module", params=["node", "enrol"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The lab in each capture mode: ztunnel's listeners in the node netns (netfilter
    redirect; HBONE leaves from the node's address) or inside each pod's netns (BPF)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, cgroups, BPF); CI runs as root")
    if request.param == "enrol" and not ZtunnelFeatures.probe().enrol_socket:
        pytest.skip("ztunnel in this tree has no --enrol-socket")
    paths = unique_paths()
    lab = Lab(paths, mesh=True, capture=request.param, out=lambda _m: None)
    world: subprocess.Popen[bytes] | None = None
    was = None
    try:
        lab.up(EXAMPLE)
        for pod in ("shop/backend", "shop/postgres"):
            wait_for_app(lab, pod, timeout=30)
        # "world": an address on the underlay bridge, routed back to every node's pods. It
        # lives in the lab's own underlay netns and goes away with it.
        u = paths.underlay_netns
        _run(["ip", "-n", u, "addr", "add", f"{WORLD_IP}/24", "dev", "br0"])
        for info in lab.state.nodes.values():
            _run(["ip", "-n", u, "route", "replace", str(info["cidr"]), "via", str(info["ip"])])
        log = paths.state_dir / "world.log"
        with open(log, "wb") as out:
            world = subprocess.Popen(
                ["ip", "netns", "exec", u, sys.executable, "-m", "mesh.apps.echo",
                 "--host", WORLD_IP, "--port", str(WORLD_PORT)],
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=out, stderr=out,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text(errors="replace"):
            assert world.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield lab
    finally:
        if world is not None:
            world.kill()
            world.wait(10)
        was = seen(lab)
        problems = lab.down(quiet=True)
        left = leftovers(lab.paths, [], was)
        remove_roots(lab.paths)
        assert not problems, problems
        assert not left, f"lab down left: {left}"


def client(lab: Lab, pod: str, url: str, count: int = 2) -> list[dict[str, Any]]:
    ns, name = pod.split("/")
    res = lab.exec_in_pod(
        ns, name, ["python", "-m", "mesh.apps.client", url, "--count", str(count),
                   "--timeout", "5", "--new-connection"],
    )  # fmt: skip
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(out) == count, (res.stdout, res.stderr)
    return out


def vip(lab: Lab, name: str) -> str:
    svc = lab.snapshot().service("shop", name)
    assert svc is not None and svc.cluster_ip
    return svc.cluster_ip


def ip_of(lab: Lab, pod: str) -> str:
    return str(lab.state.pods[pod]["ip"])


def denied(lab: Lab, node: str, policy: str | None = None) -> float:
    """ambientmesh_policy_denied_total for ingress at ztunnel on `node` (one policy, or all)."""
    total = 0.0
    for line in lab.ztunnel_metrics(node).splitlines():
        if not line.startswith("ambientmesh_policy_denied_total{"):
            continue
        if 'direction="ingress"' not in line or 'enforcement="ztunnel"' not in line:
            continue
        if policy is None or f'policy="{policy}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def dest_records(lab: Lab, src_ip: str) -> list[Any]:
    return [
        r
        for r in observe.records_from(lab.ztunnel_access_log("node2"), src_ip)
        if r["reporter"] == "destination"
    ]


def eventually(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


# -- ingress: ztunnel, before the dial -------------------------------------------------------


def test_frontend_reaches_backend_over_mtls(lab: Lab) -> None:
    out = client(lab, "shop/frontend", f"http://{vip(lab, 'backend')}:8080/api/items")
    assert [o["ok"] for o in out] == [True, True], out
    assert {o["body"]["pod"] for o in out} == {"backend"}


def test_backend_reaches_postgres(lab: Lab) -> None:
    out = client(lab, "shop/backend", f"http://{vip(lab, 'postgres')}:5432/")
    assert [o["ok"] for o in out] == [True, True], out
    assert {o["body"]["pod"] for o in out} == {"postgres"}


def test_database_lockdown_refuses_others_before_the_dial(lab: Lab) -> None:
    src = ip_of(lab, "shop/intruder")
    before = denied(lab, "node2", NP)
    out = client(lab, "shop/intruder", f"http://{vip(lab, 'postgres')}:5432/")
    assert [o["ok"] for o in out] == [False, False], out
    assert eventually(lambda: denied(lab, "node2", NP) - before >= 2)
    # access lines are written in batches, a few milliseconds after the connection closed
    assert eventually(lambda: len(dest_records(lab, src)) >= 2)
    recs = dest_records(lab, src)
    assert recs and all(r["verdict"] == "deny" for r in recs), recs
    assert {r["policy"] for r in recs} == {NP}
    # denied before ztunnel dialled postgres: no byte reached or left the app
    assert all(r.get("bytes_sent", 0) == 0 and r.get("bytes_recv", 0) == 0 for r in recs)


def test_authentication_required_refuses_plaintext(lab: Lab) -> None:
    """outsider carries frontend's labels but is not in the mesh: its plaintext connection to
    backend is refused (mtls-backend admits frontend only over mTLS), where the enrolled
    frontend's, over HBONE, is answered (test_frontend_reaches_backend_over_mtls)."""
    before = denied(lab, "node2")
    out = client(lab, "shop/outsider", f"http://{ip_of(lab, 'shop/backend')}:8080/api/items")
    assert [o["ok"] for o in out] == [False, False], out
    assert eventually(lambda: denied(lab, "node2") - before >= 2)
    outsider = ip_of(lab, "shop/outsider")
    assert eventually(lambda: len(dest_records(lab, outsider)) >= 2)
    recs = dest_records(lab, outsider)
    assert recs and all(r["verdict"] == "deny" and not r["mtls"] for r in recs), recs


# -- egress: the kernel's, at connect() ------------------------------------------------------


def test_database_lockdown_lets_postgres_reach_the_world(lab: Lab) -> None:
    out = client(lab, "shop/postgres", f"http://{WORLD_IP}:{WORLD_PORT}/")
    assert [o["ok"] for o in out] == [True, True], out
    # from the pod's own address (enrol capture) or its node's (node capture: ztunnel dials
    # out of the node netns)
    mine = {ip_of(lab, "shop/postgres"), str(lab.state.nodes["node2"]["ip"])}
    assert {o["body"]["peer"].rsplit(":", 1)[0] for o in out} <= mine, out


def test_frontend_egress_outside_backend_fails_at_connect(lab: Lab) -> None:
    """frontend-to-backend isolates frontend's egress: anything but backend:8080 fails at
    connect() with EPERM, at once, where the capture is the cgroup program (enrol). With the
    node's netfilter capture there is no connect() hook: ztunnel's outbound decides before it
    dials, so the connect reaches ztunnel but the request never reaches the world."""
    if lab.capture == "enrol":
        res = lab.exec_in_pod(
            "shop", "frontend", ["python", "-c", CONNECT, WORLD_IP, str(WORLD_PORT)]
        )
        assert res.stdout.strip() == f"errno {errno.EPERM}", (res.stdout, res.stderr)
    else:
        out = client(lab, "shop/frontend", f"http://{WORLD_IP}:{WORLD_PORT}/")
        assert [o["ok"] for o in out] == [False, False], out


def test_frontend_egress_outside_backend_gets_no_answer(lab: Lab) -> None:
    """What holds today, with or without the kernel path: frontend's request to postgres gets
    no answer (ingress at postgres refuses it if nothing earlier did)."""
    out = client(lab, "shop/frontend", f"http://{vip(lab, 'postgres')}:5432/")
    assert [o["ok"] for o in out] == [False, False], out


# -- L7: the waypoint's, and this lab has none ------------------------------------------------


def test_l7_rule_without_waypoint_is_reported(lab: Lab) -> None:
    findings = analyze(load_snapshot([str(lab.paths.config_file)]))
    l7 = [f for f in findings if f.code == L7_WITHOUT_WAYPOINT]
    assert [f.obj for f in l7] == ["CiliumNetworkPolicy shop/allow-http-to-backend"]
    assert re.search(r"cannot be enforced", l7[0].message)


def test_policy_change_cuts_the_live_connection(lab: Lab) -> None:
    """backend holds a keep-alive connection to postgres; relabelled so that neither policy
    admits it any more, ztunnel cuts the connection (it does not wait for the next one)."""
    info = lab.state.pods["shop/backend"]
    proc = subprocess.Popen(
        podexec_argv(str(info["netns"]), str(info["cgroup"]),
                     ["python", "-c", HOLD, vip(lab, "postgres"), "5432", "60"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "answered True", proc.stderr
        lab.label("Pod", "shop", "backend", "app=retired")
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the connection policy no longer allows is still open after 30 s")
        assert out.strip() == "closed", (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lab.label("Pod", "shop", "backend", "app=backend")
