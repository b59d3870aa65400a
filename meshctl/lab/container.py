"""Run a mesh component from the image archive with an OCI runtime, as a node's kubelet would.

The archive `meshctl image build` writes is unpacked once (layers in order, OCI whiteouts
applied) into a read-only rootfs, and each component gets a bundle whose `config.json` says
what its manifest says: ztunnel like the DaemonSet's container (privileged, the node's
network and pids, bpffs, the cgroup tree, the netns dir, kernel modules and headers, the
enrolment socket dir), the waypoint and the CA like their Deployments' (uid 1337, no
capabilities, read-only root). The runtime is runc or crun: crun refuses a host whose cgroup
v2 hierarchy has controllers while v1 hierarchies are mounted too ("hybrid"), which this
project's development machines are, so runc is the default there and crun where cgroups are
unified.

Unlike the DaemonSet, the cgroup namespace is the host's: the lab tells ztunnel nothing about
its pod, so ztunnel finds its own cgroup in /proc/self/cgroup, where a private cgroup namespace
would show "/" (on Kubernetes, POD_UID finds it in the host's tree instead).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BindMount",
    "Container",
    "UnpackedImage",
    "cgroup_v1_hierarchies",
    "choose_runtime",
    "image_command",
    "lab_waypoint",
    "lab_ztunnel",
    "remove_v1_cgroups",
    "unpack",
    "unpack_cached",
    "ztunnel_mounts",
]

NONROOT = 1337
CHILD_CGROUP = "ctr"  # the runtime's cgroup for a lab container, under the lab's own
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_FS = Path("/sys/fs/cgroup")


class ImageError(Exception):
    """The archive is not an image we can run (names what is wrong with it)."""


# -- unpack ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnpackedImage:
    rootfs: Path
    digest: str  # the manifest's
    refs: tuple[str, ...]
    config: Mapping[str, Any]  # the image config's "config" (Env, User, Labels, ...)

    @property
    def env(self) -> list[str]:
        return list(self.config.get("Env") or [f"PATH={DEFAULT_PATH}"])


def _read_json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        f = tar.extractfile(name)
    except KeyError:
        raise ImageError(f"not an OCI archive: no {name}") from None
    if f is None:
        raise ImageError(f"not an OCI archive: {name} is not a file")
    try:
        return json.loads(f.read())
    except ValueError as exc:
        raise ImageError(f"{name}: not JSON ({exc})") from None


def _blob(digest: str) -> str:
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageError(f"unsupported digest {digest!r}")
    return f"blobs/sha256/{hexd}"


def unpack(archive: Path, dest: Path) -> UnpackedImage:
    """Unpack the image in `archive` into `dest`/rootfs; an image already unpacked there (same
    manifest digest) is reused. Layer entries that would land outside the rootfs are refused."""
    try:
        tar = tarfile.open(archive)  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{archive}: {exc}") from None
    with tar:
        index = _read_json(tar, "index.json")
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError(f"{archive}: index.json lists no image")
        digest = str(manifests[0].get("digest"))
        refs = tuple(
            str(m.get("annotations", {}).get("org.opencontainers.image.ref.name", ""))
            for m in manifests
            if m.get("digest") == digest
        )
        manifest = _read_json(tar, _blob(digest))
        cfg = _read_json(tar, _blob(manifest["config"]["digest"]))
        rootfs = dest / "rootfs"
        stamp = dest / "unpacked.json"
        if stamp.exists() and rootfs.is_dir():
            try:
                if json.loads(stamp.read_text()).get("digest") == digest:
                    return UnpackedImage(rootfs, digest, refs, cfg.get("config") or {})
            except ValueError:
                pass
        stamp.unlink(missing_ok=True)  # a half-unpacked tree is never taken for a whole one
        if rootfs.exists():
            shutil.rmtree(rootfs)
        rootfs.mkdir(parents=True)
        os.chmod(dest, 0o755)  # the unprivileged components reach their root through it
        for layer in manifest.get("layers") or []:
            member = tar.extractfile(_blob(layer["digest"]))
            if member is None:
                raise ImageError(f"{archive}: layer {layer['digest']} missing")
            _apply_layer(member, rootfs)
    stamp.write_text(json.dumps({"digest": digest, "refs": list(refs)}))
    return UnpackedImage(rootfs, digest, refs, cfg.get("config") or {})


def archive_digest(archive: Path) -> str:
    """The manifest digest the archive's index names first (what `unpack` would run)."""
    try:
        with tarfile.open(archive) as tar:
            manifests = _read_json(tar, "index.json").get("manifests") or []
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{archive}: {exc}") from None
    if not manifests:
        raise ImageError(f"{archive}: index.json lists no image")
    return str(manifests[0].get("digest"))


