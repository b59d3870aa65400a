"""The service map: who talks to whom, how much, how well, encrypted or not, and what was denied.

Flows (the shared flow record, `mesh/flows.py`'s `to_dict()` shape) are folded into a graph by
`build_graph`, a pure function so that the numbers can be checked without graphviz; `render_map`
turns that graph into DOT and lets Debian's graphviz `dot` lay it out as SVG or PNG.

Every name on the map comes from a pod, and pods may be hostile: a name can hold quotes,
backslashes (graphviz's `\\N`, `\\G` escapes), entities (`&lt;`), newlines or markup. Names
never become graphviz identifiers (nodes are `n0`, `n1`, ...), and every label goes through
`dot_label`, so what the map shows is exactly the name, as text. A flow source that floods the
map with distinct names gets the busiest edges drawn and a note of how many were left out,
rather than a `dot` run that never ends.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeAlias

FORMATS = ("png", "svg", "dot")
MAX_NAME = 120  # characters of one name kept on the map; longer ones are cut, marked with "…"
DEFAULT_MAX_EDGES = 200
DOT_TIMEOUT_S = 60.0

_DENIED_COLOUR = "#cc0000"
_ERROR_COLOUR = "#d98c00"
_OK_COLOUR = "#2f6f3e"
_PLAIN_COLOUR = "#555555"


class HasToDict(Protocol):
    """A flow object (the proxies' `mesh.flows.Flow`) that gives the contract's mapping."""

    def to_dict(self) -> Mapping[str, Any]: ...


FlowLike: TypeAlias = Mapping[str, Any] | HasToDict


class MapError(Exception):
    """The map could not be drawn (no graphviz, `dot` failed or took too long, bad format)."""


@dataclass(frozen=True, slots=True)
class Edge:
    """Traffic from one map node to another, with one verdict class: denied flows get an edge of
    their own, so a pair that is partly allowed (an L7 policy on some paths) shows both."""

    source: str
    destination: str
    denied: bool
    requests: int
    errors: int
    rps: float
    p99_ms: float | None
    mtls: int  # flows with mutual TLS
    plaintext: int  # flows without
    policies: tuple[str, ...] = ()  # the denying policies ("ns/name"), for a denied edge
    reasons: tuple[str, ...] = ()  # why flows were DROPPED, if any were

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def encryption(self) -> str:
        """'mTLS', 'plaintext', or 'mixed' when some flows on the edge had it and some did not."""
        if self.plaintext == 0:
            return "mTLS"
        if self.mtls == 0:
            return "plaintext"
        return "mixed"


@dataclass(frozen=True, slots=True)
class Graph:
    """The aggregated map. `nodes` maps a node's name to its kind: 'service' (a destination
    Service, or a workload that backs one), 'workload' (a source seen only as a client) or
    'address' (a destination known only by IP:port, e.g. a flow dropped for want of a route)."""

    nodes: dict[str, str]
    edges: list[Edge]
    span_s: float  # the flows' time span the rates are over (at least one second)
    flows: int  # flows that went into the map
    omitted_edges: int = 0
    skipped: int = 0  # records that were not flows at all (not a mapping)
    notes: list[str] = field(default_factory=list)


def _text(value: Any) -> str | None:
    """A string field of a record, or None when missing or of another type (hostile records
    may put anything anywhere)."""
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


_EMPTY: Mapping[str, Any] = {}


def _part(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = record.get(key)
    # dict first: the ABC check behind Mapping is several times slower, and this runs per field
    return value if type(value) is dict or isinstance(value, Mapping) else _EMPTY


def as_record(item: Any) -> Mapping[str, Any] | None:
    """A flow as the contract's mapping: given as one, or as an object with `to_dict()` (the
    proxies' `mesh.flows.Flow`), so callers pass what their source yields. None for anything
    else."""
    if isinstance(item, Mapping):
        return item
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        with contextlib.suppress(Exception):
            record = to_dict()
            if isinstance(record, Mapping):
                return record
    return None


_POD_HASH = re.compile(r"^(?P<base>.+?)(?:-[0-9a-f]{6,10})?-[0-9a-z]{5}$")


def workload_of(pod: str) -> str:
    """A Deployment's pod name without its ReplicaSet hash and random suffix
    (`reviews-v1-7f9c8d6b5-x2k9q` -> `reviews-v1`), so that replicas share one map node; other
    names (lab pods, StatefulSet ordinals) are kept as they are."""
    match = _POD_HASH.match(pod)
    if match and re.search(r"\d", pod[len(match["base"]) :]):
        return match["base"]
    return pod


def _destination_node(
    dst: Mapping[str, Any], backs: Mapping[tuple[str, str], str]
) -> tuple[str, str] | None:
    service = _text(dst.get("service"))
    if service:
        return service, "service"
    namespace, pod = _text(dst.get("namespace")), _text(dst.get("pod"))
    if pod:
        # The destination's ztunnel knows the pod, not the Service the caller dialled: when
        # another record tied that workload to a Service, the edge goes to the Service.
        workload = workload_of(pod)
        backed = backs.get((namespace or "", workload))
        if backed:
            return backed, "service"
        return f"{namespace or '?'}/{workload}", "workload"
    ip = _text(dst.get("ip"))
    if ip:
        port = _number(dst.get("port"))
        return (f"{ip}:{int(port)}" if port is not None else ip), "address"
    return None


def _source_node(src: Mapping[str, Any], backs: Mapping[tuple[str, str], str]) -> str | None:
    namespace, pod = _text(src.get("namespace")), _text(src.get("pod"))
    if pod:
        workload = workload_of(pod)
        service = backs.get((namespace or "", workload))
        return service if service else f"{namespace or '?'}/{workload}"
    ip = _text(src.get("ip"))
    return ip


def _parse_time(value: Any) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _is_error(record: Mapping[str, Any]) -> bool:
    if record.get("verdict") == "DROPPED":
        return True
    l7 = _part(record, "l7")
    status = _number(l7.get("status"))
    grpc = _number(l7.get("grpc_status"))
    return (status is not None and status >= 500) or (grpc is not None and grpc != 0)


def p99(values: list[float]) -> float | None:
    """The 99th percentile by nearest rank: a value that was actually observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(slots=True)
