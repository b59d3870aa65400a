"""The built image, for real: podman and containerd load it under both names (podman with its
labels), ztunnel runs from it as the DaemonSet runs it (root, privileged, the node's network,
BPF programs compiled by the image's BCC and pinned) and gets ready, and the unprivileged
components run as uid 1337 on a read-only root."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf.mounts import default_cgroup_root
from meshctl import image
from meshctl.lab import container as ctr
from meshctl.lab.system import http_get_in_netns

pytestmark = pytest.mark.timeout(900)  # the first test pays for the build

READY = 15021


def _podman(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--root", str(store / "root"), "--runroot", str(store / "run"), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (scripts/setup.sh)")
def test_podman_loads_the_archive_under_both_names_with_the_labels(
    built_image: image.BuildResult,
) -> None:
    # a private store (the machine's images are not touched), at a short path: podman refuses
    # a run root longer than 50 characters
    store = Path(tempfile.mkdtemp(prefix="amimg", dir="/tmp"))
    try:
        res = _podman(store, "load", "-i", str(built_image.archive))
        assert res.returncode == 0, res.stderr
        for ref in built_image.refs:
            assert f"Loaded image: {ref}" in res.stdout + res.stderr
        res = _podman(store, "image", "inspect", built_image.refs[0])
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)[0]
        src = image.source_info()
        labels = info["Labels"]
        assert labels["org.opencontainers.image.revision"].startswith(src.commit)
        assert labels["org.opencontainers.image.version"] == src.version
        assert info["Config"]["User"] == "1337:1337"
        assert set(built_image.refs) <= set(info["RepoTags"])
    finally:
        _podman(store, "rmi", "--all", "--force")
        shutil.rmtree(store, ignore_errors=True)


def test_the_image_tags_are_the_version_and_the_commit(built_image: image.BuildResult) -> None:
    src = image.source_info()
    assert built_image.refs == image.image_refs(src)
    assert built_image.refs[0].endswith(f":{src.version}")


@contextlib.contextmanager
def _netns() -> Iterator[str]:
    name = f"img{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _run_to_end(c: ctr.Container) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(c.argv(), capture_output=True, text=True, timeout=120)
    finally:
        c.delete()


def test_unprivileged_components_run_as_1337_on_a_read_only_root(
    unpacked_image: ctr.UnpackedImage, tmp_path: Path
) -> None:
    ca_parent = tmp_path / "ca"
    ca_parent.mkdir()
    os.chown(ca_parent, ctr.NONROOT, ctr.NONROOT)
    c = ctr.Container(
        f"img-ca-{secrets.token_hex(3)}", unpacked_image,
        ["sh", "-c", f"id -u; touch /usr/x || echo read-only; meshctl ca init {ca_parent}/d"],
        tmp_path / "bundle", mounts=[ctr.BindMount(str(ca_parent), str(ca_parent))],
    )  # fmt: skip
    res = _run_to_end(c)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "1337"
    assert "read-only" in res.stdout
    made = list((ca_parent / "d").iterdir())
    assert made, "the CA wrote nothing"
    assert all(p.stat().st_uid == ctr.NONROOT for p in made)


def test_ztunnel_from_the_image_compiles_pins_and_gets_ready_like_the_daemonset(
    unpacked_image: ctr.UnpackedImage, tmp_path: Path
) -> None:
    """The DaemonSet's container: root, privileged, the node's network, bpffs and the cgroup
    tree from the host; BCC inside the image compiles the programs against the host's
    headers (mounted, as on a node) and ztunnel pins them, then answers /healthz/ready."""
    work = tmp_path / "zt"
    work.mkdir()
    ca = tmp_path / "ca"
    ca.mkdir()
    os.chown(ca, ctr.NONROOT, ctr.NONROOT)
    _run_to_end(ctr.Container(f"img-ca-{secrets.token_hex(3)}", unpacked_image,
                              ["meshctl", "ca", "init", str(ca / "d")], tmp_path / "cab",
                              mounts=[ctr.BindMount(str(ca), str(ca))]))  # fmt: skip
    (work / "mesh.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n"
        "status: {addresses: [{type: InternalIP, address: 127.0.0.1}]}\n"
    )
    tag = f"imgzt{secrets.token_hex(3)}"
    pins = Path("/sys/fs/bpf") / f"ambientmesh-{tag}"
    cg_rel = f"ambientmesh-{tag}/ztunnel"
    args = [
        "ztunnel", "--node", "n1", "--config", str(work / "mesh.yaml"),
        "--ca-dir", str(ca / "d"), "--hbone-addr", "127.0.0.1:15008",
        "--admin-addr", "127.0.0.1:15000", "--metrics-addr", "127.0.0.1:15020",
        "--readiness-addr", f"127.0.0.1:{READY}", "--redirect", "bpf", "--bpf-pin-root", str(pins),
        # as the lab does: programs on a cgroup we remove ourselves, the container in a child
        "--bpf-cgroup", str(Path(default_cgroup_root()) / cg_rel),
    ]  # fmt: skip
    (Path(default_cgroup_root()) / cg_rel).mkdir(parents=True)
    with _netns() as ns:
        c = ctr.Container(
            tag, unpacked_image, args, tmp_path / "bundle", netns=f"/var/run/netns/{ns}",
            privileged=True, user=0, mounts=[*ctr.ztunnel_mounts(tmp_path)], cgroup=f"{cg_rel}/ctr",
        )  # fmt: skip
        log = open(tmp_path / "ztunnel.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(c.argv(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "ztunnel.log").read_text()[-2000:]
                try:
                    http_get_in_netns(ns, "127.0.0.1", READY, "/healthz/ready", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "ztunnel never got ready"
                    time.sleep(0.1)
            assert pins.is_dir() and any(pins.rglob("*")), "no BPF pins from the image's BCC"
            cgroup = Path(default_cgroup_root()) / cg_rel / "ctr"
            assert (cgroup / "cgroup.procs").read_text().split(), "ztunnel not in its cgroup"
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            c.delete()
            shutil.rmtree(pins, ignore_errors=True)
            for d in (f"{cg_rel}/ctr", cg_rel, cg_rel.split("/")[0]):
                with contextlib.suppress(OSError):
                    (Path(default_cgroup_root()) / d).rmdir()
            ctr.remove_v1_cgroups(f"{cg_rel}/ctr")
    assert proc.returncode == 0 or proc.returncode == -15, (tmp_path / "ztunnel.log").read_text()
    assert not pins.exists()
    assert not (Path(default_cgroup_root()) / cg_rel.split("/")[0]).exists()
    for h in ctr.cgroup_v1_hierarchies():
        assert not (h / cg_rel.split("/")[0]).exists(), f"left {h / cg_rel}"


@pytest.mark.skipif(shutil.which("containerd") is None, reason="needs containerd (setup.sh)")
def test_containerd_imports_the_archive_as_kind_load_does(built_image: image.BuildResult) -> None:
    """`kind load image-archive` runs `ctr -n k8s.io images import --all-platforms --digests`
    on each node: a containerd of our own (its own root, state and socket) does the same."""
    d = Path(tempfile.mkdtemp(prefix="amctrd", dir="/tmp"))
    sock = d / "c.sock"
    (d / "config.toml").write_text(
        f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
        f'[grpc]\n  address = "{sock}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable = true\n'
    )
    log = open(d / "log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(["containerd", "--config", str(d / "config.toml")],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None, (d / "log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd never answered"
            time.sleep(0.2)
        res = subprocess.run(
            [*ctr, "images", "import", "--all-platforms", "--digests", str(built_image.archive)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True)
        assert set(built_image.refs) <= set(listed.stdout.split())
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)
