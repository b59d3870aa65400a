"""The CNI installer against real directories laid out like a node's /opt/cni/bin and
/etc/cni/net.d, and the installed plugin executed the way the runtime executes it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cni.install import KUBECONFIG_NAME, PLUGIN_TYPE, install, kubeconfig, uninstall

BRIDGE = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
ENTRY = {"type": PLUGIN_TYPE, "enrolSocket": "/run/ambientmesh/enrol.sock"}


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    b, c = tmp_path / "bin", tmp_path / "net.d"
    b.mkdir()
    c.mkdir()
    return b, c


def types(conf: dict[str, Any]) -> list[str]:
    return [p["type"] for p in conf["plugins"]]


def test_chains_after_existing_plugins_and_is_idempotent(tmp_path: Path) -> None:
    bin_dir, conf_dir = dirs(tmp_path)
    (conf_dir / "10-flannel.conflist").write_text(json.dumps(BRIDGE))
    (conf_dir / "99-other.conflist").write_text(json.dumps(BRIDGE))
    target = install(bin_dir, conf_dir, ENTRY)
    assert target == conf_dir / "10-flannel.conflist"
    conf = json.loads(target.read_text())
    assert types(conf) == ["bridge", "portmap", PLUGIN_TYPE]
    assert json.loads((conf_dir / "99-other.conflist").read_text()) == BRIDGE
    inode = target.stat().st_ino
    install(bin_dir, conf_dir, ENTRY)
    assert target.stat().st_ino == inode, "an unchanged config must not be rewritten"
    assert types(json.loads(target.read_text())) == ["bridge", "portmap", PLUGIN_TYPE]

    # The primary CNI rewrites its config and drops us: the next pass chains us again.
    target.write_text(json.dumps(BRIDGE))
    install(bin_dir, conf_dir, ENTRY)
    assert types(json.loads(target.read_text())) == ["bridge", "portmap", PLUGIN_TYPE]

    uninstall(bin_dir, conf_dir)
    assert json.loads(target.read_text()) == BRIDGE
    assert not (bin_dir / PLUGIN_TYPE).exists()


def test_single_plugin_conf_becomes_a_conflist(tmp_path: Path) -> None:
    bin_dir, conf_dir = dirs(tmp_path)
    single = {
        "cniVersion": "0.4.0",
        "name": "net",
        "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
    }
    (conf_dir / "05-ptp.conf").write_text(json.dumps(single))
    target = install(bin_dir, conf_dir, ENTRY)
    assert target == conf_dir / "05-ptp.conflist"
    assert not (conf_dir / "05-ptp.conf").exists()
    conf = json.loads(target.read_text())
    assert conf["cniVersion"] == "0.4.0" and conf["name"] == "net"
    assert conf["plugins"][0] == {"type": "ptp", "ipam": single["ipam"]}
    assert types(conf) == ["ptp", PLUGIN_TYPE]


def test_no_primary_config_yet(tmp_path: Path) -> None:
    bin_dir, conf_dir = dirs(tmp_path)
    assert install(bin_dir, conf_dir, ENTRY) is None
    assert (bin_dir / PLUGIN_TYPE).exists()  # the binary goes first, the config when it can


def test_kubeconfig_is_private_and_referenced(tmp_path: Path) -> None:
    bin_dir, conf_dir = dirs(tmp_path)
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(BRIDGE))
    kc = kubeconfig("https://10.96.0.1:443", "tok", b"-----BEGIN CERTIFICATE-----\n")
    target = install(bin_dir, conf_dir, ENTRY, kc)
    assert target is not None
    kpath = conf_dir / KUBECONFIG_NAME
    assert (kpath.stat().st_mode & 0o777) == 0o600
    assert json.loads(target.read_text())["plugins"][-1]["kubeconfig"] == str(kpath)
    assert json.loads(kpath.read_text())["users"][0]["user"]["token"] == "tok"


def test_installed_plugin_runs_standalone(tmp_path: Path) -> None:
    """The host has no ambientmesh package: the copied file must run on the stdlib alone."""
    bin_dir, conf_dir = dirs(tmp_path)
    install(bin_dir, conf_dir, ENTRY)
    exe = bin_dir / PLUGIN_TYPE
    assert os.access(exe, os.X_OK)
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}
    out = subprocess.run(
        [str(exe)],
        input=b'{"cniVersion":"1.0.0"}',
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert "1.0.0" in json.loads(out.stdout)["supportedVersions"]
    # ADD without ztunnel, for a pod in an excluded namespace: passes prevResult through.
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]}
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": PLUGIN_TYPE,
        "enrolSocket": str(tmp_path / "none.sock"),
        "prevResult": prev,
    }
    env.update(
        CNI_COMMAND="ADD",
        CNI_CONTAINERID="x",
        CNI_NETNS="/proc/self/ns/net",
        CNI_IFNAME="eth0",
        CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
    )
    out = subprocess.run(
        [str(exe)],
        input=json.dumps(conf).encode(),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == prev
