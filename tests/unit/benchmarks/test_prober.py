"""The pod-ready prober on real loopback sockets: it marks its first 200 answer on the
monotonic clock after the harness says go, and never counts an answer it should not."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import prober

ROOT = Path(__file__).resolve().parents[3]


def serve(status: bytes) -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.recv(4096)
                c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return srv, t


@pytest.fixture
def ok_server() -> Iterator[int]:
    srv, _ = serve(b"200 OK")
    yield srv.getsockname()[1]
    srv.close()


def test_attempt_counts_only_a_200(ok_server: int) -> None:
    assert prober.attempt("127.0.0.1", ok_server, captured_only=True, timeout=2.0)
    bad, _ = serve(b"503 Service Unavailable")
    try:
        assert not prober.attempt("127.0.0.1", bad.getsockname()[1], captured_only=False,
                                  timeout=2.0)  # fmt: skip
    finally:
        bad.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert not prober.attempt("127.0.0.1", port, captured_only=False, timeout=2.0)


def test_prober_waits_for_go_and_marks_the_answer_on_the_monotonic_clock(ok_server: int) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.prober", "127.0.0.1", str(ok_server), "--timeout", "10"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # nothing is sent before go: the span must not start early
        t0 = time.monotonic_ns()
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] and res["attempts"] >= 1
    assert t0 <= res["go_ns"] <= res["answered_ns"] <= time.monotonic_ns()
