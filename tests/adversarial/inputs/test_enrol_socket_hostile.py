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

from tests.adversarial.inputs.inputkit import Ztunnel, eventually, ztunnel
from ztunnel.inpod.protocol import MAX_CLIENTS, MAX_LINE


@pytest.fixture(scope="module")
def zt(tmp_path_factory: pytest.TempPathFactory) -> object:
    with ztunnel(tmp_path_factory.mktemp("enrol")) as z:
        z.good()
        yield z


def _not_busy(z: Ztunnel) -> bool:
    reply = z.ask(b'{"op": "list"}\n')
    return reply is not None and reply.get("busy") is not True


def _settled(z: Ztunnel, base: int) -> None:
    # Slots come free once ztunnel has seen the closes; until then a newcomer is told "busy",
    # as designed (on a loaded machine that takes a moment).
    assert eventually(lambda: _not_busy(z)), "still busy after every client closed"
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
    held: list[socket.socket] = []
    try:
        # Connect silent clients until one is told "busy" (a connection of the previous test
        # may still be closing, so the exact count where that happens can be one or two less).
        refused = None
        for _ in range(2 * MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(zt.enrol))
            s.settimeout(0.1)
            try:
                refused = s.recv(4096)
            except TimeoutError:
                held.append(s)  # accepted, and it holds its slot
                continue
            s.close()
            if refused:
                break
        assert refused is not None and json.loads(refused)["busy"] is True, refused
        assert MAX_CLIENTS - 3 <= len(held) <= MAX_CLIENTS + 5, len(held)  # + late refusals
        for _ in range(50):  # while they stay silent, every newcomer is refused, none held
            reply = zt.ask(b'{"op": "list"}\n')
            if reply is None or reply.get("busy") is not True:  # a late close freed a slot
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(zt.enrol))
                held.append(s)
        assert zt.fds() <= base + MAX_CLIENTS + 3
    finally:
        for s in held:
            s.close()
    _settled(zt, base)


def test_socket_is_root_only(zt: Ztunnel) -> None:
    assert Path(zt.enrol).stat().st_mode & 0o777 == 0o600
