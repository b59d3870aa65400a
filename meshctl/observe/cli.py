"""`meshctl observe [map|ui]`: the flags, the sources they name, and the printing loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from mesh.flows import Flow, FlowStreamParams
from mesh.ports import FLOWS_PORT
from meshctl.errors import UsageError
from meshctl.observe import output
from meshctl.observe.filters import add_filter_args, params_from_args, select
from meshctl.observe.sources import (
    AddressSource,
    Source,
    SourceError,
    collect,
    follow,
    kube_sources,
    lab_sources,
    merged,
)

__all__ = ["observe_flows", "register", "show_lab_flows"]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _listen_address(text: str) -> tuple[str, int]:
    """Where the UI listens: like `_address`, and port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT (port 0: any free one)")
    return host or "127.0.0.1", int(port)


def add_source_args(p: argparse.ArgumentParser) -> None:
    from meshctl.lab.names import DEFAULT_LAB, STATE_ROOT

    g = p.add_argument_group("sources (default: every node and waypoint of the lab)")
    g.add_argument("--lab", default=DEFAULT_LAB, help=f"lab name (default {DEFAULT_LAB})")
    g.add_argument("--state-root", default=str(STATE_ROOT), help=argparse.SUPPRESS)
    g.add_argument(
        "--kube",
        action="store_true",
        help="every ztunnel and waypoint pod, through the Kubernetes API server",
    )
    g.add_argument("--kubeconfig", help="with --kube (default: in-cluster, then ~/.kube/config)")
    g.add_argument(
        "--proxy-port",
        type=int,
        default=FLOWS_PORT,
        help=f"with --kube: the pods' --flows-addr port (default {FLOWS_PORT})",
    )
    g.add_argument(
        "--address",
        type=_address,
        action="append",
        metavar="HOST:PORT",
        help="a proxy's admin port, directly (repeatable)",
    )


@contextlib.asynccontextmanager
async def open_sources(args: argparse.Namespace) -> AsyncIterator[list[Source]]:
    """The sources the flags name (an API client, for --kube, lives as long as they do)."""
    if args.address:
        yield [AddressSource(f"{h}:{p}", host=h, port=p) for h, p in args.address]
        return
    if args.kube:
        from mesh.config.kube import load_api_client

        try:
            api = await load_api_client(args.kubeconfig)
        except Exception as exc:  # the loader raises many kinds for a bad kubeconfig
            raise UsageError(f"--kube: no usable Kubernetes config: {exc}") from None
        try:
            try:
                found = await kube_sources(api, args.proxy_port)
            except Exception as exc:
                raise UsageError(f"--kube: cannot list pods: {exc}") from None
            yield found
        finally:
            await api.close()
        return
    from meshctl.lab.names import LabPaths, check_lab_name

    try:
        paths = LabPaths(check_lab_name(args.lab), state_root=Path(args.state_root))
        yield lab_sources(paths.state_file, paths.manifest_file)
    except (ValueError, SourceError) as exc:
        raise UsageError(f"--lab {args.lab}: {exc}") from None


def _warn(msg: str) -> None:
    print(f"meshctl observe: {msg}", file=sys.stderr, flush=True)


async def observe_flows(
    sources: Sequence[Source], params: FlowStreamParams, warn: Callable[[str], None] = _warn
) -> tuple[list[Flow], int]:
    """The matching flows every source holds (merged, oldest first, `--last` across all) and
    how many sources answered. The demo shows its flows through this too."""
    got, errors = await collect(sources, params)
    for e in errors:
        warn(e)
    for s in sources:
        if s.bad_lines:
            warn(f"{s.name}: skipped {s.bad_lines} line(s) that were not flows")
        if s.lost:
            warn(f"{s.name}: its ring dropped {s.lost} flow(s) before they were read")
    return select(got, params), len(sources) - len(errors)


