"""`meshctl config validate`: check manifests before they reach a proxy.

The same parser the proxies use judges the files, so "ok" here means a proxy will accept them.
Objects of kinds the mesh does not read are named one by one: a kind we skip silently (as
GRPCRoute once was) would otherwise pass for a validated one. With nothing read at all there
is nothing to call "ok", so that is a failure.
"""

from __future__ import annotations

import argparse
from typing import Any

from mesh.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN
from mesh.config.parse import ConfigErrors, load_snapshot


def register(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="inspect and validate mesh configuration")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    validate = sub.add_parser("validate", help="validate YAML manifests (files or directories)")
    validate.add_argument("paths", nargs="+", metavar="FILE")
    validate.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    validate.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    validate.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    ignored: list[str] = []
    try:
        snap = load_snapshot(
            args.paths,
            trust_domain=args.trust_domain,
            root_namespace=args.root_namespace,
            ignored=ignored,
        )
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err)
        for what in ignored:
            print(f"ignored: {what}: not a kind the mesh reads")
        return 1
    for what in ignored:
        print(f"ignored: {what}: not a kind the mesh reads")
    count = sum(
        len(t)
        for t in (
            snap.nodes,
            snap.namespaces,
            snap.pods,
            snap.services,
            snap.waypoints,
            snap.http_routes,
            snap.authorization_policies,
            snap.peer_authentications,
            snap.network_policies,
            snap.cilium_policies,
            snap.request_authentications,
            snap.config_maps,  # only those a RequestAuthentication reads its JWKS from
        )
    )
    if count == 0:
        print(f"error: no mesh objects read ({len(ignored)} ignored)")
        return 1
    tail = f", {len(ignored)} ignored" if ignored else ""
    print(f"ok: {count} objects{tail}")
    return 0
