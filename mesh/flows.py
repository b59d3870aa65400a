"""Flows: one record per connection (ztunnel) or request (waypoint), kept in a bounded ring.

Like Hubble's flow buffer (`hubble-flow-buffer-size`): each process keeps only its most recent
flows in memory, and readers ask for them over the admin port (`/flows`, NDJSON, optionally
followed). Recording sits on every connection's and request's path, so it is kept cheap: the
ring stores the `Flow` objects the proxies build (slots, flat fields, no nested objects) and
the JSON form (`to_dict`, the shared contract) is only built when a reader asks.

Everything here runs on the process's event loop. Code on another thread (a BPF event
reader) hands its flows over with `loop.call_soon_threadsafe(ring.record, flow)`; a flow that
happened earlier than it is recorded (a kernel drop read from a ring buffer) carries its own
`time`, e.g. `Flow(time=t, verdict="DROPPED", reason="ztunnel unavailable", node=ring.node,
reporter="ztunnel", proxy=ring.proxy, src_ip=..., dst_ip=..., dst_port=...)`. In ztunnel the
ring is `Ztunnel.flows` (also `Node.flows` when recording is on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mesh.httpserver import HttpError

log = logging.getLogger("mesh.flows")

__all__ = [
    "DEFAULT_FLOW_BUFFER_SIZE",
    "PROTOCOLS",
    "REASONS",
    "VERDICTS",
    "FilterError",
    "Flow",
    "FlowFilter",
    "FlowRing",
    "FlowStreamParams",
    "flow_lines",
    "flows_route",
    "format_time",
    "parse_time",
]

DEFAULT_FLOW_BUFFER_SIZE = 4096
VERDICTS = ("FORWARDED", "DENIED", "DROPPED")
PROTOCOLS = ("tcp", "http/1.1", "h2", "grpc")
# DROPPED reasons from the response flags the proxies already use (Istio's names).
REASONS = {
    "NR": "no route",
    "UF": "refused",
    "URX": "refused",
    "UO": "overload",
    "OM": "overload",
    "DT": "handshake timeout",
    "DC": "downstream closed",
    "UT": "upstream timeout",
}


@dataclass(slots=True, kw_only=True)
class Flow:
    """One flow, flat: building it is one allocation on the proxy's hot path.

    `time` is epoch seconds at the end of the flow (or when it was refused). Fields follow the
    shared contract (`to_dict`), with `src_`/`dst_` in place of the nested objects."""

    time: float
    verdict: str = "FORWARDED"
    node: str | None = None
    reporter: str | None = None  # "ztunnel" | "waypoint"
    proxy: str | None = None
    src_namespace: str | None = None
    src_pod: str | None = None
    src_identity: str | None = None
    src_ip: str | None = None
    src_port: int | None = None
    dst_namespace: str | None = None
    dst_pod: str | None = None
    dst_identity: str | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    dst_service: str | None = None  # "name.namespace"
    protocol: str = "tcp"
    method: str | None = None
    authority: str | None = None
    path: str | None = None
    status: int | None = None
    grpc_status: int | None = None
    policy: str | None = None
    reason: str | None = None
    mtls: bool = False
    duration_ms: float | None = None
    latency_ms: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON object (nested source/destination, `l7` null for plain TCP)."""
        l7 = None
        if self.method is not None or self.status is not None or self.path is not None:
            l7 = {
                "method": self.method,
                "authority": self.authority,
                "path": self.path,
                "status": self.status,
                "grpc_status": self.grpc_status,
            }
        return {
            "time": format_time(self.time),
            "node": self.node,
            "reporter": self.reporter,
            "proxy": self.proxy,
            "source": {
                "namespace": self.src_namespace,
                "pod": self.src_pod,
                "identity": self.src_identity,
                "ip": self.src_ip,
                "port": self.src_port,
            },
            "destination": {
                "namespace": self.dst_namespace,
                "pod": self.dst_pod,
                "identity": self.dst_identity,
                "ip": self.dst_ip,
                "port": self.dst_port,
                "service": self.dst_service,
            },
            "protocol": self.protocol,
            "l7": l7,
            "verdict": self.verdict,
            "policy": self.policy,
            "reason": self.reason,
            "mtls": self.mtls,
            "duration_ms": _round(self.duration_ms),
            "latency_ms": _round(self.latency_ms),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Flow:
        """The inverse of `to_dict`, for readers (meshctl). Raises ValueError on a record
        that is not a flow (a peer's bytes are input like any other)."""
        if not isinstance(d, Mapping):
            raise ValueError("a flow is a JSON object")
        src = d.get("source") or {}
        dst = d.get("destination") or {}
        l7 = d.get("l7") or {}
        if (
            not isinstance(src, Mapping)
            or not isinstance(dst, Mapping)
            or not isinstance(l7, Mapping)
        ):
            raise ValueError("source, destination and l7 must be objects")
        t = d.get("time")
        if not isinstance(t, str):
            raise ValueError("time must be an ISO 8601 string")
        verdict = d.get("verdict")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        return cls(
            time=parse_time(t),
            verdict=verdict,
            node=_s(d.get("node")),
            reporter=_s(d.get("reporter")),
            proxy=_s(d.get("proxy")),
            src_namespace=_s(src.get("namespace")),
            src_pod=_s(src.get("pod")),
            src_identity=_s(src.get("identity")),
            src_ip=_s(src.get("ip")),
            src_port=_i(src.get("port")),
            dst_namespace=_s(dst.get("namespace")),
            dst_pod=_s(dst.get("pod")),
            dst_identity=_s(dst.get("identity")),
            dst_ip=_s(dst.get("ip")),
            dst_port=_i(dst.get("port")),
            dst_service=_s(dst.get("service")),
            protocol=_s(d.get("protocol")) or "tcp",
            method=_s(l7.get("method")),
            authority=_s(l7.get("authority")),
            path=_s(l7.get("path")),
            status=_i(l7.get("status")),
            grpc_status=_i(l7.get("grpc_status")),
            policy=_s(d.get("policy")),
            reason=_s(d.get("reason")),
            mtls=bool(d.get("mtls")),
            duration_ms=_f(d.get("duration_ms")),
            latency_ms=_f(d.get("latency_ms")),
            bytes_sent=_i(d.get("bytes_sent")) or 0,
            bytes_received=_i(d.get("bytes_received")) or 0,
        )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _s(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _i(v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {type(v).__name__}")
    return v


def _f(v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    return float(v)


def format_time(t: float) -> str:
    """Epoch seconds as the contract's UTC time with milliseconds."""
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def parse_time(text: str) -> float:
    """ISO 8601 (a `Z` or an offset; naive means UTC) or epoch seconds, to epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time (ISO 8601 or epoch seconds)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# -- filters -------------------------------------------------------------------------------

_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_STATUS = re.compile(r"^([1-5])(?:\+|xx)$|^([1-5][0-9][0-9])$")
_MAX_VALUES = 32


class FilterError(ValueError):
    """A filter parameter that cannot mean anything: the reader gets a 400 naming it."""


def _values(q: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = q.get(key)
    if raw is None:
        return ()
    vals = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not vals:
        raise FilterError(f"{key}: empty")
    if len(vals) > _MAX_VALUES:
        raise FilterError(f"{key}: at most {_MAX_VALUES} values")
    return vals


def _pod_ref(key: str, v: str) -> tuple[str | None, str]:
    ns, sep, name = v.rpartition("/")
    for part in (ns, name) if sep else (name,):
        if not _NAME.match(part):
            raise FilterError(f"{key}: {v!r} is not [namespace/]pod")
    return (ns if sep else None), name


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Server-side (and client-side) flow selection: Hubble's observe filters.

    Within one filter the values are alternatives (OR); different filters must all match
    (AND). Pod names match by prefix (`sleep` matches `sleep-7d9f`), as Hubble's do."""

    namespace: tuple[str, ...] = ()
    pod: tuple[tuple[str | None, str], ...] = ()
    from_pod: tuple[tuple[str | None, str], ...] = ()
    to_pod: tuple[tuple[str | None, str], ...] = ()
    to_service: tuple[str, ...] = ()  # "name.namespace" or "name" (any namespace)
    identity: tuple[str, ...] = ()
    verdict: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    http_status: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    since: float | None = None
    until: float | None = None

    QUERY_KEYS = (
        "namespace", "pod", "from_pod", "to_pod", "to_service", "identity", "verdict",
        "protocol", "http_status", "since", "until",
    )  # fmt: skip

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> FlowFilter:
        ns = _values(q, "namespace")
        for v in ns:
            if not _NAME.match(v):
                raise FilterError(f"namespace: {v!r} is not a namespace name")
        pods = {
            k: tuple(_pod_ref(k, v) for v in _values(q, k)) for k in ("pod", "from_pod", "to_pod")
        }
        services = []
        for v in _values(q, "to_service"):
            ns_, sep, name = v.rpartition("/")
            v = f"{name}.{ns_}" if sep else v
            if not _NAME.match(v):
                raise FilterError(f"to_service: {v!r} is not [namespace/]service or name.namespace")
            services.append(v)
        idents = _values(q, "identity")
        for v in idents:
            if len(v) > 512 or any(c.isspace() for c in v):
                raise FilterError(f"identity: {v!r} is not a SPIFFE ID or namespace/serviceaccount")
        verdicts = tuple(v.upper() for v in _values(q, "verdict"))
        for v in verdicts:
            if v not in VERDICTS:
                raise FilterError(f"verdict: {v!r} is not one of {', '.join(VERDICTS)}")
        protos = tuple(v.lower() for v in _values(q, "protocol"))
        for v in protos:
            if v not in (*PROTOCOLS, "http"):
                raise FilterError(f"protocol: {v!r} is not one of {', '.join(PROTOCOLS)}, http")
        statuses = []
        for v in _values(q, "http_status"):
            m = _STATUS.match(v)
            if m is None:
                raise FilterError(f"http_status: {v!r} is not a status (200), or a class (5+, 5xx)")
            if m.group(1):
                lo = int(m.group(1)) * 100
                statuses.append((lo, lo + 99))
            else:
                statuses.append((int(m.group(2)), int(m.group(2))))
        times: dict[str, float | None] = {}
        for key in ("since", "until"):
            raw = q.get(key)
            try:
                times[key] = parse_time(raw) if raw is not None else None
            except ValueError as exc:
                raise FilterError(f"{key}: {exc}") from None
        return cls(
            namespace=ns, pod=pods["pod"], from_pod=pods["from_pod"], to_pod=pods["to_pod"],
            to_service=tuple(services), identity=idents, verdict=verdicts, protocol=protos,
            http_status=tuple(statuses), since=times["since"], until=times["until"],
        )  # fmt: skip

    def to_query(self) -> dict[str, str]:
        """The query string that `from_query` reads back into this filter."""
        q: dict[str, str] = {}

        def pods(v: tuple[tuple[str | None, str], ...]) -> str:
            return ",".join(f"{ns}/{n}" if ns else n for ns, n in v)

        def status(lo: int, hi: int) -> str:
            return str(lo) if lo == hi else f"{lo // 100}xx"

        for key, val in (
            ("namespace", ",".join(self.namespace)),
            ("pod", pods(self.pod)),
            ("from_pod", pods(self.from_pod)),
            ("to_pod", pods(self.to_pod)),
            ("to_service", ",".join(self.to_service)),
            ("identity", ",".join(self.identity)),
            ("verdict", ",".join(self.verdict)),
            ("protocol", ",".join(self.protocol)),
            ("http_status", ",".join(status(lo, hi) for lo, hi in self.http_status)),
        ):
            if val:
                q[key] = val
        if self.since is not None:
            q["since"] = repr(self.since)
        if self.until is not None:
            q["until"] = repr(self.until)
        return q

    def matches(self, f: Flow) -> bool:
        if self.since is not None and f.time < self.since:
            return False
        if self.until is not None and f.time > self.until:
            return False
        if self.verdict and f.verdict not in self.verdict:
            return False
        if self.namespace and not (
            f.src_namespace in self.namespace or f.dst_namespace in self.namespace
        ):
            return False
        if self.pod and not (
            _pod_in(self.pod, f.src_namespace, f.src_pod)
            or _pod_in(self.pod, f.dst_namespace, f.dst_pod)
        ):
            return False
        if self.from_pod and not _pod_in(self.from_pod, f.src_namespace, f.src_pod):
            return False
        if self.to_pod and not _pod_in(self.to_pod, f.dst_namespace, f.dst_pod):
            return False
        if self.to_service and not _service_in(self.to_service, f.dst_service):
            return False
        if self.identity and not (
            _identity_in(self.identity, f.src_identity)
            or _identity_in(self.identity, f.dst_identity)
        ):
            return False
        if self.protocol and not _protocol_in(self.protocol, f.protocol):
            return False
        if self.http_status:
            s = f.status
            if s is None or not any(lo <= s <= hi for lo, hi in self.http_status):
                return False
        return True


def _pod_in(refs: Iterable[tuple[str | None, str]], ns: str | None, pod: str | None) -> bool:
    if pod is None:
        return False
    return any((rns is None or rns == ns) and pod.startswith(name) for rns, name in refs)


def _service_in(wanted: Iterable[str], svc: str | None) -> bool:
    if svc is None:
        return False
    return any(w == svc or svc.startswith(w + ".") for w in wanted)


def _identity_in(wanted: Iterable[str], ident: str | None) -> bool:
    if ident is None:
        return False
    for w in wanted:
        if w == ident:
            return True
        if "://" not in w:  # "ns/sa": any trust domain
            ns, _, sa = w.partition("/")
            if ident.endswith(f"/ns/{ns}/sa/{sa}"):
                return True
    return False


def _protocol_in(wanted: Iterable[str], proto: str) -> bool:
    return any(w == proto or (w == "http" and proto in ("http/1.1", "h2")) for w in wanted)


# -- the ring ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowStreamParams:
    """What one reader asked for: a filter, how many recent flows, and whether to follow."""

    filter: FlowFilter = field(default_factory=FlowFilter)
    last: int | None = None
    follow: bool = False

    MAX_LAST = 1_000_000

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> FlowStreamParams:
        unknown = set(q) - set(FlowFilter.QUERY_KEYS) - {"last", "follow"}
        if unknown:
            raise FilterError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        last = None
        if "last" in q:
            try:
                last = int(q["last"])
            except ValueError:
                raise FilterError(f"last: {q['last']!r} is not a number") from None
            if not 0 <= last <= cls.MAX_LAST:
                raise FilterError(f"last: must be 0..{cls.MAX_LAST}")
        follow_raw = q.get("follow", "0").lower()
        if follow_raw not in ("0", "1", "true", "false", ""):
            raise FilterError(f"follow: {q['follow']!r} is not 0/1/true/false")
        follow = follow_raw in ("1", "true", "")
        return cls(FlowFilter.from_query(q), last, follow)

    def to_query(self) -> dict[str, str]:
        q = self.filter.to_query()
        if self.last is not None:
            q["last"] = str(self.last)
        if self.follow:
            q["follow"] = "1"
        return q


class FlowRing:
    """The most recent `size` flows of one process (size 0: recording is off).

    `record` is O(1) and never waits: a reader that falls behind by more than the ring loses
    the oldest flows (and is told how many), it never holds the proxy back."""

    __slots__ = ("_changed", "_flows", "max_readers", "node", "proxy", "readers", "seq", "size")

    def __init__(
        self, size: int = DEFAULT_FLOW_BUFFER_SIZE, *, node: str = "", proxy: str = ""
    ) -> None:
        if size < 0:
            raise ValueError(f"flow buffer size {size}: must be >= 0")
        self.size = size
        self.node = node
        self.proxy = proxy
        self._flows: deque[Flow | tuple[Callable[..., Flow], tuple[object, ...]]] = deque(
            maxlen=size or 1
        )
        self.seq = 0  # flows recorded since start; the newest has number `seq`
        self._changed: asyncio.Event | None = None
        self.readers = 0
        self.max_readers = 16

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._flows) if self.size else 0

    def record(self, flow: Flow) -> None:
        if not self.size:
            return
        self._flows.append(flow)
        self.seq += 1
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    def record_lazy(self, build: Callable[..., Flow], *args: object) -> None:
        """Record a flow that `build(*args)` makes when (and only if) a reader asks: the
        proxies' hot path pays for a tuple, not for a 29-field object."""
        if not self.size:
            return
        self._flows.append((build, args))
        self.seq += 1
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    def since(self, cursor: int) -> tuple[list[Flow], int]:
        """Flows recorded after flow number `cursor`, and how many of them the ring lost."""
        n = self.seq - cursor
        if n <= 0:
            return [], 0
        have = len(self)
        lost = max(0, n - have)
        n = min(n, have)
        buf = self._flows
        out: list[Flow] = []
        for i in range(-n, 0):
            item = buf[i]
            if isinstance(item, Flow):
                out.append(item)
                continue
            try:
                f = item[0](*item[1])
            except Exception:  # a builder's bug costs its flow, never the reader or the proxy
                log.exception("building a flow failed")
                lost += 1
                continue
            buf[i] = f  # built once, whoever reads next
            out.append(f)
        return out, lost

    async def wait(self, cursor: int) -> None:
        """Until a flow newer than `cursor` is recorded."""
        while self.seq <= cursor:
            ev = self._changed
            if ev is None:
                ev = self._changed = asyncio.Event()
            await ev.wait()

    async def stream(self, params: FlowStreamParams) -> AsyncIterator[list[dict[str, Any]]]:
        """Batches of matching flows as contract dicts: first the recent ones (`last` of
        them, or all when not following), then, if following, each new batch as it comes.
        A `{"lost_events": n}` item says the reader fell more than the ring behind."""
        flt = params.filter
        cursor = self.seq
        recent, _ = self.since(0)
        if params.last is not None or not params.follow:
            picked = [f for f in recent if flt.matches(f)]
            if params.last is not None:
                picked = picked[-params.last :] if params.last else []
            if picked:
                yield [f.to_dict() for f in picked]
        while params.follow:
            await self.wait(cursor)
            new, lost = self.since(cursor)
            cursor = self.seq
            out: list[dict[str, Any]] = [{"lost_events": lost}] if lost else []
            out.extend(f.to_dict() for f in new if flt.matches(f))
            if out:
                yield out


async def flow_lines(ring: FlowRing, params: FlowStreamParams) -> AsyncIterator[bytes]:
    """The NDJSON body of `/flows`: one JSON object per line."""
    ring.readers += 1
    try:
        async for batch in ring.stream(params):
            yield "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in batch).encode()
    finally:
        ring.readers -= 1


NDJSON = "application/x-ndjson"


def flows_route(ring: FlowRing) -> Callable[[Mapping[str, str]], tuple[str, AsyncIterator[bytes]]]:
    """The admin port's `/flows` stream (`mesh.observability` `streams=`): bad parameters are
    a 400 naming the parameter, a full house of readers a 503, recording off a 404."""

    def route(q: Mapping[str, str]) -> tuple[str, AsyncIterator[bytes]]:
        if not ring.enabled:
            raise HttpError(404, "flow recording is off (--flow-buffer-size 0)")
        params = FlowStreamParams.from_query(q)  # FilterError is a ValueError: 400
        if ring.readers >= ring.max_readers:
            raise HttpError(503, f"{ring.readers} flow readers already (limit {ring.max_readers})")
        return NDJSON, flow_lines(ring, params)

    return route