def show_lab_flows(
    lab: str,
    state_root: Path,
    argv: Sequence[str],
    out: Callable[[str], None] = print,
) -> list[Flow]:
    """What `meshctl observe --lab LAB ARGV...` prints, printed through `out` (the demo ends
    with this); the flows shown. Unreachable proxies are reported, never fatal."""
    parser = argparse.ArgumentParser(prog="meshctl observe", add_help=False)
    add_filter_args(parser)
    parser.add_argument("-o", "--output", choices=output.FORMATS, default="compact")
    args = parser.parse_args(list(argv))
    params = params_from_args(args)
    from meshctl.lab.names import LabPaths

    paths = LabPaths(lab, state_root=state_root)
    try:
        sources = lab_sources(paths.state_file, paths.manifest_file)
    except SourceError as exc:
        out(f"flows: {exc}")
        return []
    out(f"$ meshctl observe --lab {lab} {' '.join(argv)}")
    flows, _ = asyncio.run(observe_flows(sources, params, lambda m: out(f"  ({m})")))
    text = output.render(flows, args.output)
    if text:
        out(text)
    return flows


async def _run(args: argparse.Namespace, params: FlowStreamParams) -> int:
    async with open_sources(args) as sources:
        if not sources:
            _warn("no sources found (no ztunnel or waypoint)")
            return 1
        if not params.follow:
            flows, answered = await observe_flows(sources, params)
            text = output.render(flows, args.output)
            if text:
                print(text, flush=True)
            return 0 if answered else 1
        header = [args.output == "table"]

        def emit(f: Flow) -> None:
            if args.output == "table":
                lines = output.table([f]).splitlines()
                print("\n".join(lines if header[0] else lines[1:]), flush=True)
                header[0] = False
            else:
                print(output.render([f], args.output), flush=True)

        await follow(sources, params, emit, _warn)
        return 0


def cmd_observe(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args, params))
    return 130


def _lazy(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def cmd_map(args: argparse.Namespace) -> int:
    render_map = _lazy("meshctl.observe.map", "render_map")
    if render_map is None:
        print("meshctl observe map: not available in this build", file=sys.stderr)
        return 1
    params = params_from_args(args)

    async def flows() -> list[Flow]:
        async with open_sources(args) as sources:
            got, _ = await observe_flows(sources, params)
            return got

    data: bytes = render_map(asyncio.run(flows()), args.format)
    if args.output_file in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(args.output_file).write_bytes(data)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    serve_ui = _lazy("meshctl.observe.ui", "serve_ui")
    if serve_ui is None:
        print("meshctl observe ui: not available in this build", file=sys.stderr)
        return 1
    params = params_from_args(args)
    if params.last is None:  # open on the recent past, then live
        params = dataclasses.replace(params, last=500)
    params = dataclasses.replace(params, follow=True)

    def listening(host: str, port: int) -> None:
        print(f"meshctl observe ui: http://{host}:{port}/", flush=True)

    async def run() -> None:
        async with open_sources(args) as sources:
            await serve_ui(
                lambda: merged(sources, params, _warn),
                args.listen[0],
                args.listen[1],
                on_listening=listening,
            )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
        return 0
    return 130


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "observe",
        help="flows from every ztunnel and waypoint, like hubble observe",
        description="Print flows (one per connection at ztunnel, one per request at a "
        "waypoint) with their verdict: FORWARDED, DENIED (with the policy) or DROPPED (with "
        "the reason). Filters run in the proxies; --follow keeps printing.",
    )
    add_source_args(p)
    add_filter_args(p)
    p.add_argument("-o", "--output", choices=output.FORMATS, default="compact")
    p.set_defaults(func=cmd_observe)
    sub = p.add_subparsers(dest="observe_command", required=False, metavar="{map,ui}")
    m = sub.add_parser("map", help="a service map of the flows (graphviz PNG or SVG)")
    add_source_args(m)
    add_filter_args(m)
    m.add_argument("--format", choices=["svg", "png"], default="svg")
    m.add_argument("-o", "--output-file", help="write here (default: stdout)")
    m.set_defaults(func=cmd_map)
    u = sub.add_parser("ui", help="a live page: the service map and a filterable flow table")
    add_source_args(u)
    add_filter_args(u)
    u.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where to serve the page (default: loopback, any free port)",
    )
    u.set_defaults(func=cmd_ui)
