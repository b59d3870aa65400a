"""A gRPC server for the lab: `python -m mesh.apps.grpc_echo [--port 9090]`.

The gRPC twin of `mesh.apps.echo`: every method of every service is answered (a generic
handler, raw bytes, no generated code), with a JSON message saying which pod answered, which
method was called and from which address, so a GRPCRoute's weighted split is visible from the
client. Needs grpcio (the lab's interpreter has it: a dev dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any


def _handler(grpc: Any, ident: dict[str, str]) -> Any:
    class AnyMethod(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            method = str(details.method)

            async def unary(request: bytes, context: Any) -> bytes:
                return json.dumps(
                    {**ident, "method": method, "peer": context.peer(), "bytes": len(request)}
                ).encode()

            return grpc.unary_unary_rpc_method_handler(unary)

    return AnyMethod()


async def serve(host: str, port: int) -> None:
    import grpc

    ident = {
        "pod": os.environ.get("POD_NAME", os.uname().nodename),
        "namespace": os.environ.get("POD_NAMESPACE", ""),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(grpc, ident),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"grpc echo listening on {host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpc_echo", description="gRPC echo for the lab")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    args = p.parse_args(argv)
    try:
        import grpc  # noqa: F401
    except ImportError:
        print("grpc_echo: needs grpcio (pip install grpcio)", file=sys.stderr)
        return 2
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
