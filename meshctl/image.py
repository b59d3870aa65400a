"""`meshctl image build`: the OCI image the manifests name, from Debian packages and our wheel.

No base image is downloaded from any registry: mmdebstrap assembles a minimal Debian rootfs
from the package list in `deploy/image/packages.txt` (the same file the Containerfile installs
from, so the two cannot drift), and the project goes on top from its wheel and its
dependencies' wheels. The result is an OCI archive (OCI layout in a tar, plus Docker's
`manifest.json`) that `podman load`, `ctr images import`, `kind load image-archive` and
`docker load` all accept.

Two layers, because they change at different rates: the Debian layer only when the package
list changes (it is cached, keyed by the list and the build options, so a rebuild after a code
change costs seconds), and the application layer on every commit. Both are written with
sorted entries, clamped mtimes and a zero gzip timestamp, so the same inputs give the same
digests.

The image is tagged twice: `<version>` (what `deploy/ambientmesh.yaml` names) and
`<version>-<commit>` (a reproducible tag derived from the commit, for pinning; `-dirty` is
appended when the work tree has changes the commit does not). Its default user is the
unprivileged `ambientmesh` (uid 1337, as the manifests' `runAsUser`): the CA, the controller
and the waypoint run as it; ztunnel and the CNI installer ask for root in their manifests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from meshctl.errors import UsageError

__all__ = [
    "DEFAULT_REPOSITORY",
    "PACKAGES_FILE",
    "BuildResult",
    "SourceInfo",
    "build_image",
    "image_refs",
    "parse_ref",
    "read_packages",
    "register",
    "source_info",
    "write_layer",
    "write_oci_archive",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES_FILE = REPO_ROOT / "deploy" / "image" / "packages.txt"
DEFAULT_REPOSITORY = "ghcr.io/ambientmesh/ambientmesh"
SOURCE_URL = "https://github.com/ambientmesh/ambientmesh"
SUITE = "bookworm"
USER_NAME = "ambientmesh"
USER_ID = 1337  # the manifests' runAsUser for the CA, the controller and the waypoint
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Run in the finished tree: every console script starts (all its imports resolve) and BCC's
# Python binding loads its library (and so LLVM's), and the waypoint's OTLP exporter imports.
SMOKE_CHECK = (
    "set -e; for c in ztunnel waypoint meshctl ambientmesh-cni; do command -v $c >/dev/null; done;"
    " ztunnel --help >/dev/null; waypoint --help >/dev/null; meshctl --help >/dev/null;"
    " python3 -c 'import bcc'; python3 -c 'import mesh.otlp as o; o.require()'"
)
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/merged-usr"
# Bump when the way the Debian layer is made changes, so cached layers are not reused.
BASE_RECIPE = 1
# Every mtime of the Debian layer (and mmdebstrap's SOURCE_DATE_EPOCH): the recipe's date, not
# the commit's, so the layer's digest changes only with the packages and registries and nodes
# keep the blob across releases. 2025-11-30T00:00:00Z.
BASE_EPOCH = 1764460800
# Kept out of the Debian layer: documentation, manuals, translations (copyright files stay:
# they are the licences of what we ship).
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
# Left behind by the install, different on every build, useless at run time.
BASE_LITTER = (
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt",
    "var/log/bootstrap.log",
    "var/cache/ldconfig/aux-cache",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "etc/machine-id",
)
# A Debian package name (Debian Policy 5.6.1).
_PKG_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ANN_REF = "org.opencontainers.image.ref.name"
ANN_CONTAINERD_NAME = "io.containerd.image.name"  # ctr import takes the full name from here

Log = Callable[[str], None]


# -- inputs ----------------------------------------------------------------------------------


def read_packages(path: Path = PACKAGES_FILE) -> list[str]:
    """The package list: one name a line, `#` starts a comment. A malformed or repeated name is
    an error naming the line, since both builders would otherwise fail later and less clearly."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"package list {path}: {exc.strerror or exc}") from None
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not _PKG_NAME.match(name):
            raise UsageError(f"package list {path}:{n}: {name!r} is not a Debian package name")
        if name in out:
            raise UsageError(f"package list {path}:{n}: {name} is listed twice")
        out.append(name)
    if not out:
        raise UsageError(f"package list {path}: no packages")
    return out


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the image is built from: the version, the commit and whether the tree differs."""

    version: str
    commit: str
    commit_time: int
    dirty: bool

    @property
    def commit_tag(self) -> str:
        tag = f"{self.version}-{self.commit[:12]}"
        return f"{tag}-dirty" if self.dirty else tag


def _git(root: Path, *args: str) -> str:
    res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise UsageError(f"git {' '.join(args)} in {root}: {res.stderr.strip()}")
    return res.stdout


def source_info(root: Path = REPO_ROOT) -> SourceInfo:
    try:
        version = str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{root / 'pyproject.toml'}: no project version ({exc})") from None
    commit = _git(root, "rev-parse", "HEAD").strip()
    when = int(_git(root, "show", "-s", "--format=%ct", "HEAD").strip())
    dirty = bool(_git(root, "status", "--porcelain").strip())
    return SourceInfo(version, commit, when, dirty)


def image_refs(src: SourceInfo, repository: str = DEFAULT_REPOSITORY) -> list[str]:
    """The names one build carries: the version (what the manifests name) and the commit tag."""
    return [f"{repository}:{src.version}", f"{repository}:{src.commit_tag}"]


_REPO = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def parse_ref(ref: str) -> tuple[str, str]:
    """`REPOSITORY:TAG` as (repository, tag), refusing what a runtime would refuse later (on a
    node, as ErrImagePull, far from the typo): no tag, a digest, bad characters."""
    if "@" in ref:
        raise UsageError(f"image {ref!r}: give a tag (REPOSITORY:TAG), not a digest")
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise UsageError(f"image {ref!r}: no tag (REPOSITORY:TAG, e.g. {DEFAULT_REPOSITORY}:0.1.0)")
    if not _REPO.match(repo):
        raise UsageError(f"image {ref!r}: {repo!r} is not a repository name")
    if not _TAG.match(tag):
        raise UsageError(f"image {ref!r}: {tag!r} is not a tag")
    return repo, tag


def base_key(packages: Sequence[str], suite: str = SUITE) -> str:
    """What the cached Debian layer depends on: a different list or recipe is a new layer."""
    text = json.dumps(
        {
            "recipe": BASE_RECIPE,
            "suite": suite,
            "packages": sorted(packages),
            "dpkg": list(DPKG_EXCLUDES),
            "user": [USER_NAME, USER_ID],
            "epoch": BASE_EPOCH,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- layers ----------------------------------------------------------------------------------


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _HashWriter:
    """A write-only file that hashes and counts what passes through on its way to `inner`."""

    def __init__(self, inner: _Writable | None) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        pass  # nothing buffered here; the file under it is flushed when it closes

    def digest(self) -> str:
        return f"sha256:{self.sha.hexdigest()}"


@dataclass(frozen=True, slots=True)
class Layer:
    path: Path  # the gzipped tar
    digest: str  # of the gzipped bytes (the blob)
    diff_id: str  # of the tar (the config's rootfs.diff_ids)
    size: int  # gzipped
    tar_size: int
    created_by: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layer:
        return cls(
            Path(d["path"]),
            d["digest"],
            d["diff_id"],
            int(d["size"]),
            int(d["tar_size"]),
            d["created_by"],
        )


def _walk(root: Path) -> Iterator[Path]:
    """Every path under `root`, parents before children, names sorted: a stable tar order."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        yield Path(e.path)
        if e.is_dir(follow_symlinks=False):
            yield from _walk(Path(e.path))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def write_layer(
    root: Path, out: Path, *, epoch: int, created_by: str, skip_children_of: Sequence[str] = ()
) -> Layer:
    """Tar `root` into `out` (gzip) as an OCI layer: sorted entries, every mtime `epoch`,
    numeric owners kept and names dropped, the gzip header's time zero, so the same tree gives
    the same digest. An overlayfs upper dir's whiteouts become OCI `.wh.` entries, and its
    opaque directories `.wh..wh..opq`. Device nodes and sockets are left out (the runtime
    provides /dev)."""
    skip = {s.strip("/") for s in skip_children_of}
    with open(out, "wb") as f:
        gz_hash = _HashWriter(f)
        with gzip.GzipFile(fileobj=gz_hash, mode="wb", mtime=0, compresslevel=6) as gz:
            tar_hash = _HashWriter(gz)
            stream = cast(IO[bytes], tar_hash)  # tarfile's "w|" only ever calls write()
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in _walk(root):
                    rel = path.relative_to(root).as_posix()
                    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
                    if parent in skip:
                        continue
                    st = path.lstat()
                    if _is_whiteout(st):
                        head, _, name = rel.rpartition("/")
                        ti = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
                        ti.mtime = epoch
                        tar.addfile(ti)
                        continue
                    if not (
                        stat.S_ISREG(st.st_mode)
                        or stat.S_ISDIR(st.st_mode)
                        or stat.S_ISLNK(st.st_mode)
                    ):
                        continue
                    ti = tar.gettarinfo(str(path), arcname=rel)
                    ti.mtime = epoch
                    ti.uname = ti.gname = ""
                    ti.pax_headers = {}
                    if ti.isreg():
                        with open(path, "rb") as src:
                            tar.addfile(ti, src)
                    else:
                        tar.addfile(ti)
                    if ti.isdir() and _opaque(path):
                        op = tarfile.TarInfo(f"{rel}/.wh..wh..opq")
                        op.mtime = epoch
                        tar.addfile(op)
    return Layer(out, gz_hash.digest(), tar_hash.digest(), gz_hash.size, tar_hash.size, created_by)


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


