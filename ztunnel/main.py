"""`ztunnel`: the node proxy process.

Config comes from YAML files (`--config`, live reload) or the Kubernetes API (`--kube`).
Certificates come from a local CA (`--ca-dir`: single host, the lab, tests) or the CA service
(`--ca HOST:PORT` with the node's own certificate from `meshctl ca issue-node`). Listeners:
HBONE :15008 on the node; optional node-level outbound / plaintext listeners; and, through
the enrolment socket, 15001/15006/15008 inside each enrolled pod's netns. Readiness turns
true once config and certificates are loaded and every listener is open. SIGTERM stops
accepting, lets live connections drain, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bpf.events import DropEvent
from bpf.loader import DEFAULT_PIN_ROOT
from certs.ca import CertificateAuthority
from mesh import accesslog, ktls, process
from mesh.config.source import ConfigStore, FileSource
from mesh.flows import Flow, FlowRing, flows_route
from mesh.hbone import serve
from mesh.hbone.pool import Listener
from mesh.identity.manager import Identities
from mesh.identity.spiffe import node_id
from mesh.identity.svid import CertificateError, Svid
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer, admin_routes
from mesh.ports import FLOWS_PORT
from ztunnel.config import ZtunnelConfig
from ztunnel.inpod.policy import drop_flow_fields
from ztunnel.inpod.protocol import EnrolServer
from ztunnel.inpod.workloadmanager import Redirector, WorkloadManager
from ztunnel.proxy import InboundHbone, InboundPlaintext, Node, Outbound
from ztunnel.proxy.fastpath import open_fastpath

log = logging.getLogger("ztunnel")

DEFAULT_ENROL_SOCKET = "/run/ambientmesh/enrol.sock"


def addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def positive(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number") from None
    if f <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be > 0")
    return f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel", description="ambientmesh node proxy")
    d = ZtunnelConfig(node="")  # the defaults live once, in the config the flags fill
    p.add_argument(
        "--node",
        default=os.environ.get("NODE_NAME"),
        required="NODE_NAME" not in os.environ,
        help="this node's name, as pods' spec.nodeName (default $NODE_NAME)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", nargs="+", help="YAML files or directories (reloaded live)")
    src.add_argument("--kube", action="store_true", help="watch the Kubernetes API for config")
    p.add_argument("--kubeconfig", help="with --kube: a kubeconfig (default: in-cluster)")
    p.add_argument("--trust-domain", default=d.trust_domain)
    ca = p.add_mutually_exclusive_group(required=True)
    ca.add_argument("--ca-dir", help="local CA directory (meshctl ca init): sign directly")
    ca.add_argument("--ca", "--ca-address", dest="ca", type=addr, help="CA service HOST:PORT")
    p.add_argument("--ca-bundle", help="with --ca: the trust bundle PEM")
    p.add_argument(
        "--node-cert",
        metavar="PREFIX",
        help="with --ca: PREFIX-key.pem and PREFIX-chain.pem from `meshctl ca issue-node`",
    )
    p.add_argument(
        "--ca-token",
        metavar="FILE",
        help="with --ca, instead of --node-cert: a projected service-account token the CA "
        "reviews with the API server (re-read on every request: the kubelet rotates it)",
    )
    p.add_argument("--cert-ttl", type=positive, default=d.cert_ttl, help="SVID lifetime (s)")
    p.add_argument("--hbone-addr", type=addr, default=d.hbone_addr)
    p.add_argument("--outbound-addr", type=addr, help="node-level outbound listener (15001)")
    p.add_argument("--inbound-plaintext-addr", type=addr, help="node-level 15006 listener")
    p.add_argument("--admin-addr", type=addr, default=d.admin_addr)
    p.add_argument(
        "--flows-addr",
        type=addr,
        help="also serve the flow stream (only /flows, read-only) here, e.g. for the API "
        f"server's pods/proxy (0.0.0.0:{FLOWS_PORT}); default: admin port only",
    )
    p.add_argument("--metrics-addr", type=addr, default=d.metrics_addr)
    p.add_argument("--readiness-addr", type=addr, default=d.readiness_addr)
    p.add_argument(
        "--enrol-socket",
        metavar="PATH",
        help=f"enrolment API unix socket (in-pod listeners), e.g. {DEFAULT_ENROL_SOCKET}",
    )
    p.add_argument(
        "--redirect",
        choices=["bpf", "none"],
        default=d.redirect,
        help="how enrolled pods' traffic is steered in: bpf (cgroup programs), none (someone "
        "else does it, e.g. netfilter rules)",
    )
    p.add_argument("--bpf-pin-root", help="with --redirect bpf: bpffs directory for pins")
    p.add_argument(
        "--bpf-cgroup",
        help="with --redirect bpf: the cgroup of ztunnel's own sockets (default: its own)",
    )
    p.add_argument(
        "--stream-cap", type=int, default=d.stream_cap, help="HBONE streams per connection"
    )
    p.add_argument(
        "--pool-idle", type=positive, default=d.pool_idle, help="idle HBONE connection (s)"
    )
    p.add_argument(
        "--drain-timeout", type=positive, default=d.drain_timeout, help="SIGTERM drain (s)"
    )
    lim = d.limits
    g = p.add_argument_group("limits", "what one peer may cost this node (past one: refused)")
    g.add_argument("--handshake-timeout", type=positive, default=lim.handshake_timeout,
                   help="TLS handshake on HBONE listeners (s)")  # fmt: skip
    g.add_argument("--max-streams", type=int, default=lim.max_streams,
                   help="concurrent CONNECT streams per HBONE connection (advertised and "
                   "enforced: extra streams get REFUSED_STREAM)")  # fmt: skip
    g.add_argument("--max-header-list-size", type=int, default=lim.max_header_list_size,
                   help="SETTINGS_MAX_HEADER_LIST_SIZE (bytes)")  # fmt: skip
    g.add_argument(
        "--hbone-idle-timeout",
        type=positive,
        default=lim.idle_timeout,
        help="an inbound HBONE connection with no stream is closed after (s)",
    )
    g.add_argument("--max-connections-per-peer", type=int,
                   default=lim.max_connections_per_peer,
                   help="inbound HBONE connections from one peer IP")  # fmt: skip
    g.add_argument("--max-connections", type=int, default=lim.max_connections,
                   help="inbound HBONE connections in total")  # fmt: skip
    g.add_argument(
        "--max-pending-dials",
        type=int,
        default=d.max_pending_dials,
        help="upstream connects (TCP or HBONE) under way at once",
    )
    p.add_argument(
        "--flow-buffer-size",
        type=int,
        default=d.flow_buffer_size,
        help="recent flows kept for `meshctl observe` (admin /flows); 0 turns recording off",
    )
    p.add_argument(
        "--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"]
    )
    p.add_argument("--log-format", default=d.log_format, choices=["text", "json"])
    p.add_argument(
        "--fastpath",
        default=d.fastpath,
        choices=["auto", "on", "off"],
        help="same-node splices (plaintext passthrough, local delivery) carried by the kernel "
        "(sockmap): on (or refuse to start), off; auto: what is faster here (user space: see "
        "the README)",
    )
    p.add_argument(
        "--local-delivery",
        default="on" if d.local_delivery else "off",
        choices=["on", "off"],
        help="meshed connections between two pods on this node: on, delivered by ztunnel "
        "without HBONE (the inbound side's policy and telemetry applied here); off, over HBONE "
        "to itself",
    )
    p.add_argument(
        "--ktls",
        default=d.ktls,
        choices=[m.value for m in ktls.KtlsMode],
        help="TLS record layer in the kernel: auto (when it can), on (or refuse to start), off",
    )
    return p


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Access-log records (already JSON) are merged, not nested,
    so a log pipeline sees their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        if record.name == "mesh.access" and msg.startswith("{"):
            try:
                out.update(json.loads(msg))
            except ValueError:
                out["msg"] = msg
        else:
            out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _read_node_svid(prefix: str, identity: str) -> Svid:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_path, chain_path = Path(f"{prefix}-key.pem"), Path(f"{prefix}-chain.pem")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        chain = tuple(x509.load_pem_x509_certificates(chain_path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise CertificateError(f"--node-cert {prefix}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not chain:
        raise CertificateError(f"--node-cert {prefix}: expected an EC key and a chain")
    svid = Svid(identity, key, chain)
    from mesh.tls import identity_from_der

    got = identity_from_der(svid.leaf.public_bytes(serialization.Encoding.DER))
    if got != identity:
        raise CertificateError(f"--node-cert {prefix}: certificate is for {got}, not {identity}")
    return svid


async def build_identities(config: ZtunnelConfig) -> Identities:
    from datetime import timedelta

    ttl = timedelta(seconds=config.cert_ttl)
    if config.ca_dir:
        return Identities(CertificateAuthority.load(config.ca_dir), ttl, ktls=config.ktls_enabled)
    if config.ca is None or not config.ca_bundle or not (config.node_cert or config.ca_token):
        raise CertificateError("--ca needs --ca-bundle FILE and --node-cert PREFIX or --ca-token")
    from mesh.identity.caclient import CaClient

    try:
        bundle = await asyncio.to_thread(Path(config.ca_bundle).read_bytes)
    except OSError as exc:
        raise CertificateError(f"--ca-bundle {config.ca_bundle}: {exc.strerror}") from None
    if config.node_cert:
        node_svid = _read_node_svid(config.node_cert, node_id(config.trust_domain, config.node))
        client = CaClient(config.ca, node_svid, bundle)
    else:
        # the node's own certificate comes from the CA too (`ensure(node.identity)` at start)
        client = CaClient(config.ca, None, bundle, token_file=config.ca_token)
    ids = Identities(client, ttl, bundle_pem=bundle, ktls=config.ktls_enabled)
    if config.node_cert:
        ids.add(node_svid)
    return ids


def enrol_state_path(socket_path: str) -> Path:
    """Where the pods asked for through `socket_path` are remembered across restarts: beside
    the socket, on the same tmpfs (/run), which a reboot clears along with the pods' netns."""
    sock = Path(socket_path)
    return sock.with_name(sock.name + ".pods.json")


