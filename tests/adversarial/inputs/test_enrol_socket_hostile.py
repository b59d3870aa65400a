"""ztunnel's enrolment socket under malformed and hostile clients, against a real ztunnel
process: each refusal is answered (or the connection closed), a good request works right
after, and ztunnel's fds return to their baseline."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import pytest
from inputkit import Ztunnel, eventually, ztunnel

from ztunnel.enrol import MAX_CLIENTS, MAX_LINE


@pytest.fixture(scope="module")
def zt(tmp_path_factory: pytest.TempPathFactory) -> object:
    with ztunnel(tmp_path_factory.mktemp("enrol")) as z:
        z.good()
        yield z


def _settled(z: Ztunnel, base: int) -> None:
    z.good()
    assert eventually(lambda: z.fds() <= base), f"fds {z.fds()} > baseline {base}"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"\x00\xff garbage \x01\n", "not JSON"),
        (b"GET / HTTP/1.1\r\n", "not JSON"),
        (b"[" * 60000 + b"\n", "nested too deeply"),  # once: RecursionError, no answer
        (b'["op", "list"]\n', "must be a JSON object"),
        (b'{"op": "reboot"}\n', "expected add, del or list"),
        (b'{"op": "add", "namespace": 7, "name": "web", "netns": "/x"}\n', "'namespace'"),
        (b'{"op": "add", "namespace": "shop", "name": "", "netns": "/x"}\n', "'name'"),
        (b'{"op": "add", "namespace": "shop", "name": "web"}\n', "'netns'"),
        (b'{"op": "add", "namespace": "shop", "name": "web", "netns": "/x", "cgroup": 1}\n',
         "'cgroup'"),
        (b'{"op": "add", "namespace": "shop", "name": "web", "netns": "/nonexistent"}\n',
         "No such file"),
        (b'{"op": "del", "namespace": ["shop"], "name": "web"}\n', "'namespace'"),
        (b'{"op": "add", "namespace": "shop", "name": "web", "netns": "/x"' + b" " * 100, None),
    ],
    ids=["binary", "http", "deep", "array", "op", "ns-type", "name-empty", "no-netns",
         "cgroup-type", "netns-missing", "del-type", "truncated"],
)  # fmt: skip
def test_malformed_line_is_refused(zt: Ztunnel, line: bytes, error: str | None) -> None:
    base = zt.fds()
    reply = zt.ask(line if error else line + b"\n")
    if error is None:  # truncated JSON, then newline: not JSON
        error = "not JSON"
    assert reply is not None and reply["ok"] is False, reply
    assert error in reply["error"], reply
    _settled(zt, base)


def test_truncated_line_then_eof(zt: Ztunnel) -> None:
    base = zt.fds()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(zt.enrol))
        s.sendall(b'{"op": "li')
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(65536)
    assert b'"ok":false' in reply, reply
    _settled(zt, base)


def test_huge_line_is_refused_and_closed(zt: Ztunnel) -> None:
    base = zt.fds()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(zt.enrol))
        # ztunnel may close on us mid-send: that is the refusal too
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (MAX_LINE * 16))  # 1 MiB, no newline
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data == b"" or json.loads(data.splitlines()[0])["ok"] is False
    _settled(zt, base)


def test_many_concurrent_clients_all_answered(zt: Ztunnel) -> None:
    base = zt.fds()
    replies: list[dict[str, object] | None] = []
    lock = threading.Lock()

    def one() -> None:
        r = zt.ask(b'{"op": "list"}\n{"op": "bogus"}\n')
        with lock:
            replies.append(r)

    threads = [threading.Thread(target=one) for _ in range(MAX_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == MAX_CLIENTS
    assert all(r is not None and r["ok"] is True for r in replies), replies[:3]
    _settled(zt, base)


def test_silent_clients_are_capped_and_do_not_block_others(zt: Ztunnel) -> None:
    """Clients that connect and never send hold a slot each (READ_TIMEOUT); past MAX_CLIENTS a
    new client is told "busy" at once instead of ztunnel holding an fd for every one."""
    base = zt.fds()
    silent = []
    try:
        for _ in range(MAX_CLIENTS - 1):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(zt.enrol))
            silent.append(s)
        zt.good()  # the last free slot still serves
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(zt.enrol))
        silent.append(s)
        assert eventually(lambda: zt.fds() >= base + MAX_CLIENTS)
        for _ in range(50):  # all refused, none held
            reply = zt.ask(b'{"op": "list"}\n')
            assert reply is not None and reply.get("busy") is True, reply
        assert zt.fds() <= base + MAX_CLIENTS + 2
    finally:
        for s in silent:
            s.close()
    _settled(zt, base)


def test_socket_is_root_only(zt: Ztunnel) -> None:
    assert Path(zt.enrol).stat().st_mode & 0o777 == 0o600