# -- the archive -----------------------------------------------------------------------------


def _iso(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_config(
    src: SourceInfo, layers: Sequence[Layer], packages: Sequence[str]
) -> dict[str, Any]:
    return {
        "created": _iso(src.commit_time),
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{USER_ID}:{USER_ID}",
            "Env": [
                f"PATH={PATH_ENV}",
                "LANG=C.UTF-8",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "WorkingDir": "/",
            "Labels": labels(src, packages),
        },
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [
            {"created": _iso(src.commit_time), "created_by": la.created_by} for la in layers
        ],
    }


def labels(src: SourceInfo, packages: Sequence[str]) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": "ambientmesh",
        "org.opencontainers.image.description": "ambientmesh: ztunnel, waypoint, CA, "
        "waypoint controller, CNI plugin",
        "org.opencontainers.image.version": src.version,
        "org.opencontainers.image.revision": src.commit + ("-dirty" if src.dirty else ""),
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.created": _iso(src.commit_time),
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.base.name": f"debian:{SUITE} (mmdebstrap, no base image)",
        "io.ambientmesh.debian-packages": " ".join(packages),
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_archive(
    out: Path,
    refs: Sequence[str],
    layers: Sequence[Layer],
    config: dict[str, Any],
    *,
    epoch: int,
) -> str:
    """Write the OCI layout (oci-layout, index.json, blobs) as a tar, plus Docker's
    `manifest.json` so `docker load` takes it too; each ref is one index entry carrying the full
    name in both annotations (containerd reads its own, podman the OCI one). Returns the
    manifest digest."""
    if not refs:
        raise ValueError("an image archive needs at least one name")
    cfg = _canonical(config)
    cfg_digest = f"sha256:{hashlib.sha256(cfg).hexdigest()}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": MT_LAYER, "digest": la.digest, "size": la.size} for la in layers],
        "annotations": {
            k: v
            for k, v in config["config"]["Labels"].items()
            if k.startswith("org.opencontainers.image.")
        },
    }
    man = _canonical(manifest)
    man_digest = f"sha256:{hashlib.sha256(man).hexdigest()}"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": man_digest,
                "size": len(man),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {ANN_REF: ref, ANN_CONTAINERD_NAME: ref},
            }
            for ref in refs
        ],
    }
    docker = [
        {
            "Config": _blob(cfg_digest),
            "RepoTags": list(refs),
            "Layers": [_blob(la.digest) for la in layers],
        }
    ]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _canonical({"imageLayoutVersion": "1.0.0"}), epoch)
        _add_bytes(tar, "index.json", _canonical(index), epoch)
        _add_bytes(tar, "manifest.json", _canonical(docker), epoch)
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(ti)
        _add_bytes(tar, _blob(cfg_digest), cfg, epoch)
        _add_bytes(tar, _blob(man_digest), man, epoch)
        for la in layers:
            ti = tarfile.TarInfo(_blob(la.digest))
            ti.size, ti.mode, ti.mtime = la.size, 0o644, epoch
            with open(la.path, "rb") as f:
                tar.addfile(ti, f)
    os.replace(tmp, out)
    return man_digest


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, epoch
    tar.addfile(ti, io.BytesIO(data))


