"""The plugin chained after the reference plugins (bridge + host-local, loopback) exactly as
libcni runs a conflist: each plugin executed with the CNI env, the next one getting the previous
result as prevResult, DEL in reverse order. Real network namespaces: a "node" and a "pod"."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
CNI_BIN = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(), reason="reference CNI plugins missing"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 missing"),
]


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(2)
    node, pod = f"am-{tag}-node", f"am-{tag}-pod"
    for n in (node, pod):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        yield node, pod
    finally:
        for n in (pod, node):
            subprocess.run(["ip", "netns", "del", n], check=False)


async def run_plugin(
    plugin: str, command: str, conf: dict[str, Any], env: dict[str, str], node: str
) -> tuple[int, dict[str, Any] | None, str]:
    exe = (
        [sys.executable, "-m", "cni.plugin"]
        if plugin == "ambientmesh-cni"
        else [str(CNI_BIN / plugin)]
    )
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        node,
        *exe,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "CNI_COMMAND": command},
    )
    out, err = await proc.communicate(json.dumps(conf).encode())
    assert proc.returncode is not None
    return proc.returncode, (json.loads(out) if out.strip() else None), err.decode()


async def run_conflist(
    conflist: dict[str, Any], command: str, env: dict[str, str], node: str
) -> tuple[int, dict[str, Any] | None]:
    """libcni's algorithm: ADD in order threading prevResult, DEL in reverse."""
    plugins = conflist["plugins"]
    prev: dict[str, Any] | None = None
    order = plugins if command == "ADD" else list(reversed(plugins))
    for p in order:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **p}
        if prev is not None:
            conf["prevResult"] = prev
        code, out, err = await run_plugin(p["type"], command, conf, env, node)
        if code != 0:
            return code, {"plugin": p["type"], "result": out, "stderr": err}
        if command == "ADD":
            prev = out
    return 0, prev


@pytest.fixture
async def enrol_server(tmp_path: Path) -> AsyncIterator[tuple[Path, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    reply: dict[str, Any] = {"ok": True, "enrolled": True}

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.append(json.loads(await r.readline()))
        w.write(json.dumps(reply).encode() + b"\n")
        await w.drain()
        w.close()

    path = tmp_path / "enrol.sock"
    server = await asyncio.start_unix_server(handle, path=str(path))
    async with server:
        yield path, received


async def test_chained_after_bridge_host_local(
    netns: tuple[str, str], enrol_server: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    node, pod = netns
    sock, received = enrol_server
    tag = node.split("-")[1]
    conflist = {
        "cniVersion": "1.0.0",
        "name": f"am-{tag}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": f"am{tag}br",
                "isGateway": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.213.7.0/24"}]],
                    "dataDir": str(tmp_path / "ipam"),
                },
            },
            {"type": "ambientmesh-cni", "enrolSocket": str(sock), "timeoutSeconds": 5},
        ],
    }
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "CNI_CONTAINERID": f"ctr-{tag}",
        "CNI_NETNS": f"/var/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_BIN),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-{tag}",
    }
    code, result = await run_conflist(conflist, "ADD", env, node)
    assert code == 0, result
    assert result is not None
    # Our plugin passed the bridge plugin's result through: the pod's address is in it...
    (ip,) = result["ips"]
    assert ip["address"].startswith("10.213.7.")
    assert any(i.get("sandbox") == f"/var/run/netns/{pod}" for i in result["interfaces"])
    # ...and it is really configured inside the pod netns.
    show = await asyncio.create_subprocess_exec(
        "ip", "-n", pod, "-j", "addr", "show", "eth0", stdout=asyncio.subprocess.PIPE
    )
    addrs = (await show.communicate())[0].decode()
    assert ip["address"].split("/")[0] in addrs
    assert received == [
        {
            "op": "add",
            "namespace": "shop",
            "name": f"web-{tag}",
            "netns": f"/var/run/netns/{pod}",
            "cgroup": None,
        }
    ]

    code, _ = await run_conflist(conflist, "DEL", env, node)
    assert code == 0
    assert received[-1]["op"] == "del"
