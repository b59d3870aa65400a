"""The CNI plugin invoked exactly as a container runtime does (env + stdin netconf, result on
stdout), talking to a real unix-socket server that stands in for ztunnel's enrolment socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kube_apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parents[3]

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "eth0", "mac": "2a:00:00:00:00:01", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [{"address": "10.77.1.5/24", "gateway": "10.77.1.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


@dataclass
class EnrolServer:
    """ztunnel's enrolment socket, reduced to its protocol: one JSON line in, one out."""

    path: Path
    reply: Callable[[dict[str, Any]], dict[str, Any]]
    received: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        req = json.loads(line)
        self.received.append(req)
        w.write(json.dumps(self.reply(req)).encode() + b"\n")
        await w.drain()
        w.close()


@pytest.fixture
async def enrol(tmp_path: Path) -> AsyncIterator[EnrolServer]:
    srv = EnrolServer(tmp_path / "enrol.sock", lambda req: {"ok": True, "enrolled": True})
    server = await asyncio.start_unix_server(srv.handle, path=str(srv.path))
    async with server:
        yield srv


async def invoke(
    command: str,
    conf: dict[str, Any],
    *,
    netns: str = "/var/run/netns/cni-1234",
    args: str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
) -> tuple[int, dict[str, Any] | None, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": args,
        "CNI_PATH": "/opt/cni/bin",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cni.plugin",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate(json.dumps(conf).encode())
    assert proc.returncode is not None
    return proc.returncode, (json.loads(out) if out.strip() else None), err.decode()


def netconf(sock: Path | str, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "ambient-net",
        "type": "ambientmesh-cni",
        "enrolSocket": str(sock),
        "timeoutSeconds": 2,
        "prevResult": PREV,
        **extra,
    }


async def test_version() -> None:
    code, out, _ = await invoke("VERSION", {"cniVersion": "1.0.0"})
    assert code == 0 and out is not None
    assert "1.0.0" in out["supportedVersions"]


async def test_add_enrols_and_passes_prev_result_through(enrol: EnrolServer) -> None:
    code, out, err = await invoke(
        "ADD",
        netconf(enrol.path),
        args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
        "AMBIENT_CGROUP=/sys/fs/cgroup/kubepods/pod1",
    )
    assert code == 0, err
    assert out == PREV
    assert enrol.received == [
        {
            "op": "add",
            "namespace": "shop",
            "name": "web-1",
            "netns": "/var/run/netns/cni-1234",
            "cgroup": "/sys/fs/cgroup/kubepods/pod1",
        }
    ]


async def test_add_not_ambient_per_ztunnel_passes(enrol: EnrolServer) -> None:
    enrol.reply = lambda req: {"ok": True, "enrolled": False}
    code, out, err = await invoke("ADD", netconf(enrol.path))
    assert code == 0 and out == PREV
    assert "not in the mesh" in err


async def test_enrolment_failure_is_an_error_result(enrol: EnrolServer) -> None:
    enrol.reply = lambda req: {"ok": False, "error": "bpf attach failed: EPERM"}
    code, out, _ = await invoke("ADD", netconf(enrol.path))
    assert code != 0 and out is not None
    assert out["code"] == 100
    assert "shop/web-1" in out["msg"] and "bpf attach failed" in out["msg"]
    assert out["cniVersion"] == "1.0.0"


async def test_del_tells_ztunnel_and_never_fails(enrol: EnrolServer, tmp_path: Path) -> None:
    conf = netconf(enrol.path)
    del conf["prevResult"]
    code, out, _ = await invoke("DEL", conf, netns="")
    assert code == 0 and out is None
    assert enrol.received[0]["op"] == "del" and enrol.received[0]["name"] == "web-1"
    enrol.reply = lambda req: {"ok": False, "error": "unknown pod"}
    assert (await invoke("DEL", conf))[0] == 0
    assert (await invoke("DEL", netconf(tmp_path / "absent.sock")))[0] == 0


async def test_check_and_missing_prev_result(enrol: EnrolServer) -> None:
    assert (await invoke("CHECK", netconf(enrol.path)))[:2] == (0, None)
    conf = netconf(enrol.path)
    del conf["prevResult"]
    code, out, _ = await invoke("ADD", conf)
    assert code != 0 and out is not None and out["code"] == 4
    assert "chained" in out["msg"]
    assert enrol.received == []


async def test_bad_invocations_get_cni_errors(enrol: EnrolServer) -> None:
    code, out, _ = await invoke("ADD", {**netconf(enrol.path), "cniVersion": "9.9.9"})
    assert code != 0 and out is not None and out["code"] == 1
    code, out, _ = await invoke("BOGUS", netconf(enrol.path))
    assert code != 0 and out is not None and out["code"] == 7


async def test_unreachable_ztunnel_excluded_or_not_k8s_passes(tmp_path: Path) -> None:
    absent = tmp_path / "absent.sock"
    code, out, _ = await invoke(
        "ADD", netconf(absent), args="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"
    )
    assert code == 0 and out == PREV
    code, out, _ = await invoke("ADD", netconf(absent), args="")
    assert code == 0 and out == PREV
    # No way to tell whether shop/web-1 is ambient: refuse rather than start it unenrolled.
    code, out, _ = await invoke("ADD", netconf(absent))
    assert code != 0 and out is not None and out["code"] == 11


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    p = tmp_path / "kubeconfig"
    p.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "cni",
                "clusters": [{"name": "c", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "u", "user": {"token": "cni-token"}}],
                "contexts": [{"name": "cni", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return p


async def test_unreachable_ztunnel_asks_the_api_server(
    apiserver: FakeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    apiserver.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}})
    apiserver.put(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}},
        }
    )
    for ns, name, labels in [
        ("plain", "a", {}),
        ("shop", "web-1", {}),
        ("shop", "opted-out", {"istio.io/dataplane-mode": "none"}),
    ]:
        apiserver.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {},
            }
        )
    conf = netconf(tmp_path / "absent.sock", kubeconfig=str(kubeconfig))

    code, out, err = await invoke("ADD", conf, args="K8S_POD_NAMESPACE=plain;K8S_POD_NAME=a")
    assert code == 0 and out == PREV, err
    code, out, err = await invoke("ADD", conf, args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=opted-out")
    assert code == 0 and out == PREV, err
    code, out, _ = await invoke("ADD", conf)
    assert code != 0 and out is not None and out["code"] == 11
    assert "shop/web-1 is ambient" in out["msg"]
    assert ("GET", "/api/v1/namespaces/shop") in apiserver.requests


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs root and unshare(1) for a real network namespace",
)
async def test_cgroup_found_from_a_process_in_the_netns(enrol: EnrolServer) -> None:
    sleeper = await asyncio.create_subprocess_exec("unshare", "--net", "sleep", "30")
    try:
        netns = f"/proc/{sleeper.pid}/ns/net"
        for _ in range(100):  # wait until unshare has exec'd sleep in the new netns
            if os.stat(netns).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            await asyncio.sleep(0.01)
        cg = Path(f"/proc/{sleeper.pid}/cgroup").read_text().split("0::", 1)[1].strip()  # noqa: ASYNC240
        code, _, err = await invoke("ADD", netconf(enrol.path, cgroupRoot="/cg"), netns=netns)
        assert code == 0, err
        assert enrol.received[-1]["cgroup"] == "/cg/" + cg.lstrip("/")
        assert enrol.received[-1]["netns"] == netns
    finally:
        sleeper.kill()
        await sleeper.wait()
