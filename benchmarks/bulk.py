"""One bulk stream: `python -m benchmarks.bulk URL --mib N` uploads N MiB in one HTTP/1.1 POST.

An HTTP upload rather than raw TCP, so the same stream crosses every architecture unchanged:
sidecar Envoys only forward HTTP on the captured ports, ztunnel carries any bytes, a waypoint
parses HTTP. The echo app counts the body and answers with `body_bytes`; a stream whose count
is short is reported as an error, never as a throughput. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

CHUNK = 1 << 20


def upload(host: str, port: int, path: str, nbytes: int, timeout: float) -> dict[str, object]:
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {nbytes}\r\n"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        ).encode()
        block = memoryview(b"\0" * CHUNK)
        t0 = time.perf_counter()
        s.sendall(head)
        left = nbytes
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(block[:n])
            left -= n
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
        secs = time.perf_counter() - t0
    finally:
        s.close()
    raw = b"".join(chunks)
    head_text, _, body = raw.partition(b"\r\n\r\n")
    status = head_text.split(b" ", 2)[1:2]
    got = -1
    with contextlib.suppress(ValueError, AttributeError):
        got = int(json.loads(body).get("body_bytes", -1))
    ok = status == [b"200"] and got == nbytes
    return {
        "bytes": nbytes,
        "seconds": round(secs, 4),
        "mib_per_s": round(nbytes / (1 << 20) / secs, 2) if ok and secs > 0 else None,
        "ok": ok,
        "server_counted": got,
        "status": status[0].decode() if status else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bulk", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("url", help="http://HOST:PORT/PATH of an echo app")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        p.error(f"{args.url!r}: expected http://HOST[:PORT]/PATH")
    if args.mib < 1:
        p.error("--mib must be >= 1")
    try:
        out = upload(u.hostname, u.port or 80, u.path or "/", args.mib << 20, args.timeout)
    except OSError as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
