"""A tiny HTTP client for the lab: `python -m mesh.apps.client URL [--count N]`.

It runs inside a pod (the lab's `exec`), so its connections take the same path as the pod's
app would: through ztunnel when the pod is enrolled, through the node's service rules when not.
Each attempt prints one JSON line (ok, status, the echo's answer, or the error), so the demo and
the tests can tell "allowed" (an answer) from "denied" (reset/refused/closed) without parsing
free text. Exit status 0 only when every attempt got an HTTP answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a keep-alive connection and its whole answer (tests drive it too)."""
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp, resp.read()


def fetch(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    resp, raw = exchange(conn, "GET", path, headers)
    out: dict[str, Any] = {"ok": True, "status": resp.status}
    try:
        out["body"] = json.loads(raw)
    except ValueError:
        out["body"] = raw.decode("latin-1")[:200]
    out["ms"] = round((time.monotonic() - started) * 1000, 2)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="client", description="HTTP client for the lab")
    p.add_argument("url", help="http://HOST[:PORT]/PATH")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--header", action="append", default=[], help="NAME:VALUE (repeatable)")
    p.add_argument("--new-connection", action="store_true", help="one connection per request")
    args = p.parse_args(argv)
    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        p.error(f"{args.url!r}: expected http://HOST[:PORT]/PATH")
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            p.error(f"--header {h!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    failures = 0
    conn: http.client.HTTPConnection | None = None
    for i in range(args.count):
        if conn is None:
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=args.timeout)
        try:
            out = fetch(conn, path, headers)
        except (OSError, http.client.HTTPException) as exc:
            failures += 1
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.close()
            conn = None
        if conn is not None and args.new_connection:
            conn.close()
            conn = None
        out["attempt"] = i
        print(json.dumps(out, separators=(",", ":")), flush=True)
    if conn is not None:
        conn.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
