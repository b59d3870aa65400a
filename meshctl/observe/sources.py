"""Where flows come from: each proxy's `/flows` stream, found three ways.

- a lab: every node's ztunnel and every waypoint, from the lab's own record (admin ports
  listen on loopback inside the node's or the waypoint pod's network namespace, so the socket
  is opened in there);
- Kubernetes: every ztunnel and waypoint pod, reached through the API server's `pods/proxy`
  subresource, as Hubble Relay fans in from every node (the caller needs RBAC `get` on
  `pods/proxy`, which is what keeps flows from everyone else);
- one address (`--address HOST:PORT`), for a proxy run by hand.

A source's bytes are input like any other: a line that is not a flow is skipped and counted,
never fatal; a source that cannot be reached is reported and the others carry on.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.flows import Flow, FlowStreamParams
from mesh.ports import ADMIN_PORT, FLOWS_PORT

__all__ = [
    "AddressSource",
    "KubeSource",
    "LabSource",
    "Source",
    "SourceError",
    "collect",
    "follow",
    "kube_sources",
    "lab_sources",
    "merged",
]

CONNECT_TIMEOUT = 5.0
_LINE_LIMIT = 1 << 20
WAYPOINT_LABEL = "gateway.networking.k8s.io/gateway-name"


class SourceError(Exception):
    """A source that could not be read (unreachable, refused the query, not a flow stream)."""


@dataclass
class Source:
    """One proxy's flow stream. `bad_lines`/`lost` count what it sent that was no flow, and
    the flows it says its ring dropped before we read them."""

    name: str
    bad_lines: int = field(default=0, init=False)
    lost: int = field(default=0, init=False)

    async def lines(self, query: Mapping[str, str]) -> AsyncIterator[bytes]:
        raise NotImplementedError
        yield b""  # pragma: no cover

    async def flows(self, params: FlowStreamParams) -> AsyncIterator[Flow]:
        async for line in self.lines(params.to_query()):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if isinstance(d, dict) and set(d) == {"lost_events"}:
                    n = d["lost_events"]
                    self.lost += n if isinstance(n, int) else 0
                    continue
                f = Flow.from_dict(d)
            except (ValueError, RecursionError):  # RecursionError: hostile nesting
                self.bad_lines += 1
                continue
            yield f


async def _http_ndjson(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, target: str
) -> AsyncIterator[bytes]:
    """GET `target` on an open connection; the body's lines (HTTP/1.1, close-delimited)."""
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nhost: flows\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            body = await asyncio.wait_for(reader.read(4096), CONNECT_TIMEOUT)
            why = body.decode("utf-8", "replace").strip() or status_line
            raise SourceError(f"{name}: {status_line.partition(' ')[2]}: {why}")
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                raise SourceError(f"{name}: a line longer than {_LINE_LIMIT} bytes") from None
            if not line:
                return
            yield line
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
        raise SourceError(f"{name}: not a flow stream ({type(exc).__name__})") from None
    except (ConnectionError, OSError) as exc:
        raise SourceError(f"{name}: {exc}") from None
    finally:
        writer.close()


def _target(query: Mapping[str, str]) -> str:
    return "/flows" + ("?" + urllib.parse.urlencode(query) if query else "")


@dataclass
class AddressSource(Source):
    """A proxy's admin port at HOST:PORT, from here."""

    host: str = "127.0.0.1"
    port: int = ADMIN_PORT

    async def lines(self, query: Mapping[str, str]) -> AsyncIterator[bytes]:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=_LINE_LIMIT), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            where = f"{self.host}:{self.port}"
            raise SourceError(f"{self.name}: cannot connect to {where}: {exc}") from None
        async for line in _http_ndjson(r, w, self.name, _target(query)):
            yield line


@dataclass
class LabSource(Source):
    """A proxy's admin port on loopback inside one of the lab's network namespaces."""

    netns: str = ""
    port: int = ADMIN_PORT

    async def lines(self, query: Mapping[str, str]) -> AsyncIterator[bytes]:
        from meshctl.lab.system import socket_in_netns

        loop = asyncio.get_running_loop()
        try:
            s = await asyncio.to_thread(socket_in_netns, self.netns)
        except OSError as exc:
            raise SourceError(f"{self.name}: netns {self.netns}: {exc}") from None
        try:
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", self.port)), CONNECT_TIMEOUT)
            r, w = await asyncio.open_connection(sock=s, limit=_LINE_LIMIT)
        except (OSError, TimeoutError) as exc:
            s.close()
            where = f"admin port {self.port} in {self.netns}"
            raise SourceError(f"{self.name}: {where}: {exc}") from None
        async for line in _http_ndjson(r, w, self.name, _target(query)):
            yield line


def lab_sources(state_file: Path, manifest_file: Path) -> list[Source]:
    """Every node's ztunnel and every waypoint of the lab whose state is `state_file`."""
    from meshctl.lab.state import LabState

    st = LabState.load(state_file)
    if st is None:
        raise SourceError(f"no lab state at {state_file}: is the lab up?")
    out: list[Source] = [
        LabSource(f"ztunnel-{node}", netns=str(info["netns"]))
        for node, info in sorted(st.nodes.items())
        if info.get("netns")
    ]
    for key in sorted(_waypoint_pods(manifest_file)):
        info = st.pods.get(key)
        if info and info.get("netns"):
            ns, _, name = key.partition("/")
            out.append(LabSource(f"waypoint {ns}/{name}", netns=str(info["netns"])))
    return out


