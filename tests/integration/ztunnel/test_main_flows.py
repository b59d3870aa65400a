"""The ztunnel process's flow flags: /flows on the admin port, a read-only --flows-addr
listener, and --flow-buffer-size 0 turning recording off."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.ztunnel.test_main import CONFIG, ENV, start
from tests.meshkit import free_port


def ports_of(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    return dict(kv.split("=") for kv in proc.stdout.readline().split()[1:])


def status(port: int | str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flows_on_admin_and_a_read_only_flows_port(tmp_path: Path) -> None:
    fport = free_port()
    proc = start(tmp_path, CONFIG, "--flows-addr", f"127.0.0.1:{fport}")
    try:
        ports = ports_of(proc)
        assert status(ports["admin"], "/flows") == 200
        assert status(ports["admin"], "/flows?verdict=nope") == 400
        assert status(fport, "/flows?last=5") == 200
        assert status(fport, "/config_dump") == 404  # only the stream, nothing else
        assert status(fport, "/logging?level=debug") == 404
        # a follower still connected does not hold up shutdown
        follower = socket.create_connection(("127.0.0.1", int(ports["admin"])), timeout=10)
        follower.sendall(b"GET /flows?follow=1 HTTP/1.1\r\nhost: x\r\n\r\n")
        assert follower.recv(100).startswith(b"HTTP/1.1 200")
        proc.terminate()
        assert proc.wait(15) == 0
        follower.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_buffer_size_zero_is_off_and_bad_sizes_are_refused(tmp_path: Path) -> None:
    proc = start(tmp_path, CONFIG, "--flow-buffer-size", "0")
    try:
        assert status(ports_of(proc)["admin"], "/flows") == 404
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.parametrize("size", ["-1", "99999999", "x"])
def test_bad_buffer_size(size: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ztunnel.main", "--node", "n1", "--ca-dir", "/nonexistent",
         "--config", "/nonexistent", "--flow-buffer-size", size],
        capture_output=True, text=True, timeout=60, env=ENV,
    )  # fmt: skip
    assert res.returncode == 2 and "--flow-buffer-size" in res.stderr
