"""`meshctl lab ...`: the operator's handle on the lab."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from mesh.config.model import ConfigError
from meshctl.errors import UsageError
from meshctl.lab.lab import Lab
from meshctl.lab.names import (
    CGROUP_ROOT,
    DEFAULT_LAB,
    PIN_ROOT,
    STATE_ROOT,
    LabPaths,
    check_lab_name,
)
from meshctl.lab.system import LabError


def _lab(args: argparse.Namespace, *, mesh: bool = True, capture: str = "auto") -> Lab:
    try:
        name = check_lab_name(args.name)
    except ValueError as exc:
        raise UsageError(f"--name: {exc}") from None
    paths = LabPaths(
        name,
        state_root=Path(args.state_root),
        cgroup_root=Path(args.cgroup_root),
        pin_root=Path(args.pin_root),
    )
    image = getattr(args, "image", None)
    if image is not None and not Path(image).is_file():
        raise UsageError(f"--image {image}: no such file (build one: meshctl image build)")
    return Lab(paths, mesh=mesh, capture=capture, image=Path(image) if image else None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=DEFAULT_LAB, help=f"lab name (default {DEFAULT_LAB})")
    p.add_argument("--state-root", default=str(STATE_ROOT), help=argparse.SUPPRESS)
    p.add_argument("--cgroup-root", default=str(CGROUP_ROOT), help=argparse.SUPPRESS)
    p.add_argument("--pin-root", default=str(PIN_ROOT), help=argparse.SUPPRESS)


def _image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image",
        metavar="FILE",
        help="run each node's ztunnel and the waypoints from this image archive (meshctl "
        "image build) with runc/crun, as the DaemonSet and Deployments run them",
    )


def _guard_signals() -> None:
    """SIGTERM behaves like Ctrl-C, so `up`/`demo` tear down on either."""

    def raise_interrupt(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args, mesh=not args.no_mesh, capture=args.capture)
    _guard_signals()
    try:
        lab.up(args.manifest, keep_on_error=args.keep_on_error)
    except ConfigError as exc:
        raise UsageError(f"{args.manifest}: invalid manifest:\n{exc}") from None
    except LabError as exc:
        print(f"meshctl lab up: {exc}", file=sys.stderr)
        return 1
    print(f"lab {args.name} is up; `meshctl lab down --name {args.name}` removes it")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    problems = _lab(args).down()
    if problems:
        return 1
    print(f"lab {args.name} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.exists():
        print(f"lab {args.name} is not up")
        return 3
    st = lab.status()
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    print(f"lab {st['name']}")
    for node, info in st["nodes"].items():
        print(f"  node {node}: {info['ip']} pods {info['cidr']} netns {info['netns']}")
    print(lab.pods_table())
    for pr in st["procs"]:
        print(f"  {pr['kind']:8} {pr['name']:24} pid {pr['pid']:<8} "
              f"{'running' if pr['alive'] else 'EXITED'}")  # fmt: skip
    return 0


def _split_pod(text: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name:
        raise UsageError(f"{text!r}: expected NAMESPACE/POD")
    return ns, name


def cmd_label(args: argparse.Namespace) -> int:
    lab = _lab(args)
    kind, ns, name = ("Namespace", None, args.target)
    if args.kind == "pod":
        ns, name = _split_pod(args.target)
        kind = "Pod"
    try:
        for change in args.changes:
            lab.label(kind, ns, name, change)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except LabError as exc:
        print(f"meshctl lab label: {exc}", file=sys.stderr)
        return 1
    print(lab.pods_table())
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    ns, name = _split_pod(args.pod)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("nothing to run: meshctl lab exec NS/POD -- CMD...")
    try:
        res = _lab(args).exec_in_pod(ns, name, cmd, timeout=args.timeout)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    return res.returncode


def cmd_restart_ztunnel(args: argparse.Namespace) -> int:
    try:
        pid = _lab(args).restart_ztunnel(args.node)
    except LabError as exc:
        print(f"meshctl lab restart-ztunnel: {exc}", file=sys.stderr)
        return 1
    print(f"ztunnel {args.node} restarted (pid {pid})")
    return 0


def cmd_stop_ztunnel(args: argparse.Namespace) -> int:
    try:
        _lab(args).stop_ztunnel(args.node)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    print(f"ztunnel {args.node} stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshctl.lab.demo import run_demo

    _guard_signals()
    return run_demo(_lab(args, capture=args.capture), Path(args.manifest), keep=args.keep)


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="a local cluster of network namespaces and cgroups")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    p = sub.add_parser("up", help="bring a lab up from a manifest")
    p.add_argument("manifest")
    p.add_argument("--no-mesh", action="store_true", help="no CA, no ztunnel: plain pods")
    p.add_argument(
        "--capture",
        choices=["auto", "enrol", "node"],
        default="auto",
        help="enrol: BPF + in-pod listeners via ztunnel's enrolment socket; node: netfilter "
        "REDIRECT in the node netns; auto: enrol when ztunnel supports it",
    )
    p.add_argument("--keep-on-error", action="store_true", help="leave a failed lab for study")
    _image_arg(p)
    _common(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove a lab (also what a crashed run left)")
    _common(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="nodes, pods and processes of a lab")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("label", help="change a namespace's or pod's labels live")
    p.add_argument("kind", choices=["ns", "namespace", "pod"])
    p.add_argument("target", help="NAME (namespace) or NAMESPACE/POD")
    p.add_argument("changes", nargs="+", metavar="key=value|key-")
    _common(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("exec", help="run a command inside a pod (its netns and cgroup)")
    p.add_argument("pod", help="NAMESPACE/POD")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.add_argument("--timeout", type=float, default=60.0)
    _common(p)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("restart-ztunnel", help="replace a node's ztunnel; pods keep running")
    p.add_argument("node")
    _common(p)
    p.set_defaults(func=cmd_restart_ztunnel)

    p = sub.add_parser("stop-ztunnel", help="stop a node's ztunnel (to watch pods fail closed)")
    p.add_argument("node")
    _common(p)
    p.set_defaults(func=cmd_stop_ztunnel)

    p = sub.add_parser("demo", help="bring up the demo, drive traffic, report, tear down")
    p.add_argument(
        "--manifest",
        default=str(Path(__file__).resolve().parents[2] / "deploy" / "examples" / "demo.yaml"),
    )
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--capture", choices=["auto", "enrol", "node"], default="auto")
    _image_arg(p)
    _common(p)
    p.set_defaults(func=cmd_demo, name="demo")