class _Acc:
    requests: int = 0
    errors: int = 0
    mtls: int = 0
    plaintext: int = 0
    latencies: list[float] = field(default_factory=list)
    policies: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)


def build_graph(flows: Iterable[FlowLike], *, max_edges: int = DEFAULT_MAX_EDGES) -> Graph:
    """Aggregate flow records (mappings in the shared flow shape, or objects with `to_dict()`)
    into map nodes and edges.

    A request that went through a waypoint is reported twice: by ztunnel (the connection) and by
    the waypoint (the request, with its L7 status). For each edge the waypoint's records win
    when there are any, so requests are not counted twice and error rates see HTTP statuses.
    Records of one connection reported by both ends' ztunnels (the same 4-tuple and verdict)
    count once. Rates are over the time span of all the flows given, at least one second.
    """
    records: list[Mapping[str, Any]] = []
    skipped = 0
    for item in flows:
        record = as_record(item)
        if record is None:
            skipped += 1
        else:
            records.append(record)

    # Which workload backs which service, so that a backend calling onward (productpage ->
    # reviews) sits on the map as the service it serves, and chains connect.
    backs: dict[tuple[str, str], str] = {}
    for record in records:
        target = _part(record, "destination")
        service, pod = _text(target.get("service")), _text(target.get("pod"))
        if service and pod:
            backs.setdefault((_text(target.get("namespace")) or "", workload_of(pod)), service)

    nodes: dict[str, str] = {}
    by_key: dict[tuple[str, str, bool], list[Mapping[str, Any]]] = {}
    times: list[float] = []
    for record in records:
        dst_node = _destination_node(_part(record, "destination"), backs)
        src_node = _source_node(_part(record, "source"), backs)
        if dst_node is None or src_node is None:
            skipped += 1
            continue
        nodes.setdefault(dst_node[0], dst_node[1])
        nodes.setdefault(src_node, "service" if src_node in backs.values() else "workload")
        denied = record.get("verdict") == "DENIED"
        by_key.setdefault((src_node, dst_node[0], denied), []).append(record)
        stamp = _parse_time(record.get("time"))
        if stamp is not None:
            times.append(stamp)
    span = max(1.0, max(times) - min(times)) if times else 1.0

    edges: list[Edge] = []
    used = 0
    for (src, dst, denied), group in by_key.items():
        chosen = _one_report_per_flow(group)
        used += len(chosen)
        acc = _Acc()
        for record in chosen:
            acc.requests += 1
            acc.errors += _is_error(record)
            if record.get("mtls") is True:
                acc.mtls += 1
            else:
                acc.plaintext += 1
            latency = _number(record.get("latency_ms"))
            if latency is not None and latency >= 0:
                acc.latencies.append(latency)
            reason = _text(record.get("reason"))
            if record.get("verdict") == "DROPPED" and reason:
                acc.reasons.add(reason)
        if denied:  # the deciding end names the policy, whichever report was counted
            acc.policies.update(p for r in group if (p := _text(r.get("policy"))))
        edges.append(
            Edge(
                source=src,
                destination=dst,
                denied=denied,
                requests=acc.requests,
                errors=acc.errors,
                rps=acc.requests / span,
                p99_ms=p99(acc.latencies),
                mtls=acc.mtls,
                plaintext=acc.plaintext,
                policies=tuple(sorted(acc.policies)),
                reasons=tuple(sorted(acc.reasons)),
            )
        )
    # Denied edges first (they are what a reader looks for), then the busiest.
    edges.sort(key=lambda e: (not e.denied, -e.requests, e.source, e.destination))
    omitted = max(0, len(edges) - max(0, max_edges))
    if omitted:
        edges = edges[: max(0, max_edges)]
        drawn = {e.source for e in edges} | {e.destination for e in edges}
        nodes = {name: kind for name, kind in nodes.items() if name in drawn}
    notes = [f"{omitted} quieter edges not drawn"] if omitted else []
    return Graph(nodes, edges, span, used, omitted, skipped, notes)