# -- the build -------------------------------------------------------------------------------


@dataclass(slots=True)
class BuildResult:
    archive: Path
    refs: list[str]
    manifest_digest: str
    layers: list[Layer]
    base_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.archive.stat().st_size


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ambientmesh" / "image"


def _run(argv: Sequence[str], what: str, log: Log, **kw: Any) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise UsageError(f"{what} failed (exit {res.returncode}):\n{tail}")


def _need_tools() -> None:
    if os.geteuid() != 0:
        raise UsageError("image build needs root (mmdebstrap's root mode, chroot, overlayfs)")
    missing = [t for t in ("mmdebstrap", "chroot", "mount", "umount") if shutil.which(t) is None]
    if missing:
        raise UsageError(f"image build needs {', '.join(missing)}: apt-get install -y mmdebstrap")


def build_base(
    packages: Sequence[str], cache_dir: Path, *, epoch: int, log: Log, refresh: bool = False
) -> tuple[Path, Layer, bool]:
    """The Debian rootfs (a directory, kept as the lower dir for the application layer) and
    its layer, from the cache when the package list and recipe are unchanged. Returns (rootfs,
    layer, cached)."""
    key = base_key(packages)
    d = cache_dir / f"base-{key}"
    meta = d / "layer.json"
    rootfs = d / "rootfs"
    if not refresh and meta.exists() and rootfs.is_dir():
        with contextlib.suppress(OSError, ValueError, KeyError):
            layer = Layer.from_json(json.loads(meta.read_text()))
            if layer.path.exists():
                log(f"image: Debian layer {key} from the cache ({d})")
                return rootfs, layer, True
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    log(f"image: Debian {SUITE} rootfs with {' '.join(packages)} (mmdebstrap)")
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=essential",
        "--format=directory",
        # merged /usr set up directly: else apt satisfies init-system-helpers' dependency
        # with usrmerge, which brings perl (55 MB) into the image
        f"--hook-dir={MERGED_USR_HOOKS}",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        SUITE,
        str(rootfs),
    ]
    _run(argv, "mmdebstrap", log, env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)})
    _add_user(rootfs)
    for rel in BASE_LITTER:
        p = rootfs / rel
        if p.is_dir() and not p.is_symlink():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif p.exists() or p.is_symlink():
            p.unlink()
    # an empty machine-id: each container gets its own (systemd convention for images)
    (rootfs / "etc" / "machine-id").write_text("")
    log("image: writing the Debian layer")
    layer = write_layer(
        rootfs,
        d / "layer.tar.gz",
        epoch=epoch,
        skip_children_of=["dev"],
        created_by=f"mmdebstrap --variant=essential {SUITE} --include={','.join(packages)}",
    )
    meta.write_text(json.dumps(_layer_json(layer)))
    for stale in cache_dir.glob("base-*"):  # an earlier package list's: 500 MB each
        if stale != d:
            shutil.rmtree(stale, ignore_errors=True)
    return rootfs, layer, False