def unpack_cached(archive: Path, cache_root: Path) -> UnpackedImage:
    """`unpack` into `cache_root`/rootfs-<digest>, shared by every lab and test that runs the
    same image (unpacking takes seconds and 400 MB); concurrent callers wait on a lock."""
    import fcntl

    digest = archive_digest(archive)
    dest = cache_root / f"rootfs-{_blob(digest).rsplit('/', 1)[1][:16]}"
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        img = unpack(archive, dest)
        os.utime(dest / "unpacked.json")  # last used: what pruning goes by
    prune(cache_root, keep=dest)
    return img


def prune(cache_root: Path, *, keep: Path, newest: int = 3, idle: float = 86400.0) -> None:
    """Every commit builds a new image, and each unpacked tree is 400 MB: trees beyond the
    `newest` few and unused for `idle` seconds go (never one being unpacked right now)."""
    import fcntl
    import time

    trees = []
    for d in cache_root.glob("rootfs-*"):
        with contextlib.suppress(OSError):
            trees.append(((d / "unpacked.json").stat().st_mtime, d))
    trees.sort(reverse=True)
    for when, d in trees[newest:]:
        if d == keep or time.time() - when < idle:
            continue
        with open(d / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(d, ignore_errors=True)


def _inside(root: Path, rel: str) -> Path:
    if rel.startswith("/") or ".." in rel.split("/"):
        raise ImageError(f"layer entry {rel!r} leaves the rootfs")
    path = root / rel
    parent = os.path.realpath(path.parent)
    if parent != str(root) and not parent.startswith(str(root) + "/"):
        raise ImageError(f"layer entry {rel!r} leaves the rootfs (through a symlink)")
    return path


def _apply_layer(blob: Any, root: Path) -> None:
    """Extract one gzipped layer over `root`, applying `.wh.` whiteouts and opaque dirs."""
    root = Path(os.path.realpath(root))
    with gzip.GzipFile(fileobj=blob) as gz, tarfile.open(fileobj=gz, mode="r|") as layer:
        for m in layer:
            name = m.name.lstrip("./") if m.name.startswith("./") else m.name
            name = name.rstrip("/")
            if not name:
                continue
            head, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                d = _inside(root, head) if head else root
                for child in d.iterdir() if d.is_dir() else []:
                    _remove(child)
                continue
            if base.startswith(".wh."):
                _remove(_inside(root, f"{head}/{base[4:]}" if head else base[4:]))
                continue
            path = _inside(root, name)
            if path.is_symlink() or (path.exists() and not (path.is_dir() and m.isdir())):
                _remove(path)
            m.name = name
            if m.islnk():
                _inside(root, m.linkname)
            layer.extract(m, root, set_attrs=True, numeric_owner=True, filter="fully_trusted")


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


# -- runtimes and cgroups --------------------------------------------------------------------


def cgroup_v1_hierarchies() -> list[Path]:
    """The v1 hierarchies mounted under /sys/fs/cgroup (none on a unified host)."""
    out: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" - ", 1)
            if len(parts) == 2 and parts[1].split()[0] == "cgroup":
                mnt = Path(parts[0].split()[4])
                if mnt.parent == CGROUP_FS:
                    out.append(mnt)
    return sorted(out)


