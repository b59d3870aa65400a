"""The image builder's own pieces, without building an image: the shared package list, the
layer writer (reproducible, whiteouts), the OCI archive's structure as podman, containerd and
docker read it, and the names a build gives the image."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from meshctl import image
from meshctl.errors import UsageError

CONTAINERFILE = image.REPO_ROOT / "deploy" / "image" / "Containerfile"


# -- the package list ------------------------------------------------------------------------


def test_the_shipped_package_list_parses_and_has_what_the_components_need() -> None:
    pkgs = image.read_packages()
    for need in ("python3", "python3-bpfcc", "iproute2", "iptables"):
        assert need in pkgs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("python3\nPython3\n", r":2: 'Python3' is not a Debian package name"),
        ("python3\n  python3  # again\n", r":2: python3 is listed twice"),
        ("# only comments\n\n", r"no packages"),
        ("iproute2; rm -rf /\n", r":1: .* is not a Debian package name"),
    ],
)
def test_a_bad_package_list_is_refused_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "packages.txt"
    f.write_text(text)
    with pytest.raises(UsageError, match=message):
        image.read_packages(f)


def test_a_missing_package_list_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"package list .*nope"):
        image.read_packages(tmp_path / "nope")


def test_the_containerfile_installs_from_the_shared_list_and_names_no_package_itself() -> None:
    """Drift between the two builders is impossible only while the Containerfile reads the list
    and spells out none of it."""
    text = CONTAINERFILE.read_text()
    assert "COPY deploy/image/packages.txt" in text
    assert re.search(r"sed -e 's/#\.\*//' /tmp/packages.txt \| xargs apt-get install", text)
    instructions = "\n".join(
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    # the builder stage's pip tooling is not the image's package list
    final = instructions.split("FROM ${DEBIAN}\n", 1)[1]
    for pkg in image.read_packages():
        if pkg == "python3":  # the interpreter's name is in every command line
            continue
        assert not re.search(rf"(?<![\w./-]){re.escape(pkg)}(?![\w.-])", final), pkg


def test_the_base_layer_key_follows_the_package_list() -> None:
    a = image.base_key(["python3", "iproute2"])
    assert a == image.base_key(["iproute2", "python3"])  # order does not matter
    assert a != image.base_key(["python3", "iproute2", "kmod"])


# -- names -----------------------------------------------------------------------------------


def test_the_image_is_named_by_version_and_by_commit() -> None:
    src = image.SourceInfo("0.1.0", "0123456789abcdef" * 2 + "01234567", 1_700_000_000, False)
    assert image.image_refs(src) == [
        "ghcr.io/ambientmesh/ambientmesh:0.1.0",
        "ghcr.io/ambientmesh/ambientmesh:0.1.0-0123456789ab",
    ]
    dirty = image.SourceInfo(src.version, src.commit, src.commit_time, True)
    assert image.image_refs(dirty, "r.example/m")[1] == "r.example/m:0.1.0-0123456789ab-dirty"


def test_source_info_reads_this_checkout() -> None:
    src = image.source_info()
    assert re.fullmatch(r"[0-9a-f]{40}", src.commit)
    assert src.version
    assert src.commit_time > 1_600_000_000


# -- layers ----------------------------------------------------------------------------------


def _tree(root: Path, when: int) -> None:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "usr" / "lib").mkdir()
    (root / "usr" / "lib" / "data").write_bytes(b"x" * 100_000)
    os.link(root / "usr" / "lib" / "data", root / "usr" / "lib" / "data-again")
    (root / "bin").symlink_to("usr/bin")
    (root / "dev").mkdir()
    (root / "dev" / "stray").write_text("never shipped")
    for dirpath, dirs, files in os.walk(root):
        for n in [*dirs, *files]:
            os.utime(Path(dirpath) / n, (when, when), follow_symlinks=False)


def test_a_layer_is_reproducible_sorted_clamped_and_keeps_links(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _tree(a, 2_000_000_000)  # different times, the same layer
    _tree(b, 1_100_000_000)
    la = image.write_layer(a, tmp_path / "a.tgz", epoch=1_700_000_000, created_by="t",
                           skip_children_of=["dev"])  # fmt: skip
    lb = image.write_layer(b, tmp_path / "b.tgz", epoch=1_700_000_000, created_by="t",
                           skip_children_of=["dev"])  # fmt: skip
    assert (la.digest, la.diff_id) == (lb.digest, lb.diff_id)
    blob = (tmp_path / "a.tgz").read_bytes()
    assert la.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert la.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert la.size == len(blob)
    with tarfile.open(tmp_path / "a.tgz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert "dev" in names and "dev/stray" not in names
    assert all(m.mtime == 1_700_000_000 for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)
    by = {m.name: m for m in members}
    assert by["bin"].issym() and by["bin"].linkname == "usr/bin"
    assert by["usr/lib/data-again"].islnk() and by["usr/lib/data-again"].linkname == "usr/lib/data"
    assert by["usr/bin/tool"].mode & 0o777 == 0o755


def test_a_layer_with_older_files_gets_the_epoch_too(tmp_path: Path) -> None:
    """Directories copied up from the Debian layer carry that build's times: only one fixed
    time for every entry makes the application layer independent of when the base was built."""
    (tmp_path / "t").mkdir()
    _tree(tmp_path / "t", 1_000_000_000)
    image.write_layer(tmp_path / "t", tmp_path / "t.tgz", epoch=1_700_000_000, created_by="t")
    with tarfile.open(tmp_path / "t.tgz") as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}


@pytest.mark.skipif(os.geteuid() != 0, reason="an overlayfs whiteout is a 0:0 device: root only")
def test_an_overlay_whiteout_becomes_an_oci_whiteout(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    image.write_layer(up, tmp_path / "l.tgz", epoch=1_700_000_000, created_by="t")
    with tarfile.open(tmp_path / "l.tgz") as tar:
        names = tar.getnames()
    assert names == ["etc", "etc/.wh.gone"]


# -- the archive -----------------------------------------------------------------------------


def _archive(tmp_path: Path) -> tuple[Path, str, list[image.Layer]]:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root, 1_600_000_000)
    layer = image.write_layer(root, tmp_path / "l.tgz", epoch=1_700_000_000, created_by="t")
    src = image.SourceInfo("0.1.0", "ab" * 20, 1_700_000_000, False)
    refs = image.image_refs(src)
    cfg = image.image_config(src, [layer], ["python3"])
    out = tmp_path / "img.oci.tar"
    digest = image.write_oci_archive(out, refs, [layer], cfg, epoch=1_700_000_000)
    return out, digest, [layer]


def test_the_archive_is_an_oci_layout_every_loader_reads(tmp_path: Path) -> None:
    out, digest, layers = _archive(tmp_path)
    with tarfile.open(out) as tar:
        files = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():  # every blob is named by its digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == [
        "ghcr.io/ambientmesh/ambientmesh:0.1.0",
        "ghcr.io/ambientmesh/ambientmesh:0.1.0-abababababab",
    ]
    for m in index["manifests"]:  # containerd's ctr import (and kind load) name it from here
        assert m["annotations"]["io.containerd.image.name"] == m["annotations"][image.ANN_REF]
        assert m["digest"] == digest
    manifest = json.loads(files[f"blobs/sha256/{digest.split(':')[1]}"])
    assert [la["digest"] for la in manifest["layers"]] == [la.digest for la in layers]
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["rootfs"]["diff_ids"] == [la.diff_id for la in layers]
    assert config["config"]["User"] == "1337:1337"
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == "ab" * 20
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    docker = json.loads(files["manifest.json"])  # docker load's own format, same blobs
    assert docker[0]["RepoTags"] == names
    assert all(p in files for p in [docker[0]["Config"], *docker[0]["Layers"]])


def test_the_same_inputs_give_the_same_archive(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    a, da, _ = _archive(tmp_path / "1")
    b, db, _ = _archive(tmp_path / "2")
    assert da == db
    assert a.read_bytes() == b.read_bytes()


def test_building_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        image.build_image(tmp_path / "x.tar", cache_dir=tmp_path)


def test_constraints_pin_this_interpreters_packages_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that loaded BCC has Debian's dist-packages on sys.path, with older copies of
    packages we use: their versions must not become a second, conflicting pin."""
    from importlib import metadata

    from meshctl.image import _constraints

    real = metadata.version("cryptography")
    old = tmp_path / "dist-packages" / "cryptography-1.0.0.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: cryptography\nVersion: 1.0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "dist-packages"))
    pins = [p for p in _constraints().splitlines() if p.lower().startswith("cryptography==")]
    assert pins == [f"cryptography=={real}"]
