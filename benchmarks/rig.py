"""A mesh of real processes for the long-running benchmarks (soak, scale, rotation/restart).

As in `benchmarks.tunnel_bench`, every proxy is its own production process (`python -m
ztunnel`, `python -m waypoint`), inside a network namespace made for the run, where a
netfilter REDIRECT sends connections for the service VIPs to node n1's outbound :15001 as a
node without BPF capture would:

    benchmark → VIP:80 ─REDIRECT→ ztunnel n1 :15001 ─HBONE→ ztunnel n2 127.0.0.2:15008 → echo
                              (WP_VIP) └─HBONE→ waypoint 127.0.0.9:15008 ─HBONE→ n2 → echo

`L4_VIP` is a plain service; `WP_VIP` is the same pods behind a service that uses the
namespace's waypoint. The echo app (`mesh.apps.echo`) speaks HTTP/1.1 (both paths) or raw
TCP (`echo_mode="tcp"`, L4 only).

A benchmark module calls `outer(module, argv)` from its `main` when run as root outside the
namespace; that re-runs the module inside the namespace with `--role inside`, and deletes the
namespace (and with it every rule and address) afterwards, whatever happened.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from mesh.ports import HBONE_PORT, OUTBOUND_PORT

ROOT = Path(__file__).resolve().parents[1]
N1_IP, N2_IP, ECHO_IP, WP_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.9"
ECHO_PORT = 8080
L4_VIP, WP_VIP = "10.96.0.10", "10.96.0.11"


def manifest(*, waypoint: bool) -> str:
    amb = "{istio.io/dataplane-mode: ambient}"
    docs = [
        f"kind: Node\napiVersion: v1\nmetadata: {{name: n1}}\n"
        f"status: {{addresses: [{{type: InternalIP, address: {N1_IP}}}]}}",
        f"kind: Node\napiVersion: v1\nmetadata: {{name: n2}}\n"
        f"status: {{addresses: [{{type: InternalIP, address: {N2_IP}}}]}}",
        f"kind: Namespace\napiVersion: v1\nmetadata: {{name: bench, labels: {amb}}}",
        "kind: Pod\napiVersion: v1\nmetadata: {name: client, namespace: bench}\n"
        f"spec: {{nodeName: n1, serviceAccountName: client}}\nstatus: {{podIP: {N1_IP}}}",
        "kind: Pod\napiVersion: v1\n"
        "metadata: {name: echo, namespace: bench, labels: {app: echo}}\n"
        f"spec: {{nodeName: n2, serviceAccountName: echo}}\nstatus: {{podIP: {ECHO_IP}}}",
        "kind: Service\napiVersion: v1\nmetadata: {name: echo, namespace: bench}\n"
        f"spec: {{clusterIP: {L4_VIP}, selector: {{app: echo}}, "
        f"ports: [{{port: 80, targetPort: {ECHO_PORT}}}]}}",
    ]
    if waypoint:
        docs += [
            "kind: Gateway\napiVersion: gateway.networking.k8s.io/v1\n"
            "metadata: {name: waypoint, namespace: bench}\n"
            "spec: {gatewayClassName: waypoint, "
            f"listeners: [{{name: mesh, port: {HBONE_PORT}, protocol: HBONE}}]}}",
            "kind: Pod\napiVersion: v1\nmetadata: {name: waypoint, namespace: bench, labels: "
            "{gateway.networking.k8s.io/gateway-name: waypoint, "
            "istio.io/dataplane-mode: none}}\n"
            f"spec: {{nodeName: n1, serviceAccountName: waypoint}}\nstatus: {{podIP: {WP_IP}}}",
            "kind: Service\napiVersion: v1\nmetadata: {name: echo-wp, namespace: bench, "
            "labels: {istio.io/use-waypoint: waypoint}}\n"
            f"spec: {{clusterIP: {WP_VIP}, selector: {{app: echo}}, "
            f"ports: [{{port: 80, targetPort: {ECHO_PORT}, appProtocol: http}}]}}",
        ]
    return "\n---\n".join(docs) + "\n"


def raise_nofile(want: int) -> int:
    """Raise this process's fd limit (children inherit it); the limit actually set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return max(soft, want)


# -- /proc figures ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    cmd: list[str]
    popen: subprocess.Popen[str] | None = None
    ready: str = ""  # the first line the process printed (ztunnel: its ports)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