def _layer_json(la: Layer) -> dict[str, Any]:
    return {
        "path": str(la.path),
        "digest": la.digest,
        "diff_id": la.diff_id,
        "size": la.size,
        "tar_size": la.tar_size,
        "created_by": la.created_by,
    }


def _add_user(rootfs: Path) -> None:
    """The unprivileged user the CA, controller and waypoint run as (no login, no home)."""
    passwd, group = rootfs / "etc/passwd", rootfs / "etc/group"
    if f"\n{USER_NAME}:" not in "\n" + passwd.read_text():
        with open(passwd, "a") as f:
            f.write(
                f"{USER_NAME}:x:{USER_ID}:{USER_ID}:ambientmesh:/nonexistent:/usr/sbin/nologin\n"
            )
    if f"\n{USER_NAME}:" not in "\n" + group.read_text():
        with open(group, "a") as f:
            f.write(f"{USER_NAME}:x:{USER_ID}:\n")


def _source_tree(root: Path, dest: Path) -> None:
    """Copy what git tracks or would track (not ignored files, not build litter) for the wheel,
    so building never writes into the work tree."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for rel in sorted({p for p in out.decode().split("\0") if p}):
        src = root / rel
        if not src.exists() or src.is_dir():
            continue  # deleted in the work tree, or a submodule
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


# The optional extras the image ships: a production waypoint's `--otlp-endpoint` must work
# from the published image, where nobody can `pip install` an extra afterwards.
IMAGE_EXTRAS = "otlp"


def _constraints() -> str:
    """Pin every dependency to the version this interpreter has (the one the tests ran with),
    so the image carries what was tested and a rebuild picks the same wheels.

    Only this interpreter's own site-packages count: a process that has loaded BCC has
    Debian's dist-packages on sys.path too, whose older copies of the same packages
    (cryptography, pyOpenSSL...) would pin a second, conflicting version of each."""
    import sysconfig
    from importlib import metadata

    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    pins: dict[str, str] = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name and name.lower() != "ambientmesh":
            pins.setdefault(name.lower(), f"{name}=={dist.version}")
    return "\n".join(sorted(pins.values())) + "\n"


def build_wheels(root: Path, work: Path, log: Log) -> Path:
    """Our wheel and its dependencies' wheels, in one directory."""
    src = work / "src"
    _source_tree(root, src)
    wheels = work / "wheels"
    wheels.mkdir()
    log("image: building the ambientmesh wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(src)],
        "pip wheel (ambientmesh)",
        log,
    )
    ours = next(wheels.glob("ambientmesh-*.whl"))
    cons = work / "constraints.txt"
    cons.write_text(_constraints())
    log("image: collecting the dependencies' wheels")
    _run(
        [
            *pip,
            "wheel",
            "--only-binary=:all:",
            "--wheel-dir",
            str(wheels),
            "-c",
            str(cons),
            f"{ours}[{IMAGE_EXTRAS}]",
        ],
        "pip wheel (dependencies)",
        log,
    )
    return wheels


