"""`meshctl waypoint apply|list|delete`: declare waypoints as Gateway objects.

The mesh reads its config directory (the lab's generated dir, or any directory a FileSource
watches), so declaring a waypoint is writing one Gateway manifest there: the same YAML applies
unchanged with `kubectl apply` to a real cluster. Starting the process is the lab's job
(`--lab`); on Kubernetes (`--kube`) the Gateway is written to the API server and the waypoint
controller deploys it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from meshctl.errors import UsageError
from meshctl.gateway import gateway_manifest

DEFAULT_NAME = "waypoint"
CONFIG_DIR_ENV = "AMBIENTMESH_CONFIG_DIR"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _config_dir(args: argparse.Namespace) -> Path:
    raw = args.config_dir or os.environ.get(CONFIG_DIR_ENV)
    if not raw:
        raise UsageError(f"no config directory: pass --config-dir or set {CONFIG_DIR_ENV}")
    d = Path(raw)
    if not d.is_dir():
        raise UsageError(f"--config-dir {d}: not a directory")
    return d


def _check_name(flag: str, value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise UsageError(f"{flag} {value!r}: must be a DNS-1123 label (lower-case a-z, 0-9, '-')")
    return value


def _path(d: Path, namespace: str, name: str) -> Path:
    return d / f"waypoint-{namespace}-{name}.yaml"


def _waypoints_in(d: Path) -> list[tuple[str, str, Path]]:
    found: list[tuple[str, str, Path]] = []
    for p in sorted(d.glob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(p.read_text()))
        except (OSError, yaml.YAMLError):
            continue  # not ours to judge; the config loader reports broken files
        for doc in docs:
            if (
                isinstance(doc, dict)
                and doc.get("kind") == "Gateway"
                and isinstance(doc.get("spec"), dict)
                and doc["spec"].get("gatewayClassName") == "waypoint"
                and isinstance(doc.get("metadata"), dict)
            ):
                md = doc["metadata"]
                found.append((str(md.get("namespace", "default")), str(md.get("name", "")), p))
    return found


def _apply_in_lab(lab_name: str, ns: str, name: str, node: str | None) -> int:
    """In the lab the waypoint is also started, as a pod (see meshctl.lab.waypoints)."""
    from meshctl.lab.lab import Lab
    from meshctl.lab.names import LabPaths, check_lab_name
    from meshctl.lab.system import LabError
    from meshctl.lab.waypoints import apply_waypoint

    try:
        lab = Lab(LabPaths(check_lab_name(lab_name)))
        ip = apply_waypoint(lab, ns, name, node)
    except ValueError as exc:
        raise UsageError(f"--lab: {exc}") from None
    except LabError as exc:
        print(f"meshctl waypoint apply: {exc}", file=sys.stderr)
        return 1
    print(f"waypoint {ns}/{name} applied and running in lab {lab_name} ({ip})")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    ns = _check_name("-n", args.namespace)
    name = _check_name("--name", args.name)
    if args.lab:
        return _apply_in_lab(args.lab, ns, name, args.node)
    if args.kube:
        return _apply_in_kube(ns, name, args.kubeconfig)
    d = _config_dir(args)
    p = _path(d, ns, name)
    tmp = p.with_suffix(".yaml.tmp")
    # Write then rename: a watching FileSource never reads half a manifest.
    tmp.write_text(yaml.safe_dump(gateway_manifest(ns, name), sort_keys=False))
    tmp.replace(p)
    print(f"waypoint {ns}/{name} applied ({p})")
    return 0


def _apply_in_kube(ns: str, name: str, kubeconfig: str | None) -> int:
    """Create the Gateway, or merge it into an existing one (apply is idempotent)."""
    import asyncio

    from kubernetes_asyncio import client as k8s

    from mesh.config.kube import load_api_client

    body = gateway_manifest(ns, name)
    group, version = "gateway.networking.k8s.io", "v1"

    async def go() -> str:
        api = await load_api_client(kubeconfig)
        try:
            custom = k8s.CustomObjectsApi(api)
            try:
                await custom.create_namespaced_custom_object(group, version, ns, "gateways", body)
                return "created"
            except k8s.ApiException as exc:
                if exc.status != 409:
                    raise
            patch: Any = custom.patch_namespaced_custom_object
            await patch(group, version, ns, "gateways", name, body,
                        _content_type="application/merge-patch+json")  # fmt: skip
            return "updated"
        finally:
            await api.close()

    try:
        what = asyncio.run(go())
    except Exception as exc:  # the API's answer, or no API at all: one line, exit 2
        reason = getattr(exc, "reason", None) or exc
        raise UsageError(f"waypoint {ns}/{name}: the API server refused it: {reason}") from None
    print(f"waypoint {ns}/{name} {what} (Gateway in the API server)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    d = _config_dir(args)
    rows = _waypoints_in(d)
    if args.namespace:
        rows = [r for r in rows if r[0] == args.namespace]
    print(f"{'NAMESPACE':<24}{'NAME':<24}FILE")
    for ns, name, p in rows:
        print(f"{ns:<24}{name:<24}{p.name}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    ns = _check_name("-n", args.namespace)
    name = _check_name("--name", args.name)
    d = _config_dir(args)
    matches = [p for wns, wname, p in _waypoints_in(d) if (wns, wname) == (ns, name)]
    if not matches:
        raise UsageError(f"waypoint {ns}/{name}: not found in {d}")
    for p in matches:
        p.unlink()
    print(f"waypoint {ns}/{name} deleted")
    return 0


def register(subparsers: Any) -> None:
    wp = subparsers.add_parser("waypoint", help="declare, list and remove namespace waypoints")
    sub = wp.add_subparsers(dest="waypoint_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config-dir", help=f"config directory the mesh reads (or ${CONFIG_DIR_ENV})"
        )

    a = sub.add_parser("apply", help="write the waypoint Gateway for a namespace")
    a.add_argument("-n", "--namespace", required=True)
    a.add_argument("--name", default=DEFAULT_NAME)
    a.add_argument("--lab", metavar="LAB", help="a running lab: declare it there and start it")
    a.add_argument("--node", help="with --lab: the node to run the waypoint pod on")
    a.add_argument("--kube", action="store_true", help="write it to the Kubernetes API server")
    a.add_argument("--kubeconfig", help="with --kube (default: in-cluster, then ~/.kube/config)")
    common(a)
    a.set_defaults(func=cmd_apply)

    ls = sub.add_parser("list", help="list declared waypoints")
    ls.add_argument("-n", "--namespace")
    common(ls)
    ls.set_defaults(func=cmd_list)

    rm = sub.add_parser("delete", help="remove a waypoint Gateway")
    rm.add_argument("-n", "--namespace", required=True)
    rm.add_argument("--name", default=DEFAULT_NAME)
    common(rm)
    rm.set_defaults(func=cmd_delete)
