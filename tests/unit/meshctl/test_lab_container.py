"""Running a component from the image: unpacking an archive (whiteouts, hostile entries) and the
runtime config each component gets (ztunnel like its DaemonSet, the others like their
Deployments). No runtime is started here; tests/e2e/image runs them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from meshctl import image
from meshctl.lab import container as ctr


def _layer(tmp: Path, name: str, entries: list[tuple[str, bytes | str | None]]) -> image.Layer:
    """A layer from (path, content) pairs: bytes a file, None a directory, "->x" a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, content in entries:
            ti = tarfile.TarInfo(path)
            if content is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            elif isinstance(content, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, content.removeprefix("->")
                tar.addfile(ti)
            else:
                ti.size = len(content)
                tar.addfile(ti, io.BytesIO(content))
    raw = buf.getvalue()
    gz = gzip.compress(raw, mtime=0)
    out = tmp / f"{name}.tgz"
    out.write_bytes(gz)
    gz_id, raw_id = hashlib.sha256(gz).hexdigest(), hashlib.sha256(raw).hexdigest()
    return image.Layer(out, f"sha256:{gz_id}", f"sha256:{raw_id}", len(gz), len(raw), name)


def _archive(tmp: Path, layers: list[image.Layer]) -> Path:
    src = image.SourceInfo("0.1.0", "cd" * 20, 1_700_000_000, False)
    out = tmp / "img.oci.tar"
    cfg = image.image_config(src, layers, ["python3"])
    image.write_oci_archive(out, image.image_refs(src), layers, cfg, epoch=1)
    return out


def test_unpack_applies_layers_in_order_with_whiteouts(tmp_path: Path) -> None:
    base = _layer(tmp_path, "base", [
        ("etc", None), ("etc/keep", b"1"), ("etc/gone", b"x"),
        ("opt", None), ("opt/old", b"o"), ("usr", None), ("usr/bin", None),
        ("bin", "->usr/bin"),
    ])  # fmt: skip
    app = _layer(tmp_path, "app", [
        ("etc", None), ("etc/.wh.gone", b""), ("etc/keep", b"2"),
        ("opt", None), ("opt/.wh..wh..opq", b""), ("opt/new", b"n"),
    ])  # fmt: skip
    img = ctr.unpack(_archive(tmp_path, [base, app]), tmp_path / "u")
    r = img.rootfs
    assert (r / "etc" / "keep").read_bytes() == b"2"
    assert not (r / "etc" / "gone").exists()
    assert sorted(p.name for p in (r / "opt").iterdir()) == ["new"]
    assert (r / "bin").is_symlink()
    assert img.refs == ("ghcr.io/ambientmesh/ambientmesh:0.1.0",
                        "ghcr.io/ambientmesh/ambientmesh:0.1.0-cdcdcdcdcdcd")  # fmt: skip
    assert "LANG=C.UTF-8" in img.env
    # unpacking the same image again reuses the tree
    (r / "marker").write_text("still here")
    assert ctr.unpack(_archive(tmp_path, [base, app]), tmp_path / "u").rootfs == r
    assert (r / "marker").exists()


@pytest.mark.parametrize(
    "entries",
    [
        [("../escape", b"x")],
        [("/abs", b"x")],
        # through a symlink that points out of the rootfs
        [("link", f"->{'/tmp'}"), ("link/escape", b"x")],
    ],
)
def test_unpack_refuses_entries_that_leave_the_rootfs(
    tmp_path: Path, entries: list[tuple[str, bytes | str | None]]
) -> None:
    arch = _archive(tmp_path, [_layer(tmp_path, "evil", entries)])
    with pytest.raises(ctr.ImageError, match="leaves the rootfs"):
        ctr.unpack(arch, tmp_path / "u")
    assert not Path("/tmp/escape").exists() or Path("/tmp/escape").read_bytes() != b"x"


def test_unpack_refuses_what_is_no_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
    with pytest.raises(ctr.ImageError, match=r"no index\.json"):
        ctr.unpack(bad, tmp_path / "u")
    (tmp_path / "junk").write_bytes(b"not a tar")
    with pytest.raises(ctr.ImageError):
        ctr.unpack(tmp_path / "junk", tmp_path / "u")


def _img(tmp_path: Path) -> ctr.UnpackedImage:
    return ctr.UnpackedImage(tmp_path / "rootfs", "sha256:" + "0" * 64, ("x",),
                             {"Env": ["PATH=/usr/bin", "LANG=C.UTF-8"]})  # fmt: skip


def test_ztunnel_gets_the_daemonsets_privileges_and_mounts(tmp_path: Path) -> None:
    c = ctr.Container(
        "zt-n1", _img(tmp_path), ["ztunnel", "--node", "n1"], tmp_path / "b",
        netns="/var/run/netns/lab-node-n1", privileged=True, user=0,
        env={"NODE_NAME": "n1"}, mounts=ctr.ztunnel_mounts(tmp_path),
        cgroup="ambientmesh/lab/ztunnel/n1/zt-n1", runtime="runc",
    )  # fmt: skip
    cfg = c.config()
    ns = {n["type"]: n.get("path") for n in cfg["linux"]["namespaces"]}
    assert ns["network"] == "/var/run/netns/lab-node-n1"  # the node's network (hostNetwork)
    assert "pid" not in ns  # hostPID
    assert "cgroup" not in ns  # finds its own cgroup in /proc/self/cgroup
    assert cfg["process"]["user"] == {"uid": 0, "gid": 0}
    assert "CAP_SYS_ADMIN" in cfg["process"]["capabilities"]["effective"]
    assert "CAP_BPF" in cfg["process"]["capabilities"]["effective"]
    assert cfg["process"]["noNewPrivileges"] is False
    assert "NODE_NAME=n1" in cfg["process"]["env"]
    mounts = {m["destination"]: m for m in cfg["mounts"]}
    assert "rshared" in mounts["/sys/fs/bpf"]["options"]  # Bidirectional: pins outlive us
    assert "rslave" in mounts["/var/run/netns"]["options"]  # HostToContainer
    assert "ro" in mounts["/lib/modules"]["options"] and "ro" in mounts["/usr/src"]["options"]
    assert mounts[str(tmp_path)]["source"] == str(tmp_path)
    dests = [m["destination"] for m in cfg["mounts"]]
    assert dests.index("/run") < dests.index("/var/run/netns")  # tmpfs first, then the bind
    assert cfg["linux"]["cgroupsPath"] == "ambientmesh/lab/ztunnel/n1/zt-n1"
    assert cfg["root"] == {"path": str(tmp_path / "rootfs"), "readonly": True}
    assert c.argv() == ["runc", "run", "--bundle", str(tmp_path / "b"), "zt-n1"]
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == cfg


def test_other_components_get_no_privileges(tmp_path: Path) -> None:
    cfg = ctr.Container("ca", _img(tmp_path), ["meshctl", "ca", "init", "/x"], tmp_path / "b",
                        runtime="crun").config()  # fmt: skip
    assert cfg["process"]["user"] == {"uid": 1337, "gid": 1337}
    assert all(v == [] for v in cfg["process"]["capabilities"].values())
    assert cfg["process"]["noNewPrivileges"] is True
    assert {n["type"] for n in cfg["linux"]["namespaces"]} >= {"pid", "mount"}
    assert "network" not in {n["type"] for n in cfg["linux"]["namespaces"]}
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    sys_mount = next(m for m in cfg["mounts"] if m["destination"] == "/sys")
    assert "ro" in sys_mount["options"]


def test_the_runtime_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_OCI_RUNTIME", "no-such-runtime")
    with pytest.raises(ctr.ImageError, match="no OCI runtime"):
        ctr.choose_runtime()


def test_the_labs_command_lines_become_the_images() -> None:
    import sys

    assert ctr.image_command([sys.executable, "-m", "ztunnel.main", "--node", "n1"]) == [
        "ztunnel", "--node", "n1",
    ]  # fmt: skip
    assert ctr.image_command(["python", "-m", "waypoint.main", "--name", "w"]) == [
        "python3", "-m", "waypoint.main", "--name", "w",
    ]  # fmt: skip
    assert ctr.image_command(["sh", "-c", "true"]) == ["sh", "-c", "true"]


def test_unpack_cached_shares_one_tree_per_image(tmp_path: Path) -> None:
    arch = _archive(tmp_path, [_layer(tmp_path, "l", [("etc", None), ("etc/a", b"1")])])
    a = ctr.unpack_cached(arch, tmp_path / "cache")
    b = ctr.unpack_cached(arch, tmp_path / "cache")
    assert a.rootfs == b.rootfs and (a.rootfs / "etc" / "a").read_bytes() == b"1"
    assert a.rootfs.parent.name == "rootfs-" + a.digest.split(":")[1][:16]


def test_old_unpacked_trees_are_pruned_but_not_recent_ones(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for i in range(6):
        d = cache / f"rootfs-{i:016x}"
        (d / "rootfs").mkdir(parents=True)
        (d / "unpacked.json").write_text("{}")
        age = 2 * 86400 if i < 4 else 60  # 0..3 idle for two days, 4 and 5 fresh
        t = 1_000_000_000 + i if i < 4 else time.time() - age
        os.utime(d / "unpacked.json", (t, t))
    ctr.prune(cache, keep=cache / "rootfs-0000000000000000", newest=3)
    left = sorted(p.name for p in cache.iterdir())
    # the three newest stay (5, 4, 3), the kept one stays, 1 and 2 go
    assert left == [f"rootfs-{i:016x}" for i in (0, 3, 4, 5)]


def test_a_lab_ztunnel_attaches_to_the_labs_cgroup_and_runs_in_a_child(tmp_path: Path) -> None:
    """The runtime removes the container's cgroup when it ends; programs must not be attached
    there, or the lab's down could not detach them."""
    from bpf.mounts import default_cgroup_root

    cg = Path(default_cgroup_root()) / "ambientmesh" / "lab" / "ztunnel" / "n1"
    c = ctr.lab_ztunnel(
        _img(tmp_path), "lab-zt-n1",
        ["/usr/bin/python3", "-m", "ztunnel.main", "--node", "n1", "--redirect", "bpf"],
        bundle=tmp_path / "b", node_netns="lab-node-n1", cgroup=cg, state_dir=tmp_path,
        env={"NODE_NAME": "n1"},
    )  # fmt: skip
    assert c.args[0] == "ztunnel"
    assert list(c.args[-2:]) == ["--bpf-cgroup", str(cg)]
    assert c.cgroup == "/ambientmesh/lab/ztunnel/n1/ctr"
    wp = ctr.lab_waypoint(
        _img(tmp_path), "lab-wp", ["python", "-m", "waypoint.main"], bundle=tmp_path / "w",
        pod_netns="lab-pod-x", cgroup=cg.parent / "pod", state_dir=tmp_path, env={},
    )  # fmt: skip
    assert wp.cgroup == "/ambientmesh/lab/ztunnel/pod/ctr"
    assert wp.config()["process"]["capabilities"]["bounding"] == []