@contextlib.contextmanager
def _overlay(lower: Path, work: Path) -> Iterator[tuple[Path, Path]]:
    """The Debian rootfs with a writable layer on top; what the install writes lands in
    `upper`, which is exactly the application layer."""
    upper, wd, merged = work / "upper", work / "ovl-work", work / "merged"
    for p in (upper, wd, merged):
        p.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={wd}",
            str(merged),
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield merged, upper
    finally:
        subprocess.run(["umount", str(merged)], capture_output=True)


def install_app(rootfs: Path, wheels: Path, work: Path, *, epoch: int, log: Log) -> Layer:
    """Install the wheels with the image's own Python (in a chroot, so paths, shebangs and the
    bytecode's magic are the image's) using pip copied in for the duration, then compile the
    bytecode with unchecked hashes: the same on every build, and never rewritten at run time
    (the root filesystem is read-only for the unprivileged components)."""
    import pip as host_pip

    with _overlay(rootfs, work) as (merged, upper):
        stage = merged / "tmp" / "ambientmesh-build"
        shutil.copytree(Path(host_pip.__file__).parent, stage / "pip" / "pip")
        shutil.copytree(wheels, stage / "wheels")
        log("image: installing the wheels (pip in the image's python3)")
        _run(
            [
                "chroot",
                str(merged),
                "/usr/bin/env",
                "-i",
                f"PATH={PATH_ENV}",
                "PYTHONPATH=/tmp/ambientmesh-build/pip",
                "PYTHONDONTWRITEBYTECODE=1",
                "python3",
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-cache-dir",
                "--no-compile",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--break-system-packages",
                "--find-links=/tmp/ambientmesh-build/wheels",
                f"ambientmesh[{IMAGE_EXTRAS}]",
            ],
            "pip install in the image",
            log,
        )
        shutil.rmtree(stage)
        _run(
            [
                "chroot",
                str(merged),
                "/usr/bin/env",
                "-i",
                f"PATH={PATH_ENV}",
                "python3",
                "-m",
                "compileall",
                "-q",
                "-j0",
                "--invalidation-mode",
                "unchecked-hash",
                "/usr/local/lib",
            ],
            "compileall in the image",
            log,
        )
        # /proc as a container has it (the CLI reads mounts at import time)
        subprocess.run(["mount", "-t", "proc", "proc", str(merged / "proc")], check=True)
        try:
            _run(
                [
                    "chroot",
                    str(merged),
                    "/usr/bin/env",
                    "-i",
                    f"PATH={PATH_ENV}",
                    "sh",
                    "-c",
                    SMOKE_CHECK,
                ],
                "import check in the image",
                log,
            )
        finally:
            subprocess.run(["umount", str(merged / "proc")], capture_output=True)
        for litter in ("tmp", "root", "var", "etc"):  # pip's, python's: not ours to ship
            p = upper / litter
            if p.exists():
                shutil.rmtree(p)
        return write_layer(
            upper,
            work / "app.tar.gz",
            epoch=epoch,
            created_by="pip install ambientmesh (our wheel and its dependencies) into /usr/local",
        )