def wait_port(host: str, port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@dataclass
class Rig:
    """The processes, started in order by `__enter__` and stopped (by PID) by `__exit__`."""

    waypoint: bool = True
    echo_mode: str = "http"
    cert_ttl: float | None = None
    log_level: str = "warning"
    procs: dict[str, Proc] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Rig:
        self._tmp = tempfile.TemporaryDirectory(prefix="rig-")
        tmp = Path(self._tmp.name)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "meshctl.cli", "ca", "init", str(tmp / "ca")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        cfg = tmp / "mesh.yaml"
        cfg.write_text(manifest(waypoint=self.waypoint))
        ttl = ["--cert-ttl", str(self.cert_ttl)] if self.cert_ttl else []
        common = ["--config", str(cfg), "--ca-dir", str(tmp / "ca")]

        def zt(node: str, ip: str, extra: list[str]) -> list[str]:
            return [
                "-m", "ztunnel", "--node", node, *common, *ttl,
                "--hbone-addr", f"{ip}:{HBONE_PORT}", "--admin-addr", f"{ip}:0",
                "--metrics-addr", f"{ip}:0", "--readiness-addr", f"{ip}:0",
                "--redirect", "none", "--ktls", "off", "--log-level", self.log_level, *extra,
            ]  # fmt: skip

        self.procs["echo"] = Proc(
            "echo",
            ["-m", "mesh.apps.echo", "--host", ECHO_IP, "--port", str(ECHO_PORT),
             "--mode", self.echo_mode],
        )  # fmt: skip
        self.procs["ztunnel-n2"] = Proc("ztunnel-n2", zt("n2", N2_IP, []))
        if self.waypoint:
            self.procs["waypoint"] = Proc(
                "waypoint",
                ["-m", "waypoint", "--namespace", "bench", "--name", "waypoint", *common, *ttl,
                 "--hbone-addr", f"{WP_IP}:{HBONE_PORT}", "--metrics-addr", f"{WP_IP}:0",
                 "--readiness-addr", f"{WP_IP}:0", "--log-level", self.log_level],
            )  # fmt: skip
        self.procs["ztunnel-n1"] = Proc(
            "ztunnel-n1", zt("n1", N1_IP, ["--outbound-addr", f"{N1_IP}:{OUTBOUND_PORT}"])
        )
        try:
            for p in self.procs.values():
                self.start(p.name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self, name: str) -> None:
        """Start one process and wait until it serves. The proxies say so on stdout (their
        first line); nothing connects to ztunnel's outbound port to find out, because a
        connection straight to 127.0.0.1:15001 has no redirected destination but the listener
        itself (the self-loop of issue 12)."""
        p = self.procs[name]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = Path(self._tmp.name if self._tmp else "/tmp") / f"{name}.log"
        with log.open("a") as err:
            p.popen = subprocess.Popen(
                [sys.executable, *p.cmd], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=err, text=True,
            )  # fmt: skip
        assert p.popen.stdout is not None
        if name == "echo":
            try:
                wait_port(ECHO_IP, ECHO_PORT)
            except OSError:
                raise SystemExit(f"echo did not start: {log.read_text()[-2000:]}") from None
        else:
            p.ready = p.popen.stdout.readline()
            if not p.ready:
                p.popen.wait(10)
                raise SystemExit(f"{name} did not start: {log.read_text()[-2000:]}")

    def admin(self, name: str, path: str) -> bytes:
        """GET from a ztunnel's admin port (named on its ready line)."""
        ports = dict(kv.split("=", 1) for kv in self.procs[name].ready.split()[1:] if "=" in kv)
        ip = N1_IP if name.endswith("n1") else N2_IP
        url = f"http://{ip}:{ports['admin']}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: bytes = resp.read()
        return body

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs[name]
        if p.popen is None or p.popen.poll() is not None:
            return
        p.popen.send_signal(sig)
        try:
            p.popen.wait(15)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(5)

    def proxies(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n != "echo"]

    def log(self, name: str) -> str:
        assert self._tmp is not None
        return (Path(self._tmp.name) / f"{name}.log").read_text(errors="replace")

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# -- the namespace ----------------------------------------------------------------------------


def outer(module: str, argv: list[str]) -> int:
    """Run `python -m module --role inside argv` in a network namespace made for the run."""
    if os.geteuid() != 0:
        print(f"{module}: needs root (a network namespace and a netfilter REDIRECT)",
              file=sys.stderr)  # fmt: skip
        return 2
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            print(f"{module}: `{tool}` not found", file=sys.stderr)
            return 2
    ns = f"am-{secrets.token_hex(2)}-rig"

    def run(*cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)

    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        run("ip", "link", "set", "lo", "up")
        run("ip", "route", "add", "10.96.0.0/16", "dev", "lo", "src", N1_IP)
        for vip in (L4_VIP, WP_VIP):
            run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", vip,
                "--dport", "80", "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT))  # fmt: skip
        inner = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", module, "--role", "inside", *argv],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, check=False,
        )  # fmt: skip
        return inner.returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def commit() -> str:
    """The commit measured (and whether the tree had local changes)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")
