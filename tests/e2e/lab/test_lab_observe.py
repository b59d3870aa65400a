"""`meshctl observe` against a real lab (netns, cgroups, BPF, one ztunnel per node): the
flows a pod's traffic made are found by the CLI, denial and policy included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from meshctl.lab.demo import wait_for_app
from meshctl.lab.processes import REPO_ROOT
from tests.e2e.lab.labkit import LabFactory
from tests.e2e.lab.test_lab_mesh import client, vip


def observe(lab: Any, *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    p = lab.paths
    res = subprocess.run(
        [sys.executable, "-m", "meshctl", "observe", "--lab", p.lab,
         "--state-root", str(p.state_root), "-o", "json", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    flows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    return res.returncode, flows, res.stderr


def test_observe_finds_the_denial_and_the_forwarded_flows(lab_factory: LabFactory) -> None:
    lab = lab_factory(mesh=True, capture="node")
    wait_for_app(lab, "mesh/server")
    server = vip(lab, "mesh", "server")
    assert all(o["ok"] for o in client(lab, "mesh/web", f"http://{server}/", count=2))
    assert not any(o["ok"] for o in client(lab, "mesh/batch", f"http://{server}/", count=2))
    time.sleep(0.5)  # flows are recorded when the connections have closed

    code, denied, err = observe(lab, "--namespace", "mesh", "--verdict", "DENIED")
    assert code == 0, err
    assert denied and all(f["verdict"] == "DENIED" for f in denied)
    dest = [f for f in denied if f["policy"]]
    assert dest and {f["policy"] for f in dest} == {"mesh/no-batch"}, denied
    assert all(f["source"]["pod"] == "batch" and f["mtls"] for f in denied)
    assert {f["node"] for f in denied} >= {"n2"}

    code, fwd, err = observe(lab, "--from-pod", "mesh/web", "--verdict", "FORWARDED", "--last", "2")
    assert code == 0, err
    assert len(fwd) == 2
    for f in fwd:
        assert f["destination"]["pod"] == "server" and f["mtls"] and f["bytes_received"] > 0
        assert f["source"]["identity"] == "spiffe://cluster.local/ns/mesh/sa/web"

    code, none, err = observe(lab, "--namespace", "nosuchns")
    assert code == 0 and none == [], err
    code, _, err = observe(lab, "--verdict", "BOGUS")
    assert code == 2 and "--verdict" in err
