"""`python -m benchmarks.prober HOST PORT [--captured-only]`: the pod-ready span's end mark.

Started inside a pod (its netns and cgroup) *before* the span begins, so its interpreter start is
not in the span. It prints `ready`, waits for a line on stdin (the harness writes it at the
span's start), then sends `GET /` over a fresh connection every couple of milliseconds until one
is answered 200 through the mesh, and prints that moment on CLOCK_MONOTONIC, which is
system-wide, so the harness can subtract its own start mark from it.

It has to be a process of the pod: ambient capture is per cgroup, so a socket opened by the
harness would never be captured. `--captured-only` (ambient) counts an answer only when the
connection was redirected to ztunnel's in-pod listener (its local address is then loopback),
because before enrolment the same request reaches the server directly and is answered too.
A sidecar needs no such test: the server's sidecar takes only mTLS, so a plain answer cannot
come any other way than through the client's Envoy.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence

INTERVAL_S = 0.002


def attempt(host: str, port: int, *, captured_only: bool, timeout: float) -> bool:
    """One request on a new connection; True when answered 200 (through the mesh)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if captured_only and not s.getsockname()[0].startswith("127."):
                return False
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                head += chunk
            return head.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prober")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--captured-only", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    a = p.parse_args(argv)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1  # the harness went away before the span began
    go = time.monotonic_ns()
    deadline = go + int(a.timeout * 1e9)
    attempts = 0
    while time.monotonic_ns() < deadline:
        attempts += 1
        if attempt(a.host, a.port, captured_only=a.captured_only, timeout=1.0):
            done = time.monotonic_ns()
            print(json.dumps({"ok": True, "go_ns": go, "answered_ns": done,
                              "attempts": attempts}), flush=True)  # fmt: skip
            return 0
        time.sleep(INTERVAL_S)
    print(json.dumps({"ok": False, "go_ns": go, "attempts": attempts}), flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