def choose_runtime() -> str:
    """MESH_OCI_RUNTIME if set; else crun on a unified cgroup host, runc on a hybrid one."""
    want = os.environ.get("MESH_OCI_RUNTIME")
    order = [want] if want else (["crun", "runc"] if not cgroup_v1_hierarchies() else ["runc"])
    for rt in order:
        if shutil.which(rt):
            return rt
    hint = "apt-get install -y runc" if "runc" in order else "apt-get install -y crun"
    raise ImageError(f"no OCI runtime ({' or '.join(order)}) on PATH: {hint}")


def remove_v1_cgroups(rel: str) -> None:
    """runc makes the container's cgroup path in every v1 hierarchy too and, when its
    container ends, removes only the leaf: the parents it made go here, deepest first. Only
    `rel`'s own chain is touched, and a cgroup still in use is left alone (rmdir fails)."""
    parts = [p for p in rel.split("/") if p]
    for h in cgroup_v1_hierarchies():
        for n in range(len(parts), 0, -1):
            with contextlib.suppress(OSError):
                (h / "/".join(parts[:n])).rmdir()


# -- bundles ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindMount:
    source: str
    dest: str
    readonly: bool = False
    propagation: str = "rprivate"  # rslave: HostToContainer, rshared: Bidirectional
    recursive: bool = True

    def to_oci(self) -> dict[str, Any]:
        opts = [
            "rbind" if self.recursive else "bind",
            "ro" if self.readonly else "rw",
            self.propagation,
            "nosuid",
        ]
        return {"destination": self.dest, "type": "bind", "source": self.source, "options": opts}


def ztunnel_mounts(state_dir: Path, *, bpffs: str = "/sys/fs/bpf") -> list[BindMount]:
    """The DaemonSet's host paths, and the lab's state dir (config, CA, enrolment sockets) at
    its own path, where the DaemonSet has /run/ambientmesh."""
    mounts = [
        BindMount(bpffs, bpffs, propagation="rshared"),  # Bidirectional: our pins outlive us
        BindMount(str(CGROUP_FS), str(CGROUP_FS)),
        BindMount("/var/run/netns", "/var/run/netns", propagation="rslave"),  # HostToContainer
        BindMount(str(state_dir), str(state_dir)),
        BindMount("/lib/modules", "/lib/modules", readonly=True),
        BindMount("/usr/src", "/usr/src", readonly=True),
    ]
    if Path("/run/netns").resolve() != Path("/var/run/netns").resolve():
        mounts.append(BindMount("/run/netns", "/run/netns", propagation="rslave"))
    return [m for m in mounts if Path(m.source).exists()]


def _all_caps() -> list[str]:
    names = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = len(names) - 1
    return [f"CAP_{n}" for n in names[: last + 1]]