def _waypoint_pods(manifest_file: Path) -> set[str]:
    """`ns/pod` of the lab's waypoint pods: those the manifest labels with a Gateway name."""
    import yaml

    try:
        docs = list(yaml.safe_load_all(manifest_file.read_text()))
    except (OSError, yaml.YAMLError):
        return set()
    out = set()
    for d in docs:
        if not isinstance(d, dict) or d.get("kind") != "Pod":
            continue
        meta = d.get("metadata") or {}
        if WAYPOINT_LABEL in (meta.get("labels") or {}):
            out.add(f"{meta.get('namespace', 'default')}/{meta.get('name')}")
    return out


@dataclass
class KubeSource(Source):
    """A ztunnel or waypoint pod, through the API server's `pods/{name}:{port}/proxy`."""

    api: Any = None  # kubernetes_asyncio ApiClient
    namespace: str = ""
    pod: str = ""
    port: int = ADMIN_PORT

    async def lines(self, query: Mapping[str, str]) -> AsyncIterator[bytes]:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            resp = await self.api.call_api(
                "/api/v1/namespaces/{namespace}/pods/{name}/proxy/flows",
                "GET",
                path_params={"namespace": self.namespace, "name": f"{self.pod}:{self.port}"},
                query_params=list(query.items()),
                header_params={"Accept": "application/x-ndjson"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=None,
            )
        except ApiException as exc:
            why = (
                (exc.body or b"").decode("utf-8", "replace").strip()
                if isinstance(exc.body, bytes)
                else str(exc.body or exc.reason)
            )
            raise SourceError(f"{self.name}: {exc.status} {why}") from None
        except OSError as exc:
            raise SourceError(f"{self.name}: {exc}") from None
        raw = getattr(resp, "response", resp)  # RESTResponse wraps the aiohttp response
        try:
            if raw.status != 200:
                body = await raw.read()
                why = body.decode("utf-8", "replace").strip()
                raise SourceError(f"{self.name}: {raw.status} {why}")
            while True:
                try:
                    line = await raw.content.readline()
                except ValueError:
                    raise SourceError(f"{self.name}: a line too long") from None
                if not line:
                    return
                yield line
        except (ConnectionError, OSError) as exc:
            raise SourceError(f"{self.name}: {exc}") from None
        finally:
            raw.release()


async def kube_sources(api: Any, port: int = FLOWS_PORT) -> list[Source]:
    """Every ztunnel pod (`app.kubernetes.io/name=ztunnel`) and waypoint pod (labelled with
    its Gateway's name) the API server knows, running or about to."""
    from kubernetes_asyncio import client as k8s

    pods = await k8s.CoreV1Api(api).list_pod_for_all_namespaces()
    out: list[Source] = []
    for p in pods.items:
        labels = p.metadata.labels or {}
        phase = p.status.phase if p.status is not None else None
        if phase in ("Succeeded", "Failed"):
            continue
        if labels.get("app.kubernetes.io/name") == "ztunnel":
            node = p.spec.node_name if p.spec is not None else None
            name = f"ztunnel-{node or p.metadata.name}"
        elif WAYPOINT_LABEL in labels:
            name = f"waypoint {p.metadata.namespace}/{p.metadata.name}"
        else:
            continue
        out.append(
            KubeSource(
                name, api=api, namespace=p.metadata.namespace, pod=p.metadata.name, port=port
            )
        )
    return sorted(out, key=lambda s: s.name)


async def _drain(src: Source, params: FlowStreamParams, out: list[Flow]) -> None:
    async for f in src.flows(params):
        out.append(f)


async def collect(
    sources: Sequence[Source], params: FlowStreamParams, *, within: float = 15.0
) -> tuple[list[Flow], list[str]]:
    """The flows every source holds now (not following), and one message per failed source."""
    got: list[Flow] = []
    errors: list[str] = []

    async def one(src: Source) -> None:
        try:
            await asyncio.wait_for(_drain(src, params, got), within)
        except SourceError as exc:
            errors.append(str(exc))
        except TimeoutError:
            errors.append(f"{src.name}: no answer within {within:.0f}s")

    async with asyncio.TaskGroup() as tg:
        for s in sources:
            tg.create_task(one(s))
    return got, errors


async def follow(sources: Sequence[Source], params: FlowStreamParams, emit: Any, warn: Any) -> None:
    """Each source's flows as they come (`emit(flow)`), until interrupted or every source
    has ended; a source failing is `warn(message)`, the others go on."""

    async def one(src: Source) -> None:
        try:
            async for f in src.flows(params):
                emit(f)
        except SourceError as exc:
            warn(str(exc))
        else:
            warn(f"{src.name}: stream ended")

    async with asyncio.TaskGroup() as tg:
        for s in sources:
            tg.create_task(one(s))


async def merged(
    sources: Sequence[Source], params: FlowStreamParams, warn: Any, *, buffer: int = 10_000
) -> AsyncIterator[Flow]:
    """Every source's flows as one stream (the UI's input), as they come. A consumer slower
    than the sources loses the newest flows past `buffer`, with a warning, rather than
    holding any source back."""
    queue: asyncio.Queue[Flow] = asyncio.Queue(buffer)
    dropped = 0

    def emit(f: Flow) -> None:
        nonlocal dropped
        try:
            queue.put_nowait(f)
        except asyncio.QueueFull:
            dropped += 1
            if dropped == 1 or dropped % 1000 == 0:
                warn(f"display behind: {dropped} flow(s) dropped")

    task = asyncio.ensure_future(follow(sources, params, emit, warn))
    try:
        while not (task.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait((getter, task), return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