def build_redirector(config: ZtunnelConfig) -> Redirector | None:
    if config.redirect == "none":
        return None
    from ztunnel.inpod.redirect import NodeRedirector

    r = NodeRedirector(config.node, config.bpf_pin_root, config.bpf_cgroup)
    r.install()  # compiles and attaches once; enrolment then only attaches per pod
    return r


def kernel_drop_recorder(
    flows: FlowRing, node_name: str, node: Node
) -> Callable[[DropEvent, str | None, str | None], None]:
    """What the kernel refused (an egress policy, or no ztunnel listening) as DROPPED flows,
    so `meshctl observe --verdict DROPPED` shows them beside ztunnel's own, as Hubble shows
    `cilium monitor`'s drops. Drops recorded while ztunnel was down arrive with their own
    time on the first drain after the start."""

    def record(ev: DropEvent, pod_key: str | None, policy: str | None) -> None:
        flows.record(
            Flow.from_dict(drop_flow_fields(ev, node_name, node.snapshot(), pod_key, policy))
        )

    return record


class Ztunnel:
    """The process: everything `run` opens, so that shutdown closes it in one place."""

    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        self.store = ConfigStore()
        self.metrics = MeshMetrics()
        self.ready = False
        self.servers: list[Listener] = []
        self.stop = asyncio.Event()
        self.flows = FlowRing(config.flow_buffer_size, node=config.node,
                              proxy=f"ztunnel-{config.node}")  # fmt: skip

    async def run(self) -> None:
        """Run until SIGTERM. A startup failure (bad config, certificate, port taken) leaves
        as its own exception, not wrapped in the TaskGroup's group, so `process.run` turns
        it into the right exit code and a one-line message."""
        try:
            await self._run()
        except BaseExceptionGroup as eg:
            leaves = _leaves(eg)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise

    async def _run(self) -> None:
        config = self.config
        bg: list[asyncio.Task[Any]] = []
        self.metrics.ktls_enabled.set(1 if config.ktls_enabled else 0)
        self.metrics.info.labels("ztunnel", "0.1.0").set(1)
        async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            # Observability first: readiness answers "not ready" while we load.
            ready_srv = ObservabilityServer(*config.readiness_addr, ready=lambda: self.ready)
            met_srv = ObservabilityServer(*config.metrics_addr, metrics=self.metrics)
            await stack.enter_async_context(ready_srv)
            await stack.enter_async_context(met_srv)

            refresh = None
            if config.kube:
                from mesh.config.kube import KubeSource, load_api_client

                api = await load_api_client(config.kubeconfig)
                stack.push_async_callback(api.close)
                ksrc = KubeSource(api, self.store, node_name=config.node,
                                  trust_domain=config.trust_domain)  # fmt: skip
                bg.append(tg.create_task(ksrc.run()))
                await ksrc.ready.wait()
            else:
                fsrc = FileSource(config.config, self.store, trust_domain=config.trust_domain)
                fsrc.load_initial()

                async def poll() -> None:
                    fsrc.poll_once()

                refresh = poll
                bg.append(tg.create_task(fsrc.run()))

            ids = await build_identities(config)
            node = Node(
                config.node, lambda: self.store.current, ids, self.metrics,
                trust_domain=config.trust_domain, hbone_port=config.hbone_addr[1],
                stream_cap=config.stream_cap, idle_timeout=config.pool_idle,
                limits=config.limits, max_pending_dials=config.max_pending_dials,
                flows=self.flows if self.flows.enabled else None,
                local_delivery=config.local_delivery,
            )  # fmt: skip
            await ids.ensure(node.identity)
            bg.append(tg.create_task(ids.run()))

            # the fast path's compile (--fastpath on) runs beside the redirect's, each in its
            # own child
            fp_pins = os.path.join(config.bpf_pin_root or DEFAULT_PIN_ROOT, config.node)
            redirector, node.fastpath = await asyncio.gather(
                asyncio.to_thread(build_redirector, config),
                asyncio.to_thread(open_fastpath, config.fastpath, fp_pins),
            )
            state = enrol_state_path(config.enrol_socket) if config.enrol_socket else None
            policy = getattr(redirector, "policy", None)  # kernel egress policy, with BPF
            manager = WorkloadManager(
                node, redirector, refresh=refresh, state_path=state, policy=policy
            )
            if policy is not None:
                self.metrics.kernel_drops.source = policy.counts
                if self.flows.enabled:
                    policy.on_drop = kernel_drop_recorder(self.flows, config.node, node)
                bg.append(tg.create_task(policy.run()))  # first: drops while we were down
            bg.append(tg.create_task(manager.run(self.store.subscribe)))
            bg.append(tg.create_task(node.revalidate_on_change(self.store.subscribe)))

            loop = asyncio.get_running_loop()
            self.servers.append(
                await serve(
                    config.hbone_addr[0],
                    config.hbone_addr[1],
                    ids.listener_context(node.identity),
                    InboundHbone(node),
                    trust_domain=config.trust_domain,
                    limits=node.limits,
                    gate=node.gate,
                    on_refused=node.hbone_refused,
                )
            )
            if config.outbound_addr:
                self.servers.append(
                    await loop.create_server(Outbound(node).protocol, *config.outbound_addr)
                )
            if config.inbound_plaintext_addr:
                plain = InboundPlaintext(node).protocol
                self.servers.append(await loop.create_server(plain, *config.inbound_plaintext_addr))
            for srv in self.servers:  # every one of these proxies onward: never dial them
                node.add_listeners(None, srv.sockets)
            for obs in (ready_srv, met_srv):
                node.add_listeners(None, obs.sockets, forwarding=False)
            enrol = None
            if config.enrol_socket:
                enrol = EnrolServer(config.enrol_socket, manager)
                await enrol.start()
                await manager.restore()  # before readiness: pods from a previous run first
                if config.kube:
                    # pods that were running before the install: no CNI ADD will come for them
                    from ztunnel.inpod.discover import Discoverer

                    disc = Discoverer(manager)
                    await disc.sweep(self.store.current)
                    bg.append(tg.create_task(disc.run(self.store.subscribe)))

            routes = admin_routes(
                lambda: self.store.current,
                extra=lambda: {
                    "node": config.node,
                    "certificates": ids.dump(),
                    "ktls": ktls.describe(config.ktls),
                    "workloads_enrolled": manager.dump(),
                    "hbone_pool": node.pool.stats(),
                    "redirect": config.redirect,
                    "fastpath": node.fastpath.dump() if node.fastpath else {"mode": "off"},
                    "local_delivery": node.local_delivery,
                    "limits": {
                        **node.limits.dump(),
                        "max_pending_dials": node.max_pending_dials,
                        "pending_dials": node.pending_dials,
                        "hbone_connections": node.gate.total,
                        "hbone_peers": node.gate.peers(),
                    },
                },
            )
            admin = await stack.enter_async_context(
                ObservabilityServer(
                    *config.admin_addr, routes=routes, streams={"/flows": flows_route(self.flows)}
                )
            )
            node.add_listeners(None, admin.sockets, forwarding=False)
            if config.flows_addr is not None:
                flows_srv = await stack.enter_async_context(
                    ObservabilityServer(
                        *config.flows_addr, streams={"/flows": flows_route(self.flows)}
                    )
                )
                node.add_listeners(None, flows_srv.sockets, forwarding=False)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            self.ready = True
            hbone_port = self.servers[0].sockets[0].getsockname()[1]
            log.info(
                "ztunnel %s ready: hbone %d, admin %d, metrics %d, readiness %d%s",
                config.node, hbone_port, admin.port, met_srv.port, ready_srv.port,
                f", enrolment {config.enrol_socket}" if enrol else "",
            )  # fmt: skip
            print(
                f"ready hbone={hbone_port} admin={admin.port} metrics={met_srv.port} "
                f"readiness={ready_srv.port}",
                flush=True,
            )
            await self.stop.wait()

            log.info("ztunnel %s stopping: no new connections, draining", config.node)
            self.ready = False
            if enrol is not None:
                await enrol.close()
            for s in self.servers:
                s.close()
            await manager.close()
            cut = await node.drain(config.drain_timeout)
            if cut:
                log.warning("cut %d connections still open after %.1fs", cut, config.drain_timeout)
            for t in bg:
                t.cancel()


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            out += _leaves(e)
        elif not isinstance(e, asyncio.CancelledError):
            out.append(e)
    return out


