"""The CNI installer: puts `ambientmesh-cni` on the node and chains it into the active conflist.

Runs as a container of the ztunnel DaemonSet with the host's CNI bin and conf dirs mounted. It
copies the plugin (cni/plugin.py: stdlib only, run by the host's python3) into the bin dir,
writes a kubeconfig for the plugin's fallback lookup (JSON, with this pod's service-account
token inline because the host cannot read the container's projected-token path), and appends
our entry to the plugins of the conflist the runtime uses (the lexically first *.conflist /
*.conf, as containerd and CRI-O pick it). A single-plugin *.conf is converted to a conflist.

Then it keeps watching: the primary CNI's own DaemonSet may rewrite its conflist (dropping our
entry) and the kubelet rotates the token, so the check repeats every few seconds. Files are
replaced atomically (write + rename) because the runtime may read them at any moment.

On SIGTERM it leaves everything in place: during a ztunnel rolling update the plugin must stay
chained so new ambient pods fail (and are retried) rather than start unenrolled. `--uninstall`
removes our entry, the plugin and the kubeconfig.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cni.plugin as plugin

log = logging.getLogger("cni.install")

__all__ = ["install", "main", "primary_conf", "uninstall"]

PLUGIN_TYPE = "ambientmesh-cni"
KUBECONFIG_NAME = "ambientmesh-cni.kubeconfig"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace `path` with `data` unless it already holds exactly that; True if written."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def primary_conf(conf_dir: Path) -> Path | None:
    """The network config the runtime loads: the lexically first .conflist/.conf/.json."""
    try:
        names = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf", ".json"))
    except FileNotFoundError:
        return None
    for p in names:
        if p.name == KUBECONFIG_NAME or p.name.startswith("."):
            continue
        return p
    return None


def chained(conf: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """`conf` as a conflist with `entry` last among its plugins (replacing an older entry)."""
    if "plugins" in conf:
        out = dict(conf)
        plugins = [p for p in conf["plugins"] if p.get("type") != PLUGIN_TYPE]
    else:  # a single-plugin .conf
        single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        out = {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", "k8s")}
        plugins = [single]
    out["plugins"] = [*plugins, dict(entry)]
    return out


def unchained(conf: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(conf)
    out["plugins"] = [p for p in conf.get("plugins", []) if p.get("type") != PLUGIN_TYPE]
    return out


def kubeconfig(server: str, token: str, ca_pem: bytes | None) -> dict[str, Any]:
    import base64

    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "ambientmesh-cni",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "ambientmesh-cni", "user": {"token": token}}],
        "contexts": [
            {"name": "ambientmesh-cni", "context": {"cluster": "local", "user": "ambientmesh-cni"}}
        ],
    }


def install(
    bin_dir: Path,
    conf_dir: Path,
    entry: Mapping[str, Any],
    kube: Mapping[str, Any] | None = None,
) -> Path | None:
    """One reconciliation pass; returns the conflist we are chained into (None: no primary
    CNI config yet, i.e. the node's network plugin has not installed itself: try again)."""
    src = Path(plugin.__file__).read_bytes()
    _atomic_write(bin_dir / PLUGIN_TYPE, b"#!/usr/bin/env python3\n" + src, 0o755)
    entry = dict(entry)
    if kube is not None:
        kpath = conf_dir / KUBECONFIG_NAME
        _atomic_write(kpath, json.dumps(kube, indent=2).encode(), 0o600)
        entry["kubeconfig"] = str(kpath)
    conf_path = primary_conf(conf_dir)
    if conf_path is None:
        return None
    conf = json.loads(conf_path.read_text())
    new = chained(conf, entry)
    target = conf_path if conf_path.suffix == ".conflist" else conf_path.with_suffix(".conflist")
    if _atomic_write(target, (json.dumps(new, indent=2) + "\n").encode()):
        log.info("chained %s into %s", PLUGIN_TYPE, target)
    if target != conf_path:
        conf_path.unlink()  # the converted .conf would otherwise sort first and win
    return target


def uninstall(bin_dir: Path, conf_dir: Path) -> None:
    conf_path = primary_conf(conf_dir)
    if conf_path is not None and conf_path.suffix == ".conflist":
        conf = json.loads(conf_path.read_text())
        if any(p.get("type") == PLUGIN_TYPE for p in conf.get("plugins", [])):
            _atomic_write(conf_path, (json.dumps(unchained(conf), indent=2) + "\n").encode())
    for p in (bin_dir / PLUGIN_TYPE, conf_dir / KUBECONFIG_NAME):
        p.unlink(missing_ok=True)


def _in_cluster_kube() -> dict[str, Any] | None:
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    token_file = SA_DIR / "token"
    if not host or not port or not token_file.exists():
        return None
    ca = SA_DIR / "ca.crt"
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return kubeconfig(
        server, token_file.read_text().strip(), ca.read_bytes() if ca.exists() else None
    )


def build_parser() -> argparse.ArgumentParser:
    """Also used by the tests that check every manifest's args against the real flags."""
    ap = argparse.ArgumentParser(prog="ambientmesh-cni-install", description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default="/host/opt/cni/bin", type=Path)
    ap.add_argument("--conf-dir", default="/host/etc/cni/net.d", type=Path)
    ap.add_argument("--enrol-socket", default=plugin.DEFAULT_SOCKET)
    ap.add_argument("--exclude-namespaces", default=",".join(plugin.DEFAULT_EXCLUDED))
    ap.add_argument("--log-file", default="")
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--once", action="store_true", help="one pass, then exit")
    ap.add_argument("--uninstall", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.uninstall:
        uninstall(args.bin_dir, args.conf_dir)
        return 0
    if shutil.which("python3") is None:
        log.warning("no python3 in this image's PATH; the node must provide one for the plugin")
    entry: dict[str, Any] = {
        "type": PLUGIN_TYPE,
        "enrolSocket": args.enrol_socket,
        "excludeNamespaces": [n for n in args.exclude_namespaces.split(",") if n],
    }
    if args.log_file:
        entry["logFile"] = args.log_file
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while True:
        try:
            target = install(args.bin_dir, args.conf_dir, entry, _in_cluster_kube())
            if target is None:
                log.info("no CNI network config in %s yet; waiting", args.conf_dir)
        except (OSError, ValueError) as exc:
            log.error("install pass failed: %s", exc)
            if args.once:
                return 1
        if args.once:
            return 0 if target is not None else 1
        if stop.wait(args.interval):
            return 0


if __name__ == "__main__":
    sys.exit(main())
