"""The enrolment API: a unix socket speaking JSON lines, for the CNI plugin and the lab.

One request per line, one reply line each, several per connection allowed:

    {"op": "add", "namespace": "shop", "name": "web", "netns": "/var/run/netns/x",
     "cgroup": "/sys/fs/cgroup/.../pod"}          -> {"ok": true, "enrolled": true}
    {"op": "del", "namespace": "shop", "name": "web"} -> {"ok": true, "known": true}
    {"op": "list"}                                   -> {"ok": true, "pods": [...]}
    anything wrong                                   -> {"ok": false, "error": "..."}

`"enrolled": false` on add means the pod is not in the mesh (ztunnel remembers it and enrols it
if a label puts it in later). The socket is created 0600: whoever can talk to it can make
ztunnel open listeners in a namespace and fetch a pod's certificate, so it is root's alone.
A malformed request is answered and never disturbs the node proxy. At most MAX_CLIENTS
connections are served at once (each may sit READ_TIMEOUT without sending): past that a client
is told the API is busy and closed, so idle or hostile clients cannot pin ztunnel's fds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ztunnel.inpod.workloadmanager import EnrolError, WorkloadManager

log = logging.getLogger("ztunnel.enrol")

MAX_LINE = 64 * 1024
READ_TIMEOUT = 60.0
MAX_CLIENTS = 64

__all__ = ["EnrolServer"]


class EnrolServer:
    def __init__(self, path: str | Path, manager: WorkloadManager) -> None:
        self.path = Path(path)
        self.manager = manager
        self._server: asyncio.AbstractServer | None = None
        self.clients = 0
        self.refused = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # a previous ztunnel's; nobody listens there any more
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("enrolment: %d clients connected, refusing more", self.clients)
            busy = {"ok": False, "busy": True, "error": f"busy: {MAX_CLIENTS} clients connected"}
            writer.write(_reply(busy))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self.clients += 1
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_reply({"ok": False, "error": f"line over {MAX_LINE} bytes"}))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                writer.write(_reply(await self.answer(line)))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """One request line to one reply; every failure becomes {"ok": false, "error": ...}."""
        try:
            req = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        except RecursionError:  # 64 KiB of "[" is deeper than the decoder recurses
            return {"ok": False, "error": "request is not JSON: nested too deeply"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        op = req.get("op")
        try:
            if op == "list":
                return {"ok": True, "pods": self.manager.dump()}
            if op not in ("add", "del"):
                return {"ok": False, "error": f"op {op!r}: expected add, del or list"}
            key = f"{_field(req, 'namespace')}/{_field(req, 'name')}"
            if op == "del":
                known = await self.manager.remove(key)
                log.info("enrolment: del %s (%s)", key, "known" if known else "unknown")
                return {"ok": True, "known": known}
            netns = _field(req, "netns")
            cgroup = req.get("cgroup")
            if cgroup is not None and not isinstance(cgroup, str):
                raise EnrolError("field 'cgroup' must be a string or null")
            enrolled = await self.manager.add(key, netns, cgroup or None)
            log.info("enrolment: add %s -> %s", key, "enrolled" if enrolled else "not ambient")
            return {"ok": True, "enrolled": enrolled}
        except EnrolError as exc:
            log.warning("enrolment %s refused: %s", op, exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the API (or ztunnel) down
            log.exception("enrolment %s failed", op)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


def _field(req: dict[str, Any], name: str) -> str:
    v = req.get(name)
    if not isinstance(v, str) or not v:
        raise EnrolError(f"field {name!r} is required and must be a non-empty string")
    return v


def _reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