def _one_report_per_flow(group: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of one edge that count each request or connection once.

    A request through a waypoint is reported by the waypoint (with its L7 status) and by the
    ztunnels on its way; a connection between two enrolled pods by both ends' ztunnels. The
    flow record has no direction field, so the side is told by what each end knows: the
    waypoint's records win when there are any; else the caller's end, the one that resolved
    the Service (destination.service set: its latency is what the caller saw); else (a caller
    that dialled a pod IP, or one outside the mesh) the records of the destination's end.
    """
    waypoint = [r for r in group if r.get("reporter") == "waypoint"]
    if waypoint:
        return waypoint
    caller = [r for r in group if _text(_part(r, "destination").get("service"))]
    return _dedup_connections(caller or group)


def _dedup_connections(group: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per connection, where records of both ends remain. Records of one 4-tuple
    (when the source port is known) or of one edge (when it is not) are grouped by the proxy
    that reported them, and only the proxy that saw the most is counted: each end sees a
    connection at most once, while a reused source port is seen again by the same proxy and
    so still counts."""
    by_tuple: dict[tuple[Any, ...], dict[Any, list[Mapping[str, Any]]]] = {}
    for record in group:
        src, dst = _part(record, "source"), _part(record, "destination")
        key: tuple[Any, ...] = (src.get("ip"), src.get("port"), dst.get("ip"), dst.get("port"))
        if not all(isinstance(part, str | int) for part in key):
            key = ()  # no usable 4-tuple: the edge's records are one group
        proxy = record.get("proxy")
        proxy = proxy if isinstance(proxy, str) else None
        by_tuple.setdefault(key, {}).setdefault(proxy, []).append(record)
    out: list[Mapping[str, Any]] = []
    for reports in by_tuple.values():
        best: list[Mapping[str, Any]] = []
        for records in reports.values():
            if len(records) > len(best):
                best = records
        out.extend(best)
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_name(name: str) -> str:
    """A name as it may be shown: control characters (newlines would forge extra label lines)
    replaced by U+FFFD, and cut to MAX_NAME characters."""
    name = _CONTROL.sub("\ufffd", name)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def dot_label(*lines: str) -> str:
    """A DOT quoted string showing `lines` exactly as text, one per line.

    Inside a quoted DOT string `"` must be escaped, a backslash starts graphviz's label escapes
    (`\\N` is the node's name, `\\n` a line break), and `&` starts an entity graphviz decodes
    (`&lt;` would show as `<`, `&#...;` as anything). Each is made literal.
    """
    escaped = []
    for line in lines:
        text = clean_name(line).replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
        escaped.append(text)
    return '"' + "\\n".join(escaped) + '"'


def _fmt_rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def edge_lines(edge: Edge) -> list[str]:
    """The label of an edge, one string per line (shared by the map and the UI's edge list)."""
    lines: list[str] = []
    if edge.denied:
        lines.append("DENIED by " + (", ".join(edge.policies) if edge.policies else "policy"))
    lines.append(f"{_fmt_rate(edge.rps)} req/s ({edge.requests})")
    if not edge.denied:
        lines.append(f"errors {edge.error_rate:.0%}")
    if edge.p99_ms is not None:
        lines.append(f"p99 {edge.p99_ms:.1f} ms")
    # Words, not a lock glyph: Debian's default fonts have no emoji, and a PNG showed a box.
    names = {"mTLS": "mTLS", "plaintext": "plaintext", "mixed": "mixed mTLS/plaintext"}
    lines.append(names[edge.encryption])
    if edge.reasons:
        lines.append("dropped: " + ", ".join(edge.reasons))
    return lines


def to_dot(graph: Graph) -> str:
    """The graph as a DOT document. Node identifiers are generated; names appear only in
    escaped labels."""
    ids = {name: f"n{i}" for i, name in enumerate(sorted(graph.nodes))}
    out = [
        "digraph mesh {",
        '  graph [rankdir=LR, fontname="Helvetica", fontsize=11, nodesep=0.5, ranksep=1.2];',
        '  node [fontname="Helvetica", fontsize=11, style="rounded,filled", fillcolor="#eef3fb",'
        ' color="#4a6fa5", shape=box];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for name in sorted(graph.nodes):
        kind = graph.nodes[name]
        shape = {"service": "box", "workload": "ellipse", "address": "octagon"}.get(kind, "box")
        fill = {"service": "#eef3fb", "workload": "#f4f4f4", "address": "#fff4e5"}.get(kind, "#fff")
        out.append(
            f'  {ids[name]} [label={dot_label(name)}, shape={shape}, fillcolor="{fill}",'
            f' class="{kind}"];'
        )
    for i, edge in enumerate(graph.edges):
        if edge.denied:
            style = f'color="{_DENIED_COLOUR}", fontcolor="{_DENIED_COLOUR}", style=dashed'
            cls = "edge-denied"
        else:
            colour = (
                _ERROR_COLOUR
                if edge.errors
                else (_OK_COLOUR if edge.encryption == "mTLS" else _PLAIN_COLOUR)
            )
            style = f'color="{colour}", fontcolor="{colour}"'
            if edge.encryption != "mTLS":
                style += ", style=dotted"
            cls = "edge-ok" if not edge.errors else "edge-errors"
        out.append(
            f"  {ids[edge.source]} -> {ids[edge.destination]} "
            f'[label={dot_label(*edge_lines(edge))}, {style}, class="{cls}", id="e{i}"];'
        )
    if graph.notes or not graph.edges:
        note = graph.notes or ["no flows yet"]
        out.append(f'  label={dot_label(*note)}; labelloc="b";')
    out.append("}")
    return "\n".join(out) + "\n"


def render_map(flows: Iterable[FlowLike], fmt: str, *, max_edges: int = DEFAULT_MAX_EDGES) -> bytes:
    """The service map of `flows` as PNG, SVG (graphviz `dot`) or the DOT source itself."""
    if fmt not in FORMATS:
        raise MapError(f"map format {fmt!r}: must be one of {', '.join(FORMATS)}")
    source = to_dot(build_graph(flows, max_edges=max_edges))
    if fmt == "dot":
        return source.encode()
    dot = shutil.which("dot")
    if dot is None:
        raise MapError(
            "graphviz `dot` not found: install Debian's graphviz (apt-get install graphviz)"
        )
    try:
        done = subprocess.run(
            [dot, f"-T{fmt}"],
            input=source.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise MapError(f"graphviz `dot` took longer than {DOT_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0 or not done.stdout:
        err = done.stderr.decode(errors="replace").strip()[:500]
        raise MapError(f"graphviz `dot -T{fmt}` failed (exit {done.returncode}): {err}")
    return done.stdout
