"""`meshctl ca`: create the mesh CA, inspect it, and issue certificates for operators.

Issued keys are written 0600 because an operator asked for files (for another proxy, or a
node's bootstrap credential); ztunnel itself keeps workload keys in memory only.
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

from certs.ca import CertificateAuthority
from mesh.identity.spiffe import node_id
from mesh.identity.svid import CertificateError, Svid
from meshctl.errors import UsageError

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_ttl(text: str) -> timedelta:
    m = _DURATION.match(text)
    if not text or not m:
        raise UsageError(f"--ttl {text!r}: expected a duration such as 24h, 90m or 1d12h")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


def _load(directory: str) -> CertificateAuthority:
    try:
        return CertificateAuthority.load(directory)
    except CertificateError as exc:
        raise UsageError(str(exc)) from None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def write_svid(svid: Svid, bundle_pem: bytes, prefix: str) -> list[Path]:
    p = Path(prefix)
    if p.parent and not p.parent.exists():
        raise UsageError(f"--out {prefix}: directory {p.parent} does not exist")
    key, chain, bundle = (Path(f"{prefix}-{n}.pem") for n in ("key", "chain", "bundle"))
    _write_private(key, svid.key_pem())
    chain.write_bytes(svid.chain_pem())
    bundle.write_bytes(bundle_pem)
    return [key, chain, bundle]


def cmd_init(args: argparse.Namespace) -> int:
    try:
        ca = CertificateAuthority.init(args.dir, args.trust_domain)
    except CertificateError as exc:
        raise UsageError(str(exc)) from None
    print(f"created CA for trust domain {ca.trust_domain} in {args.dir}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ca = _load(args.dir)
    root = ca.root
    print(f"subject:      {root.subject.rfc4514_string()}")
    print(f"trust domain: {ca.trust_domain}")
    print(f"not after:    {root.not_valid_after_utc.isoformat()}")
    print(f"sha256:       {root.fingerprint(hashes.SHA256()).hex()}")
    return 0


def _issue(ca: CertificateAuthority, identity: str, args: argparse.Namespace) -> int:
    try:
        svid = ca.issue(identity, parse_ttl(args.ttl))
    except CertificateError as exc:
        raise UsageError(str(exc)) from None
    for path in write_svid(svid, ca.bundle_pem, args.out):
        print(path)
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    return _issue(_load(args.dir), args.id, args)


def cmd_issue_node(args: argparse.Namespace) -> int:
    ca = _load(args.dir)
    return _issue(ca, node_id(ca.trust_domain, args.node), args)


def cmd_serve(args: argparse.Namespace) -> int:
    from certs.service import run

    return run(args)


def register(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the mesh certificate authority")
    cas = ca.add_subparsers(dest="ca_command", required=True, metavar="SUBCOMMAND")
    p = cas.add_parser("init", help="create a root key and certificate in DIR")
    p.add_argument("dir")
    p.add_argument("--trust-domain", default="cluster.local")
    p.set_defaults(func=cmd_init)
    p = cas.add_parser("show", help="print the root's subject, expiry and fingerprint")
    p.add_argument("dir")
    p.set_defaults(func=cmd_show)
    p = cas.add_parser("issue", help="issue a key + chain + bundle for a SPIFFE ID")
    p.add_argument("dir")
    p.add_argument("--id", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    p.add_argument("--out", required=True, help="writes PREFIX-key.pem, -chain.pem, -bundle.pem")
    p.add_argument("--ttl", default="24h")
    p.set_defaults(func=cmd_issue)
    p = cas.add_parser("issue-node", help="issue a node's ztunnel certificate")
    p.add_argument("dir")
    p.add_argument("--node", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ttl", default="720h")
    p.set_defaults(func=cmd_issue_node)
    p = cas.add_parser("serve", help="run the CA service nodes obtain SVIDs from")
    from certs.service import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_serve)
