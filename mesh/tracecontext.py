"""W3C Trace Context (`traceparent` / `tracestate`), sans-IO: parse strictly, continue or start
a trace, and make this proxy a hop.

Callers send whatever they like in these headers, so the parser accepts only what the W3C
Trace Context spec (level 1) allows and anything else starts a new trace: a value we cannot
vouch for is never echoed to a backend or a collector. Rules applied (spec section 3.2/3.3):

- `traceparent` is `version-trace_id-parent_id-flags`, lower-case hex only; version `ff` is
  invalid; version `00` is exactly 55 characters; a higher version may carry more fields after
  a `-`, of which we read the four we know (and we send version `00`). An all-zero trace id or
  parent id is invalid. More than one `traceparent` header is invalid.
- `tracestate` is read only with a valid `traceparent`; it is at most 32 list members of
  `key=value` (keys `[a-z][_0-9a-z-*/]*` up to 256, or `tenant@system`; values
  of printable ASCII without `,` or `=`, up to 256, not ending in a space), no key twice. An
  invalid `tracestate` is dropped whole, since a truncated one could mean something else.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["TraceContext", "continue_trace", "parse_traceparent", "parse_tracestate"]

SAMPLED = 0x01
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_LEN = 8192  # beyond what any vendor sends; past it the header is dropped

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_KEY = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
)
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(slots=True)
class TraceContext:
    """One request's place in a trace: this hop's span and the span it continues (if any).
    Not frozen: built once per request, and a frozen dataclass's __init__ costs twice as much."""

    trace_id: str  # 32 lower-case hex
    span_id: str  # 16 lower-case hex: the span this proxy records for the request
    parent_id: str | None  # the caller's span, None when this hop started the trace
    flags: int
    tracestate: str | None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> str:
        """What the next hop receives: our span is its parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a valid header value, None otherwise."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "ff":
        return None
    if len(value) != 55 and (version == "00" or value[55:56] != "-"):
        return None  # version 00 has no more fields; later ones separate theirs with "-"
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def parse_tracestate(values: list[str]) -> str | None:
    """The combined header (several headers join with commas), normalised, or None when it is
    absent, empty or invalid."""
    joined = ",".join(values)
    if not joined or len(joined) > MAX_TRACESTATE_LEN:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for raw in joined.split(","):
        member = raw.strip(" \t")
        if not member:
            continue  # empty list members are allowed and dropped
        key, eq, val = member.partition("=")
        if not eq or _KEY.fullmatch(key) is None or _VALUE.fullmatch(val) is None:
            return None
        if key in keys:
            return None
        keys.add(key)
        members.append(member)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    return ",".join(members)


def _random_hex(n: int) -> str:
    """`n` random bytes as hex, never all zero. Ids need to be unique, not secret (OTel's SDK
    draws them the same way), and a getrandom(2) call per id cost more than the rest of the
    trace handling."""
    while True:
        x = random.getrandbits(8 * n)
        if x:
            return f"{x:0{2 * n}x}"


def new_span_id() -> str:
    return _random_hex(8)


def continue_trace(headers: list[tuple[str, str]], sampling: float = 1.0) -> TraceContext:
    """The request's trace: the caller's continued (with the caller's sampling decision) when
    its `traceparent` is valid, else a new one, sampled with probability `sampling` (the
    parent-based sampling of OTel's SDKs: only the first hop decides)."""
    tps: list[str] = []
    states: list[str] = []
    for k, v in headers:
        if k[:1] == "t":
            if k == "traceparent":
                tps.append(v)
            elif k == "tracestate":
                states.append(v)
    parsed = parse_traceparent(tps[0]) if len(tps) == 1 else None
    if parsed is None:
        sampled = sampling >= 1.0 or random.random() < sampling
        return TraceContext(_random_hex(16), new_span_id(), None, SAMPLED if sampled else 0, None)
    trace_id, parent_id, flags = parsed
    state = parse_tracestate(states) if states else None
    # Only the sampled bit is defined in version 00; the other bits are not ours to pass on.
    return TraceContext(trace_id, new_span_id(), parent_id, flags & SAMPLED, state)


def with_trace(headers: list[tuple[str, str]], tc: TraceContext) -> list[tuple[str, str]]:
    """`headers` with the caller's trace headers replaced by the ones the next hop gets."""
    out = [(k, v) for k, v in headers if k != "traceparent" and k != "tracestate"]
    out.append(("traceparent", f"00-{tc.trace_id}-{tc.span_id}-{tc.flags:02x}"))
    if tc.tracestate:
        out.append(("tracestate", tc.tracestate))
    return out