def build_image(
    out: Path,
    *,
    root: Path = REPO_ROOT,
    repository: str = DEFAULT_REPOSITORY,
    cache_dir: Path | None = None,
    refresh_base: bool = False,
    packages_file: Path = PACKAGES_FILE,
    log: Log = print,
) -> BuildResult:
    _need_tools()
    packages = read_packages(packages_file)
    src = source_info(root)
    refs = image_refs(src, repository)
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    secs: dict[str, float] = {}
    t0 = time.monotonic()
    # Builds on one machine share the cache: the Debian layer is made (and an earlier one
    # removed) under an exclusive lock, and used as the install's lower dir under a shared one.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rootfs, base, cached = build_base(
            packages, cache_dir, epoch=BASE_EPOCH, log=log, refresh=refresh_base
        )
        fcntl.flock(lock, fcntl.LOCK_SH)
        secs["debian_layer"] = time.monotonic() - t0
        with tempfile.TemporaryDirectory(prefix="ambientmesh-image-") as tmp:
            work = Path(tmp)
            t1 = time.monotonic()
            wheels = build_wheels(root, work, log)
            secs["wheels"] = time.monotonic() - t1
            t2 = time.monotonic()
            app = install_app(rootfs, wheels, work, epoch=src.commit_time, log=log)
            secs["app_layer"] = time.monotonic() - t2
            t3 = time.monotonic()
            layers = [base, app]
            config = image_config(src, layers, packages)
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = write_oci_archive(out, refs, layers, config, epoch=src.commit_time)
            secs["archive"] = time.monotonic() - t3
    secs["total"] = time.monotonic() - t0
    return BuildResult(out, refs, digest, layers, cached, secs)


# -- CLI -------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="the container image: build it, name it")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser(
        "build",
        help="build the OCI image archive from Debian packages and our wheel (root)",
        description="Builds the image with mmdebstrap (no base image download) and writes an "
        "OCI archive for podman load, ctr images import, kind load image-archive, docker load.",
    )
    b.add_argument("--out", type=Path, help="archive path (default: ambientmesh-<tag>.oci.tar)")
    b.add_argument("--repository", default=DEFAULT_REPOSITORY, help="image name without tag")
    b.add_argument("--cache-dir", type=Path, help=f"Debian layer cache ({default_cache_dir()})")
    b.add_argument(
        "--refresh",
        action="store_true",
        help="rebuild the Debian layer even if cached (picks up security updates)",
    )
    b.add_argument("--packages", type=Path, default=PACKAGES_FILE, help=argparse.SUPPRESS)
    b.set_defaults(func=_cmd_build)
    t = isub.add_parser("tag", help="print the names `image build` gives the image here")
    t.add_argument("--repository", default=DEFAULT_REPOSITORY)
    t.set_defaults(func=_cmd_tag)
    pk = isub.add_parser("packages", help="print the image's Debian packages")
    pk.set_defaults(func=_cmd_packages)


def _cmd_build(args: argparse.Namespace) -> int:
    src = source_info()
    out: Path = args.out or Path(f"ambientmesh-{src.commit_tag}.oci.tar")
    res = build_image(
        out,
        repository=args.repository,
        cache_dir=args.cache_dir,
        refresh_base=args.refresh,
        packages_file=args.packages,
        log=lambda m: print(m, file=sys.stderr),
    )
    mib = 1024 * 1024
    print(f"wrote {res.archive} ({res.size / mib:.1f} MiB) in {res.seconds['total']:.0f} s")
    for la in res.layers:
        print(
            f"  layer {la.digest[:19]} {la.size / mib:7.1f} MiB gzip, "
            f"{la.tar_size / mib:7.1f} MiB tar: {la.created_by[:60]}"
        )
    print(f"  manifest {res.manifest_digest}")
    for ref in res.refs:
        print(f"  {ref}")
    print(
        f"load it: kind load image-archive {out}  (or: ctr -n k8s.io images import {out}, "
        f"podman load -i {out}, docker load -i {out})"
    )
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    for ref in image_refs(source_info(), args.repository):
        print(ref)
    return 0


def _cmd_packages(args: argparse.Namespace) -> int:
    print("\n".join(read_packages()))
    return 0
