"""A gRPC client for the lab: `python -m mesh.apps.grpc_client HOST:PORT [--method /S/M]
[--count N]`.

Runs inside a pod like `mesh.apps.client`, and prints the same one JSON line per call (`ok`,
the answer's JSON as `body`, or the error with its gRPC status), so the demo reads a gRPC
split exactly as it reads an HTTP one. All calls share one channel (one HTTP/2 connection), as
a real gRPC client's would: a split between backends is then the waypoint's, per call, not
the client's choice of connection. Exit status 0 only when every call succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpc_client", description="gRPC client for the lab")
    p.add_argument("target", help="HOST:PORT")
    p.add_argument("--method", default="/ambientmesh.demo.Echo/Who", help="/<service>/<method>")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    host, sep, port = args.target.rpartition(":")
    if not sep or not host or not port.isdigit():
        p.error(f"{args.target!r}: expected HOST:PORT")
    if not args.method.startswith("/") or args.method.count("/") != 2:
        p.error(f"--method {args.method!r}: expected /<service>/<method>")
    try:
        import grpc
    except ImportError:
        print("grpc_client: needs grpcio (pip install grpcio)", file=sys.stderr)
        return 2
    # Straight to the address: a proxy from the environment would take the call elsewhere.
    channel = grpc.insecure_channel(args.target, options=[("grpc.enable_http_proxy", 0)])
    call = channel.unary_unary(args.method)
    failures = 0
    try:
        for i in range(args.count):
            started = time.monotonic()
            out: dict[str, Any]
            try:
                raw = call(b"", timeout=args.timeout)
                out = {"ok": True, "status": 0}
                try:
                    out["body"] = json.loads(raw)
                except ValueError:
                    out["body"] = bytes(raw).decode("latin-1")[:200]
            except grpc.RpcError as exc:
                failures += 1
                out = {"ok": False, "error": f"{exc.code().name}: {exc.details()}"}
            out["ms"] = round((time.monotonic() - started) * 1000, 2)
            out["attempt"] = i
            print(json.dumps(out), flush=True)
    finally:
        channel.close()
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
