"""The two kernel filesystems the redirect needs, found where they are or mounted.

A fresh host often lacks one of them: systemd mounts bpffs at /sys/fs/bpf, but minimal images,
VMs and plain containers don't, and cgroup v2 sits at /sys/fs/cgroup on a unified host but at
/sys/fs/cgroup/unified on a hybrid one. Everything that pins or attaches asks here, so the
answer (and the fix when there is none) is the same for ztunnel, the lab, the tests and
`meshctl doctor --fix`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from mesh.process import EnvironmentUnfit

BPFFS_ROOT = "/sys/fs/bpf"
CGROUP_PARENT = "/sys/fs/cgroup"
HYBRID_CGROUP2 = "/sys/fs/cgroup/unified"
# Two ztunnels of one machine (the lab's nodes) start together: without a lock both could see
# no bpffs and mount one each, and the second mount would hide the first one's pins.
_LOCK = "/run/ambientmesh-mounts.lock"


class MountUnavailable(EnvironmentUnfit):
    """A filesystem the redirect needs is missing and could not be mounted; says the fix."""


@dataclass(frozen=True, slots=True)
class Mount:
    point: str
    fstype: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """This mount namespace's mounts, in mount order (a later one hides an earlier one at
    the same point)."""
    table = []
    with open(mountinfo) as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if not sep or len(fields) < 5 or not right.split():
                continue
            table.append(Mount(_unescape(fields[4]), right.split()[0]))
    return table


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def covering(path: str, table: list[Mount] | None = None) -> Mount | None:
    """The mount a path lives on: the deepest mount point above it, the latest of equals."""
    path = os.path.abspath(path)
    best: Mount | None = None
    for m in mounts() if table is None else table:
        if _is_under(path, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


@contextlib.contextmanager
def _mount_lock() -> Iterator[None]:
    fd = os.open(_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mount(fstype: str, where: str) -> None:
    res = subprocess.run(["mount", "-t", fstype, fstype, where], capture_output=True, text=True)
    if res.returncode != 0:
        raise MountUnavailable(
            f"cannot mount {fstype} at {where}: {res.stderr.strip() or res.returncode}; "
            f"fix: as root, mount -t {fstype} {fstype} {where}"
        )


def ensure_bpffs(pin_dir: str) -> list[str]:
    """Make `pin_dir` a directory on a bpf filesystem; return what was done to get there.

    Only /sys/fs/bpf itself is ever mounted (never a sub-directory: the pins of every
    ztunnel and tool of the machine belong in one instance, where `bpftool` and the
    DaemonSet's hostPath find them)."""
    path = os.path.abspath(pin_dir)
    done: list[str] = []
    with _mount_lock():
        m = covering(path)
        if m is None or m.fstype != "bpf":
            if not _is_under(path, BPFFS_ROOT):
                where = f"on {m.fstype} at {m.point}" if m else "on no filesystem"
                raise MountUnavailable(
                    f"pin directory {path} is not on a bpf filesystem ({where}); fix: pin "
                    f"under {BPFFS_ROOT}, or mount -t bpf bpf <dir> above it"
                )
            _mount("bpf", BPFFS_ROOT)
            done.append(f"mounted bpffs at {BPFFS_ROOT}")
    os.makedirs(path, exist_ok=True)
    return done


def cgroup2_root(table: list[Mount] | None = None) -> str | None:
    """Where cgroup v2 is mounted: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified
    on a hybrid one (either is preferred over a mount elsewhere)."""
    points = [m.point for m in (mounts() if table is None else table) if m.fstype == "cgroup2"]
    for want in (CGROUP_PARENT, HYBRID_CGROUP2):
        if want in points:
            return want
    return points[0] if points else None


def ensure_cgroup2() -> tuple[str, list[str]]:
    """cgroup v2's mount point, mounting it where the host's layout says it belongs when no
    cgroup2 is mounted yet (beside v1 controllers on a tmpfs /sys/fs/cgroup, or at
    /sys/fs/cgroup itself when nothing is there)."""
    with _mount_lock():
        root = cgroup2_root()
        if root is not None:
            return root, []
        m = covering(CGROUP_PARENT)
        where = HYBRID_CGROUP2 if m is not None and m.point == CGROUP_PARENT else CGROUP_PARENT
        os.makedirs(where, exist_ok=True)
        _mount("cgroup2", where)
        return where, [f"mounted cgroup2 at {where}"]


def default_cgroup_root() -> str:
    """Where to find cgroup v2 without mounting anything (the hybrid path when none is
    mounted, so that error messages name the conventional place)."""
    return cgroup2_root() or HYBRID_CGROUP2
