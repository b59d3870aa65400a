"""Thin wrappers over the kernel objects the lab makes: netns, links, cgroups, processes.

Everything here raises `LabError` with the command and the kernel's own message, because the
operator's fix depends on which of the many steps failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meshctl.lab.names import NETNS_DIR, netns_path

CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A lab step failed; the message says which step and why."""


def run(cmd: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
    res = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def in_netns(ns: str, *cmd: str) -> list[str]:
    """A command line that runs `cmd` in netns `ns` without a private mount namespace."""
    return ["nsenter", f"--net={netns_path(ns)}", *cmd]


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    if not netns_exists(name):
        run(["ip", "netns", "add", name])
    run(in_netns(name, "ip", "link", "set", "lo", "up"))


def netns_del(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)
    if netns_exists(name):  # a stale mount point with no namespace behind it
        with contextlib.suppress(OSError):
            os.unlink(NETNS_DIR / name)


def netns_list(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sysctl(ns: str, key: str, value: str) -> None:
    run(in_netns(ns, "sysctl", "-qw", f"{key}={value}"))


_libc = ctypes.CDLL(None, use_errno=True)
_netns_lock = threading.Lock()


def socket_in_netns(ns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket living in netns `ns`, made by a short-lived thread (setns is per thread,
    and a socket keeps the namespace it was created in), so the lab can talk to listeners
    inside node and pod namespaces without forking."""
    out: list[socket.socket | BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(netns_path(ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:
            out.append(exc)

    with _netns_lock:
        t = threading.Thread(target=worker, name=f"netns-{ns}")
        t.start()
        t.join()
    r = out[0]
    if isinstance(r, BaseException):
        raise r
    return r


def http_get_in_netns(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> str:
    """GET http://host:port/path from inside netns `ns`; returns the body (raises OSError)."""
    s = socket_in_netns(ns)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    raw = b"".join(chunks).decode("utf-8", "replace")
    head, _, body = raw.partition("\r\n\r\n")
    status = head.split(" ", 2)
    if len(status) < 2 or status[1] != "200":
        raise OSError(f"GET {host}:{port}{path} in {ns}: {head.splitlines()[:1]}")
    return body


# cgroups


def cgroup_make(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for d, _, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids += [int(x) for x in Path(d, "cgroup.procs").read_text().split()]
    return pids


def cgroup_kill_all(path: Path) -> None:
    """Kill every process in the subtree (cgroup.kill where the kernel has it)."""
    if not path.exists():
        return
    kill = path / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    for pid in cgroup_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cgroup_remove_tree(path: Path, timeout: float = 5.0) -> None:
    """rmdir leaves first; a cgroup with processes cannot go, so wait for them to die."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((Path(d) for d, _, _ in os.walk(path)), key=lambda p: -len(p.parts))
        busy = None
        for d in dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                busy = exc
        if not path.exists():
            return
        if time.monotonic() > deadline:
            raise LabError(f"cannot remove cgroup {path}: {busy}")
        cgroup_kill_all(path)
        time.sleep(0.1)


# processes


def proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; fields after ')' are fixed
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_alive(pid: int, start_time: int) -> bool:
    """The process we started under `pid` still runs. A child that exited but was not
    reaped yet (the lab tracks children by PID, not by Popen) is a zombie: dead, and reaped
    here so that its exit is seen at once instead of as a readiness timeout."""
    if proc_start_time(pid) != start_time:
        return False
    if _zombie(pid):
        _reap(pid)
        return False
    return True


def patience(seconds: float) -> float:
    """A lab timeout, stretched by MESH_LAB_TIME_SCALE on a machine that runs everything many
    times slower (the QEMU guest without KVM, where one Python start takes half a minute):
    the same waits and the same honest failures, only later."""
    try:
        scale = float(os.environ.get("MESH_LAB_TIME_SCALE", "1"))
    except ValueError:
        scale = 1.0
    return seconds * max(scale, 1.0)


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last lines of a process's own log, where the real reason (and its fix) is."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    body = "\n".join(f"  | {line}" for line in text) if text else "  | (empty)"
    return f"last lines of {path}:\n{body}"


def wait_ready(
    what: str,
    pid: int,
    start_time: int,
    log: str | Path,
    probe: Callable[[], object],
    timeout: float,
    interval: float = 0.1,
) -> None:
    """Poll `probe` until it stops raising OSError. If the process exits first, or the
    deadline passes, raise LabError with the tail of the process's own log: a bare
    "not ready after 30s" hides the reason, which the process has almost always written."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if not proc_alive(pid, start_time):
            raise LabError(f"{what} exited before it was ready\n{log_tail(log)}")
        try:
            probe()
            return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise LabError(
                f"{what} not ready after {timeout:.0f}s (last probe: {last})\n{log_tail(log)}"
            )
        time.sleep(interval)


def stop_process(pid: int, start_time: int, *, group: bool, timeout: float = 3.0) -> None:
    """TERM (the whole process group for pods), then KILL after `timeout`; only if the PID
    still belongs to the process we started."""
    if not proc_alive(pid, start_time):
        return  # gone (or a zombie, which proc_alive reaped)
    send = os.killpg if group else os.kill
    try:
        send(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(pid, start_time) or _zombie(pid):
            _reap(pid)
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        send(pid, signal.SIGKILL)
    for _ in range(40):
        if not proc_alive(pid, start_time) or _zombie(pid):
            break
        time.sleep(0.05)
    _reap(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