def _held_caps() -> set[str]:
    """What this process may hand on: a container cannot get capabilities we lack."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return {c for i, c in enumerate(_all_caps()) if mask >> i & 1}
    except OSError:
        pass
    return set(_all_caps())


@dataclass(slots=True)
class Container:
    """One component's bundle: `argv()` runs it in the foreground (the runtime forwards
    signals to it and removes it when it exits), `delete()` cleans up after a hard kill."""

    name: str
    image: UnpackedImage
    args: Sequence[str]
    bundle: Path
    netns: str | None = None  # a netns path to join; None: the caller's
    privileged: bool = False
    user: int = NONROOT
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[BindMount] = ()
    cgroup: str | None = None  # path under the cgroup root (runc: created in every hierarchy)
    runtime: str = field(default_factory=choose_runtime)

    def config(self) -> dict[str, Any]:
        env = [e for e in self.image.env if e.split("=", 1)[0] not in self.env]
        env += [f"{k}={v}" for k, v in self.env.items()]
        caps = sorted(_held_caps()) if self.privileged else []
        namespaces: list[dict[str, str]] = [{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        if not self.privileged:
            namespaces.append({"type": "pid"})  # ztunnel has hostPID; the others their own
        if self.netns:
            namespaces.append({"type": "network", "path": self.netns})
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {  # the image's /run (a read-only root has none writable; ztunnel locks there)
                "destination": "/run",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=755"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
        ]
        if self.privileged:
            # privileged: the host's /sys read-write (Kubernetes mounts sysfs rw for it)
            mounts.append(
                {
                    "destination": "/sys",
                    "type": "bind",
                    "source": "/sys",
                    "options": ["rbind", "rw", "rslave"],
                }
            )
        else:
            mounts.append(
                {
                    "destination": "/sys",
                    "type": "sysfs",
                    "source": "sysfs",
                    "options": ["nosuid", "noexec", "nodev", "ro"],
                }
            )
        mounts += [m.to_oci() for m in self.mounts]
        linux: dict[str, Any] = {"namespaces": namespaces}
        if self.cgroup:
            linux["cgroupsPath"] = self.cgroup
        if not self.privileged:
            linux["maskedPaths"] = [
                "/proc/kcore",
                "/proc/keys",
                "/proc/timer_list",
                "/sys/firmware",
                "/proc/scsi",
            ]
            linux["readonlyPaths"] = [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
        else:
            linux["devices"] = []
            linux["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": self.user, "gid": self.user},
                "args": list(self.args),
                "env": env,
                "cwd": "/",
                "capabilities": {
                    k: caps for k in ("bounding", "effective", "permitted", "inheritable")
                },
                "noNewPrivileges": not self.privileged,
            },
            "root": {"path": str(self.image.rootfs), "readonly": True},
            "hostname": self.name,
            "mounts": mounts,
            "linux": linux,
        }

    def write(self) -> Path:
        self.bundle.mkdir(parents=True, exist_ok=True)
        path = self.bundle / "config.json"
        path.write_text(json.dumps(self.config(), indent=1))
        return path

    def argv(self) -> list[str]:
        self.write()
        return [self.runtime, "run", "--bundle", str(self.bundle), self.name]

    def delete(self) -> None:
        """Remove the container if a hard kill left it behind (a no-op otherwise), and the
        v1 cgroup directories runc made for it."""
        subprocess.run([self.runtime, "delete", "--force", self.name], capture_output=True)
        if self.cgroup:
            remove_v1_cgroups(self.cgroup)


def container_names(prefix: str) -> Iterator[str]:
    """Containers of `prefix` the runtimes still know (left by a hard kill)."""
    for rt in ("runc", "crun"):
        if shutil.which(rt) is None:
            continue
        res = subprocess.run([rt, "list", "-q"], capture_output=True, text=True)
        for line in res.stdout.split():
            if line.startswith(prefix):
                yield line


# -- the lab's components --------------------------------------------------------------------


def image_command(argv: Sequence[str]) -> list[str]:
    """A command line the lab runs on the host, as the image runs it: this interpreter (or a
    manifest's `python`) is the image's `python3`, `python -m ztunnel.main` its `ztunnel`."""
    import re
    import sys

    out = list(argv)
    if out and (re.fullmatch(r"python(3(\.\d+)?)?", Path(out[0]).name) or out[0] == sys.executable):
        out[0] = "python3"
        if out[1:3] == ["-m", "ztunnel.main"]:
            out = ["ztunnel", *out[3:]]
    return out


def cgroup_rel(path: Path) -> str:
    """A cgroup directory as a runtime's cgroupsPath (relative to the hierarchy's root)."""
    from bpf.mounts import default_cgroup_root

    return "/" + str(path.relative_to(default_cgroup_root())).strip("/")


def lab_ztunnel(
    img: UnpackedImage, name: str, argv: Sequence[str], *, bundle: Path, node_netns: str,
    cgroup: Path, state_dir: Path, env: Mapping[str, str],
) -> Container:  # fmt: skip
    """A node's ztunnel as its DaemonSet runs it: root, privileged, the node's network and
    pids, the DaemonSet's host paths. Its processes go in a child of the cgroup the lab made
    for it, and its node programs are attached to that one (`--bpf-cgroup`, they apply to the
    child too): the runtime removes the container's own cgroup when it ends, and a program
    attached to a removed cgroup lingers until its last socket is gone, where the lab's down
    could no longer detach it."""
    args = image_command(argv)
    if "--redirect" in args and "--bpf-cgroup" not in args:
        args += ["--bpf-cgroup", str(cgroup)]
    return Container(
        name, img, args, bundle, netns=f"/var/run/netns/{node_netns}",
        privileged=True, user=0, env=env, mounts=ztunnel_mounts(state_dir),
        cgroup=cgroup_rel(cgroup / CHILD_CGROUP),
    )  # fmt: skip


def lab_waypoint(
    img: UnpackedImage, name: str, argv: Sequence[str], *, bundle: Path, pod_netns: str,
    cgroup: Path, state_dir: Path, env: Mapping[str, str],
) -> Container:  # fmt: skip
    """A namespace's waypoint as its Deployment runs it: no capabilities, no new privileges, a
    read-only root, its pod's network and cgroup. One difference: on Kubernetes it gets its
    certificate from the CA service with its token (as uid 1337); in the lab it signs its own
    with the lab CA's key (root's, 0600), so it runs as uid 0, still without any capability."""
    return Container(
        name, img, image_command(argv), bundle, netns=f"/var/run/netns/{pod_netns}",
        privileged=False, user=0, env=env,
        mounts=[BindMount(str(state_dir), str(state_dir))],
        cgroup=cgroup_rel(cgroup / CHILD_CGROUP),  # the pod's cgroup outlives the container
    )  # fmt: skip


# -- the lab's record of them ----------------------------------------------------------------


def lab_image_info(archive: Path, cache_root: Path) -> dict[str, Any]:
    """Unpack `archive` (shared cache) and say what the lab's state file keeps of it, so every
    later command of the lab (waypoint apply, restart-ztunnel) runs the same image."""
    img = unpack_cached(archive, cache_root)
    return {
        "archive": str(archive.resolve()), "rootfs": str(img.rootfs), "digest": img.digest,
        "refs": list(img.refs), "env": img.env, "runtime": choose_runtime(), "containers": {},
    }  # fmt: skip


def lab_image(info: Mapping[str, Any]) -> UnpackedImage | None:
    """The image a lab runs its components from (None: this tree's code, on the host)."""
    img = info.get("image")
    if not isinstance(img, Mapping):
        return None
    return UnpackedImage(Path(img["rootfs"]), str(img["digest"]), tuple(img.get("refs", ())),
                         {"Env": list(img.get("env", []))})  # fmt: skip


def record(info: dict[str, Any], c: Container) -> None:
    """Note a container before it exists, so `down` after a crash still removes it."""
    info["image"]["containers"][c.name] = {"runtime": c.runtime, "cgroup": c.cgroup}


def remove_all(info: Mapping[str, Any], prefix: str) -> None:
    """Every container the lab recorded or that carries its name prefix: deleted from its
    runtime (a no-op for one that ended by itself), its v1 cgroup directories removed."""
    img = info.get("image")
    recorded: dict[str, Any] = dict(img.get("containers", {})) if isinstance(img, Mapping) else {}
    for name in container_names(prefix):
        recorded.setdefault(name, {"runtime": None, "cgroup": None})
    for name, rec in recorded.items():
        for rt in [rec.get("runtime")] if rec.get("runtime") else ["runc", "crun"]:
            if shutil.which(rt):
                subprocess.run([rt, "delete", "--force", name], capture_output=True)
        if rec.get("cgroup"):
            remove_v1_cgroups(str(rec["cgroup"]))
