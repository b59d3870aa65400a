"""A real ztunnel process with its enrolment socket, and how to read its fds: shared by the
malformed-input tests (enrolment socket, CNI plugin, config reload)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certs.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: plain}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.244.1.6}
"""


@dataclass
class Ztunnel:
    proc: subprocess.Popen[str]
    ports: dict[str, str]
    enrol: Path
    config: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def dump(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.ports['admin']}/config_dump"
        return dict(json.loads(urllib.request.urlopen(url, timeout=10).read()))

    def ask(self, line: bytes, timeout: float = 10) -> dict[str, Any] | None:
        """One request line on a fresh connection; the reply, or None if closed without one."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.enrol))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(line)  # a refusal may come (and the socket close) before we send
            buf = b""
            while not buf.endswith(b"\n"):
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                buf += chunk
        return dict(json.loads(buf.split(b"\n")[0])) if buf.strip() else None

    def good(self) -> None:
        """The good request after each refusal: `list` answers, and ztunnel still runs."""
        reply = self.ask(b'{"op": "list"}\n')
        assert reply is not None and reply["ok"] is True, reply
        assert self.proc.poll() is None


def eventually(cond: Callable[[], bool], timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@contextmanager
def ztunnel(tmp_path: Path, config: str = CONFIG) -> Iterator[Ztunnel]:
    CertificateAuthority.init(tmp_path / "ca")
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(config)
    enrol = tmp_path / "enrol.sock"
    log = tmp_path / "ztunnel.log"
    errf = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztunnel.main", "--node", "n1", "--config", str(cfg),
         "--ca-dir", str(tmp_path / "ca"), "--enrol-socket", str(enrol), "--redirect", "none",
         "--hbone-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"],
        env=ENV, stdout=subprocess.PIPE, stderr=errf, text=True,
    )  # fmt: skip
    errf.close()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"ztunnel exited: {log.read_text()[-2000:]}")
        ports = dict(kv.split("=") for kv in line.split()[1:])
        assert eventually(enrol.exists)
        yield Ztunnel(proc, ports, enrol, cfg, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
