"""The observe flags and what they become: one `FlowStreamParams` for every source.

The proxies filter on their side (only matching flows cross the wire); the same filter runs
again here over the merged flows, so `--last N` means the N most recent across all sources.
"""

from __future__ import annotations

import argparse
import re
import time

from mesh.flows import FilterError, Flow, FlowStreamParams, parse_time
from meshctl.errors import UsageError

__all__ = ["DEFAULT_LAST", "add_filter_args", "params_from_args", "parse_since", "select"]

DEFAULT_LAST = 20
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float | None = None) -> float:
    """`5m`, `30s`, `2h` ago, or an absolute time (ISO 8601 / epoch seconds)."""
    m = _DURATION.match(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    return parse_time(text)


def add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (repeat a flag or give a comma list: any of them)")
    multi = {"action": "append", "metavar": "X"}
    g.add_argument("-n", "--namespace", **multi, help="source or destination namespace")  # type: ignore[arg-type]
    g.add_argument("--pod", **multi, help="[namespace/]pod (prefix), either end")  # type: ignore[arg-type]
    g.add_argument("--from-pod", **multi, help="[namespace/]pod (prefix) the flow came from")  # type: ignore[arg-type]
    g.add_argument("--to-pod", **multi, help="[namespace/]pod (prefix) the flow went to")  # type: ignore[arg-type]
    g.add_argument("--to-service", **multi, help="[namespace/]service or name.namespace")  # type: ignore[arg-type]
    g.add_argument("--identity", **multi, help="SPIFFE ID or namespace/serviceaccount")  # type: ignore[arg-type]
    g.add_argument("--verdict", **multi, help="FORWARDED, DENIED or DROPPED")  # type: ignore[arg-type]
    g.add_argument("--protocol", **multi, help="tcp, http (http/1.1 or h2), http/1.1, h2, grpc")  # type: ignore[arg-type]
    g.add_argument("--http-status", **multi, help="200, or a class: 5+ / 5xx")  # type: ignore[arg-type]
    g.add_argument("--since", help="only flows since: 5m, 30s, 2h, or an ISO 8601 time")
    g.add_argument("--last", type=int, metavar="N",
                   help=f"the N most recent matching flows (default {DEFAULT_LAST} unless "
                   "--follow or --since, as hubble observe)")  # fmt: skip
    g.add_argument("--all", action="store_true", help="every buffered flow, not the last N")
    g.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")


def params_from_args(args: argparse.Namespace, *, now: float | None = None) -> FlowStreamParams:
    """The flags as the proxies' query; a bad value is a UsageError naming its flag."""
    q: dict[str, str] = {}
    for key in ("namespace", "pod", "from_pod", "to_pod", "to_service", "identity", "verdict",
                "protocol", "http_status"):  # fmt: skip
        vals = getattr(args, key, None)
        if vals:
            q[key] = ",".join(vals)
    since = getattr(args, "since", None)
    if since:
        try:
            q["since"] = repr(parse_since(since, now))
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from None
    last = getattr(args, "last", None)
    if last is None and not (
        since or getattr(args, "follow", False) or getattr(args, "all", False)
    ):
        last = DEFAULT_LAST
    if last is not None:
        q["last"] = str(last)
    if getattr(args, "follow", False):
        q["follow"] = "1"
    try:
        return FlowStreamParams.from_query(q)
    except FilterError as exc:
        key, _, msg = str(exc).partition(":")
        raise UsageError(f"--{key.replace('_', '-')}:{msg}") from None


def select(flows: list[Flow], params: FlowStreamParams) -> list[Flow]:
    """Matching flows from several sources, oldest first, the last N when asked."""
    out = sorted((f for f in flows if params.filter.matches(f)), key=lambda f: f.time)
    if params.last is not None:
        out = out[-params.last :] if params.last else []
    return out