def check_args(args: argparse.Namespace) -> str | None:
    """Flag combinations argparse cannot express; the message, or None when they hold. Also
    run by the test that checks every deployed container's args."""
    if args.ca and (not args.ca_bundle or not (args.node_cert or args.ca_token)):
        return "--ca needs --ca-bundle FILE and --node-cert PREFIX or --ca-token FILE"
    if (args.ca_bundle or args.node_cert or args.ca_token) and not args.ca:
        return "--ca-bundle, --node-cert and --ca-token go with --ca HOST:PORT"
    if args.stream_cap < 1:
        return "--stream-cap must be >= 1"
    for flag in ("max_streams", "max_connections_per_peer", "max_connections",
                 "max_pending_dials"):  # fmt: skip
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1"
    if args.max_header_list_size < 1024:
        return "--max-header-list-size must be >= 1024"
    if not 0 <= args.flow_buffer_size <= 1 << 20:
        return "--flow-buffer-size must be 0 (off) .. 1048576"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"ztunnel: {problem}", file=sys.stderr)
        return 2
    try:
        ktls_enabled = ktls.resolve(args.ktls)
    except ktls.KtlsUnavailableError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 2
    config = ZtunnelConfig.from_args(args, ktls_enabled=ktls_enabled)
    setup_logging(config.log_level, config.log_format)
    line = accesslog.json_line if config.log_format == "json" else accesslog.text_line
    return process.run(
        "ztunnel", Ztunnel(config).run(), log_level=config.log_level, access_line=line
    )


if __name__ == "__main__":
    sys.exit(main())
