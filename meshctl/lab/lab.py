"""One lab: bring it up from a manifest, change labels live, restart a ztunnel, tear it down.

Order matters on the way up (underlay, nodes, pod netns + CNI, config, service rules, mesh,
then the pods' commands, then enrolment) and is reversed on the way down. Each object goes into
the state file before it exists, so `down` after a crash at any step still finds it; `down`
also scans for the lab's name prefix to catch anything a crash kept out of the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpf.mounts import MountUnavailable, ensure_bpffs, ensure_cgroup2
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.ports import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT
from meshctl.lab import cni, kubeproxy, manifest
from meshctl.lab.names import (
    LabPaths,
    check_lab_name,
    netns_path,
    node_ip,
    pod_cidr,
    underlay_link,
)
from meshctl.lab.state import CniRecord, LabState, ProcRecord
from meshctl.lab.system import (
    LabError,
    cgroup_kill_all,
    cgroup_make,
    cgroup_remove_tree,
    http_get_in_netns,
    in_netns,
    log_tail,
    netns_add,
    netns_del,
    netns_exists,
    netns_list,
    patience,
    proc_alive,
    proc_start_time,
    run,
    stop_process,
    sysctl,
    wait_ready,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class ZtunnelFeatures:
    """What the ztunnel in this tree can do; the lab adapts instead of failing."""

    enrol_socket: bool
    redirect: bool
    pin_root_flag: str | None
    ca_dir: bool

    @classmethod
    def probe(cls) -> ZtunnelFeatures:
        from ztunnel.main import build_parser

        text = build_parser().format_help()
        pin = next((f for f in ("--bpf-pin-root", "--pin-root") if f in text), None)
        return cls("--enrol-socket" in text, "--redirect" in text, pin, "--ca-dir" in text)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Children import this tree's packages, never another installed copy."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def resolve_command(cmd: Sequence[str]) -> list[str]:
    """`python`/`python3` in a manifest means this interpreter (the one with our packages)."""
    out = list(cmd)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable
    return out


def podexec_argv(netns: str, cgroup: str, cmd: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshctl.lab.podexec",
        "--netns",
        netns,
        "--cgroup",
        cgroup,
        "--",
        *resolve_command(cmd),
    ]


class Lab:
    def __init__(
        self,
        paths: LabPaths,
        *,
        out: Callable[[str], None] = print,
        mesh: bool = True,
        capture: str = "auto",
    ) -> None:
        check_lab_name(paths.lab)
        if capture not in ("auto", "enrol", "node"):
            raise ValueError(f"capture {capture!r}: expected auto, enrol or node")
        self.paths = paths
        self.out = out
        self.mesh = mesh
        self.requested_capture = capture
        self._state: LabState | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> LabState:
        if self._state is None:
            st = LabState.load(self.paths.state_file)
            if st is None:
                raise LabError(f"lab {self.paths.lab!r} is not up (no {self.paths.state_file})")
            self._state = st
        return self._state

    def exists(self) -> bool:
        return self.paths.state_file.exists()

    def snapshot(self) -> Snapshot:
        return parse_objects(manifest.load([self.paths.config_file]))

    # -- up ------------------------------------------------------------------------------

    def _ensure_filesystems(self) -> None:
        """cgroup v2 for the pods and ztunnels, bpffs for the pins: mounted if a fresh host
        has none yet (ztunnel's loader would mount bpffs too; doing it here says so once)."""
        try:
            root, done = ensure_cgroup2()
            if self.mesh:
                done += ensure_bpffs(str(self.paths.pin_root))
        except MountUnavailable as exc:
            raise LabError(str(exc)) from None
        for what in done:
            self.out(f"{what} (nothing was mounted there)")
        if not str(self.paths.cgroup_root).startswith(root.rstrip("/") + "/"):
            raise LabError(
                f"cgroup root {self.paths.cgroup_root} is not on cgroup v2 (mounted at {root}); "
                f"pass --cgroup-root {root}/ambientmesh"
            )

    def up(self, manifest_path: Path | str, *, keep_on_error: bool = False) -> Snapshot:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, cgroups, BPF)")
        if self.exists():
            raise LabError(
                f"lab {self.paths.lab!r} is already up ({self.paths.state_file}); "
                f"run: meshctl lab down --name {self.paths.lab}"
            )
        docs = manifest.load([manifest_path])
        topo = manifest.plan(docs)
        self._ensure_filesystems()
        leftovers = netns_list(self.paths.prefix)
        if leftovers or self.paths.lab_cgroup.exists():
            self.out(f"cleaning what an earlier run of lab {self.paths.lab} left behind")
            self.down(quiet=True)
        st = LabState(self.paths.lab, self.paths.state_file)
        st.info = {
            "manifest": str(Path(manifest_path).resolve()),
            "state_dir": str(self.paths.state_dir),
            "cgroup_root": str(self.paths.lab_cgroup),
            "pin_root": str(self.paths.lab_pins),
            "started": time.time(),
            "mesh": self.mesh,
        }
        self._state = st
        st.save()
        try:
            return self._up(docs, topo)
        except BaseException as exc:
            if keep_on_error:
                self.out(f"lab up failed ({exc}); left as is for inspection")
            else:
                self.out(f"lab up failed ({type(exc).__name__}: {exc}); tearing down")
                self.down(quiet=True)
            raise

    def _up(self, docs: list[manifest.Doc], topo: manifest.Topology) -> Snapshot:
        p, st = self.paths, self.state
        for d in (p.state_dir, p.log_dir, p.cni_cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        manifest.write_atomic(p.manifest_file, manifest.dump(docs))

        self.out(f"underlay: netns {p.underlay_netns}, bridge br0")
        st.add_netns(p.underlay_netns)
        netns_add(p.underlay_netns)
        run(in_netns(p.underlay_netns, "ip", "link", "add", "br0", "type", "bridge"))
        run(in_netns(p.underlay_netns, "ip", "link", "set", "br0", "up"))

        for i, node in enumerate(topo.nodes, start=1):
            ns, ip, cidr = p.node_netns(node), node_ip(i), str(pod_cidr(i))
            self.out(f"node {node}: netns {ns}, address {ip}, pods {cidr}")
            st.nodes[node] = {"index": i, "ip": ip, "cidr": cidr, "netns": ns}
            st.add_netns(ns)
            netns_add(ns)
            link = underlay_link(i)
            u = p.underlay_netns
            run(
                [
                    "ip",
                    "-n",
                    u,
                    "link",
                    "add",
                    link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ]
            )
            run(["ip", "-n", u, "link", "set", link, "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            sysctl(ns, "net.ipv4.ip_forward", "1")
        for node, info in st.nodes.items():
            for other, oinfo in st.nodes.items():
                if other != node:
                    run(["ip", "-n", info["netns"], "route", "add", oinfo["cidr"], "via",
                         oinfo["ip"]])  # fmt: skip
        st.save()

        pod_ips: dict[tuple[str, str], str] = {}
        for pod in topo.snapshot.pods:
            assert pod.node is not None
            pod_ips[(pod.namespace, pod.name)] = self._make_pod(pod.namespace, pod.name, pod.node)

        vips = manifest.allocate_vips(docs)
        node_ips = {n: str(i["ip"]) for n, i in st.nodes.items()}
        generated = manifest.render(docs, pod_ips=pod_ips, node_ips=node_ips, vips=vips)
        snap = parse_objects(generated)
        manifest.write_atomic(p.config_file, manifest.dump(generated))
        self.out(f"config: {p.config_file}")
        st.info["capture"] = self._choose_capture()
        st.save()
        self._apply_service_rules(snap)

        if self.mesh:
            self._start_mesh(snap)
            if self.capture == "enrol":
                for pod in snap.pods:  # every pod: ztunnel decides who is in the mesh
                    self._cni_mesh_add(pod.namespace, pod.name)
                self._report_enrolled()
        for pod in snap.pods:
            self._start_pod(snap, pod.namespace, pod.name)
        self._record_pods(snap)
        self.out(self.pods_table(snap))
        return snap

    def _make_pod(self, namespace: str, name: str, node: str) -> str:
        p, st = self.paths, self.state
        ns = p.pod_netns(namespace, name)
        cg = p.pod_cgroup(namespace, name)
        key = f"{namespace}/{name}"
        st.pods[key] = {"node": node, "netns": ns, "cgroup": str(cg)}
        st.add_netns(ns)
        netns_add(ns)
        st.add_cgroup(str(cg))
        cgroup_make(cg)
        node_ns = p.node_netns(node)
        cid = p.container_id(namespace, name)
        configs = [
            cni.loopback_config(p.lab),
            cni.bridge_config(p.lab, st.nodes[node]["cidr"], str(p.cni_data_dir(node))),
        ]
        rec = CniRecord(key, node, cid, ns, configs)
        st.cni.append(rec)
        st.save()
        for conf in configs:
            result = cni.invoke("ADD", conf, node_netns=node_ns, container_id=cid, pod_netns=ns)
            rec.results.append(result)
            st.save()
        ip = cni.pod_ip(rec.results[-1])
        st.pods[key]["ip"] = ip
        st.save()
        self.out(f"pod {key}: netns {ns}, {ip} on {node}")
        return ip

    @property
    def capture(self) -> str:
        """How enrolled pods' traffic reaches ztunnel: "enrol" (ztunnel's enrolment socket:
        BPF in the pod's cgroup, listeners in the pod's netns) or "node" (netfilter REDIRECT
        in the node's netns to ztunnel's node-level listeners), or "none" (no mesh)."""
        return str(self.state.info.get("capture", "none"))

    def _apply_service_rules(self, snap: Snapshot) -> None:
        rules = kubeproxy.service_rules(snap)
        for node, info in self.state.nodes.items():
            cap = None
            if self.capture == "node":
                ips = tuple(p.ip for p in snap.pods_on_node(node) if p.ip and snap.is_ambient(p))
                cap = kubeproxy.NodeCapture(ips, ips)
            table = kubeproxy.nat_table(rules, str(info["cidr"]), cap)
            run(in_netns(str(info["netns"]), "iptables-restore", "-w"), stdin=table)
        n = sum(1 for r in rules if r.endpoints)
        self.out(f"service rules (kube-proxy style) on {len(self.state.nodes)} nodes: {n} VIPs")

    # -- mesh ----------------------------------------------------------------------------

    def _choose_capture(self) -> str:
        if not self.mesh:
            return "none"
        feats = ZtunnelFeatures.probe()
        self.state.info["ztunnel_features"] = {
            "enrol_socket": feats.enrol_socket,
            "redirect": feats.redirect,
        }
        want = self.requested_capture
        if want == "enrol" and not feats.enrol_socket:
            raise LabError("capture 'enrol' needs a ztunnel with --enrol-socket (not this one)")
        if want == "auto":
            want = "enrol" if feats.enrol_socket else "node"
        self.out(
            "capture: "
            + (
                "BPF in each enrolled pod's cgroup, ztunnel listeners inside the pod"
                if want == "enrol"
                else "netfilter REDIRECT in the node netns to ztunnel's node listeners"
            )
        )
        return want

    def _start_mesh(self, snap: Snapshot) -> None:
        from certs.ca import CertificateAuthority

        p, st = self.paths, self.state
        if not (p.ca_dir / "root.pem").exists() and not any(p.ca_dir.glob("*")):
            CertificateAuthority.init(p.ca_dir, snap.trust_domain)
        self.out(f"mesh CA: {p.ca_dir} (trust domain {snap.trust_domain})")
        feats = ZtunnelFeatures.probe()
        for node in st.nodes:
            self._start_ztunnel(node, feats)
        for node in st.nodes:
            self._wait_ztunnel_ready(node)

    def _ztunnel_argv(self, node: str, feats: ZtunnelFeatures) -> list[str]:
        p, info = self.paths, self.state.nodes[node]
        args = [
            sys.executable, "-m", "ztunnel.main",
            "--node", node,
            "--config", str(p.config_file),
            "--ca-dir", str(p.ca_dir),
            "--hbone-addr", f"{info['ip']}:{HBONE_PORT}",
            "--admin-addr", f"127.0.0.1:{ADMIN_PORT}",
            "--metrics-addr", f"0.0.0.0:{METRICS_PORT}",
            "--readiness-addr", f"0.0.0.0:{READINESS_PORT}",
        ]  # fmt: skip
        if self.capture == "enrol":
            args += ["--enrol-socket", str(p.enrol_socket(node))]
            if feats.redirect:
                args += ["--redirect", "bpf"]
            if feats.pin_root_flag:
                args += [feats.pin_root_flag, str(p.lab_pins)]
        elif self.capture == "node":
            args += ["--outbound-addr", "0.0.0.0:15001", "--inbound-plaintext-addr",
                     "0.0.0.0:15006"]  # fmt: skip
        return args

    def _start_ztunnel(self, node: str, feats: ZtunnelFeatures | None = None) -> int:
        p, st = self.paths, self.state
        feats = feats or ZtunnelFeatures.probe()
        cg = p.ztunnel_cgroup(node)
        st.add_cgroup(str(cg))
        cgroup_make(cg)
        sock = p.enrol_socket(node)
        if sock.exists():
            sock.unlink()
        log = p.log_dir / f"ztunnel-{node}.log"
        argv = [
            sys.executable, "-m", "meshctl.lab.podexec",
            "--netns", str(st.nodes[node]["netns"]), "--cgroup", str(cg), "--",
            *self._ztunnel_argv(node, feats),
        ]  # fmt: skip
        pid = self._spawn(argv, log, {"NODE_NAME": node})
        st.add_proc(ProcRecord("ztunnel", node, pid, proc_start_time(pid) or 0, str(log)))
        self.out(f"ztunnel {node}: pid {pid}, hbone {st.nodes[node]['ip']}:{HBONE_PORT}")
        return pid

    def _wait_ztunnel_ready(self, node: str, timeout: float = 60.0) -> None:
        info = self.state.nodes[node]
        rec = self._proc("ztunnel", node)
        if rec is None:
            raise LabError(f"ztunnel {node} was never started")

        def probe() -> None:
            http_get_in_netns(str(info["netns"]), str(info["ip"]), READINESS_PORT,
                              "/healthz/ready", timeout=patience(1.0))  # fmt: skip
            if self.capture == "enrol" and not self.paths.enrol_socket(node).exists():
                raise OSError("enrolment socket not there yet")

        wait_ready(f"ztunnel {node} (pid {rec.pid})", rec.pid, rec.start_time, rec.log, probe,
                   timeout)  # fmt: skip

    def _cni_mesh_add(self, namespace: str, name: str) -> None:
        """The chain's last step, `ambientmesh-cni` ADD with the bridge's result as prevResult,
        as the runtime runs it on a node. (The lab runs it once the node's ztunnel is up: it
        needs pod IPs, from the earlier steps, to write ztunnel's config.)"""
        p, st = self.paths, self.state
        key = f"{namespace}/{name}"
        rec = next(r for r in st.cni if r.pod == key)
        pod = st.pods[key]
        rec.cni_path = cni.install_mesh_plugin(p.cni_bin_dir)
        # as the kubelet's runtime passes them (IgnoreUnknown: the reference plugins get the
        # same CNI_ARGS on DEL and must not refuse keys meant for another plugin)
        rec.args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name,
                    "AMBIENT_CGROUP": str(pod["cgroup"])}  # fmt: skip
        conf = cni.mesh_config(p.lab, p.enrol_socket(rec.node), p.state_dir / "cni.log",
                               p.config_file)  # fmt: skip
        rec.configs.append(conf)
        st.save()
        result = self.cni_mesh_plugin("ADD", namespace, name)
        rec.results.append(result)
        st.save()
        self.out(f"CNI ADD {cni.MESH_PLUGIN} {key}")

    def cni_mesh_plugin(self, command: str, namespace: str, name: str) -> dict[str, Any]:
        """Run `ambientmesh-cni` for a pod of the lab once more, exactly as the runtime ran it
        in the chain (its config, the bridge's result as prevResult, the same CNI_ARGS). A
        failure raises LabError carrying the plugin's CNI error."""
        p, st = self.paths, self.state
        key = f"{namespace}/{name}"
        rec = next((r for r in st.cni if r.pod == key), None)
        if rec is None or not rec.configs or rec.configs[-1].get("type") != cni.MESH_PLUGIN:
            raise LabError(f"pod {key} was not set up through {cni.MESH_PLUGIN}")
        conf = dict(rec.configs[-1])
        conf["prevResult"] = rec.results[len(rec.configs) - 2]  # the bridge's result
        return cni.invoke(
            command, conf, node_netns=p.node_netns(rec.node), container_id=rec.container_id,
            pod_netns=rec.netns, cni_path=rec.cni_path, cni_args=rec.args,
        )  # fmt: skip

    def await_enrolment(
        self, snap: Snapshot | None = None, nodes: Sequence[str] | None = None,
        timeout: float = 20.0,
    ) -> None:  # fmt: skip
        """Wait until every node's ztunnel reports each of its pods enrolled exactly when the
        snapshot says the pod is ambient: ztunnel follows label changes from its config (as it
        follows the API server on a node), and re-enrols from its own state after a restart;
        the lab only watches it happen."""
        if self.capture != "enrol":
            return
        snap = snap or self.snapshot()
        deadline = time.monotonic() + patience(timeout)
        while True:
            wrong: list[str] = []
            for node in nodes if nodes is not None else list(self.state.nodes):
                try:
                    listed = enrol_request(self.paths.enrol_socket(node), {"op": "list"})
                except LabError as exc:
                    wrong.append(str(exc))
                    continue
                enrolled = {str(r["pod"]) for r in listed.get("pods", []) if r.get("enrolled")}
                for pod in snap.pods_on_node(node):
                    want = snap.is_ambient(pod)
                    if (pod.key in enrolled) != want:
                        wrong.append(f"{pod.key} {'not ' if want else ''}enrolled on {node}")
            if not wrong:
                return
            if time.monotonic() > deadline:
                raise LabError("ztunnel's enrolment never matched the config: " + "; ".join(wrong))
            time.sleep(0.1)

    def _report_enrolled(self) -> None:
        """What each ztunnel says it enrolled (its own answer, not the lab's expectation)."""
        for node in self.state.nodes:
            reply = enrol_request(self.paths.enrol_socket(node), {"op": "list"})
            for pod in reply.get("pods", []):
                if pod.get("enrolled"):
                    listeners = ", ".join(pod.get("listeners", []))
                    self.out(f"enrolled {pod['pod']} on {node}: listening on {listeners}")

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, argv: list[str], log: Path, env: Mapping[str, str]) -> int:
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                start_new_session=True,  # own process group: down signals the whole pod
                cwd=str(self.paths.state_dir),
            )
        proc.returncode = 0  # we track it by PID from here on; silence Popen's __del__ warning
        return proc.pid

    def _proc(self, kind: str, name: str) -> ProcRecord | None:
        for r in reversed(self.state.procs):
            if r.kind == kind and r.name == name:
                return r
        return None

    def _start_pod(self, snap: Snapshot, namespace: str, name: str) -> None:
        pod = snap.pod(namespace, name)
        assert pod is not None
        info = self.state.pods[pod.key]
        log = self.paths.log_dir / f"pod-{namespace}.{name}.log"
        env = {
            "POD_NAME": name,
            "POD_NAMESPACE": namespace,
            "POD_IP": str(info.get("ip", "")),
            "NODE_NAME": str(pod.node),
        }
        pid = self._spawn(podexec_argv(str(info["netns"]), str(info["cgroup"]), pod.command),
                          log, env)  # fmt: skip
        self.state.add_proc(ProcRecord("pod", pod.key, pid, proc_start_time(pid) or 0, str(log)))
        self._wait_in_pod(pod.key, pid, str(info["netns"]), Path(str(info["cgroup"])), log)

    def _wait_in_pod(self, key: str, pid: int, netns: str, cgroup: Path, log: Path) -> None:
        """`up` returns only once every pod process sits in its cgroup and netns, so callers
        (and enrolment) never race the shim."""
        want = os.stat(netns_path(netns)).st_ino
        deadline = time.monotonic() + patience(15.0)
        while time.monotonic() < deadline:
            try:
                joined = str(pid) in (cgroup / "cgroup.procs").read_text().split()
                inside = os.stat(f"/proc/{pid}/ns/net").st_ino == want
            except OSError:
                raise LabError(f"pod {key} exited at start\n{log_tail(log)}") from None
            if joined and inside:
                return
            time.sleep(0.01)
        raise LabError(
            f"pod {key}: process {pid} never entered its netns and cgroup\n{log_tail(log)}"
        )

    def _record_pods(self, snap: Snapshot) -> None:
        for pod in snap.pods:
            info = self.state.pods.setdefault(pod.key, {})
            info["ambient"] = snap.is_ambient(pod)
            info["identity"] = snap.identity(pod)
        self.state.save()

    def exec_in_pod(
        self, namespace: str, name: str, cmd: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-off command as part of the pod (its netns and its cgroup)."""
        info = self.state.pods.get(f"{namespace}/{name}")
        if info is None:
            raise LabError(f"pod {namespace}/{name} is not in lab {self.paths.lab}")
        env = child_env({"POD_NAME": name, "POD_NAMESPACE": namespace})
        return subprocess.run(
            podexec_argv(str(info["netns"]), str(info["cgroup"]), cmd),
            capture_output=True,
            text=True,
            timeout=patience(timeout),
            env=env,
        )

    # -- live changes --------------------------------------------------------------------

    def label(self, kind: str, namespace: str | None, name: str, change: str) -> None:
        """Edit a label in the lab's manifest and regenerate the config; each ztunnel reloads
        it and enrols or unenrols the pods it was told about (by the CNI plugin) on its own, as
        it does on a node when the API server reports a label change. Returns once they have."""
        p, st = self.paths, self.state
        docs = manifest.set_label(manifest.load([p.manifest_file]), kind, namespace, name, change)
        pod_ips = {tuple(k.split("/", 1)): str(v["ip"]) for k, v in st.pods.items() if "ip" in v}
        node_ips = {n: str(i["ip"]) for n, i in st.nodes.items()}
        generated = manifest.render(
            docs,
            pod_ips=pod_ips,  # type: ignore[arg-type]
            node_ips=node_ips,
            vips=manifest.allocate_vips(docs),
        )
        snap = parse_objects(generated)
        manifest.write_atomic(p.manifest_file, manifest.dump(docs))
        manifest.write_atomic(p.config_file, manifest.dump(generated))
        self._apply_service_rules(snap)
        if self.mesh:
            self.await_enrolment(snap)
        self._record_pods(snap)

    def stop_ztunnel(self, node: str) -> None:
        rec = self._proc("ztunnel", node)
        if rec is None:
            raise LabError(f"no ztunnel recorded for node {node!r}")
        stop_process(rec.pid, rec.start_time, group=True)
        self.state.drop_proc(rec.pid)

    def restart_ztunnel(self, node: str) -> int:
        """Replace a node's ztunnel (stopped or crashed); it re-enrols that node's pods from
        the state its predecessor kept (nobody re-announces them), and the pods keep running."""
        if node not in self.state.nodes:
            raise LabError(f"node {node!r} is not in lab {self.paths.lab}")
        rec = self._proc("ztunnel", node)
        if rec is not None:
            stop_process(rec.pid, rec.start_time, group=True)
            self.state.drop_proc(rec.pid)
        pid = self._start_ztunnel(node)
        self._wait_ztunnel_ready(node)
        self.await_enrolment(nodes=[node])  # the new ztunnel restored its pods from its state
        return pid

    # -- down ----------------------------------------------------------------------------

    def down(self, *, quiet: bool = False) -> list[str]:
        """Remove everything of this lab, recorded or found by prefix. Idempotent.

        Ctrl-C and SIGTERM are held off meanwhile: an impatient second signal must not leave
        half a lab behind (every step has its own timeout instead)."""
        with _signals_deferred():
            return self._down(quiet)

    def _down(self, quiet: bool) -> list[str]:
        say = (lambda _m: None) if quiet else self.out
        p = self.paths
        st = LabState.load(p.state_file)
        problems: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                problems.append(f"{what}: {exc}")

        def stop(records: list[ProcRecord]) -> None:
            for r in records:
                say(f"stopping {r.kind} {r.name} (pid {r.pid})")
                step(f"stop {r.kind} {r.name}",
                     lambda r=r: stop_process(r.pid, r.start_time, group=True))  # type: ignore[misc]  # fmt: skip

        # as a node deletes pods: containers stop, then the runtime runs the CNI chain's DEL
        # (ambientmesh-cni first: ztunnel, still running, unenrols the pod), then the node goes
        if st is not None:
            stop([r for r in st.procs if r.kind == "pod"])
            step("kill leftover pod processes", lambda: cgroup_kill_all(p.lab_cgroup / "pods"))
            for rec in reversed(st.cni):
                node_ns = p.node_netns(rec.node)
                if not (netns_exists(node_ns) and netns_exists(rec.netns)):
                    continue
                say(f"CNI DEL {rec.pod}")
                for conf, res in reversed(list(zip(rec.configs, rec.results + [{}] * 2,
                                                   strict=False))):  # fmt: skip
                    step(
                        f"CNI DEL {rec.pod} {conf.get('type')}",
                        lambda c=conf, r=res, rec=rec, n=node_ns: cni.invoke(  # type: ignore[misc]
                            "DEL", cni.del_config(c, r), node_netns=n,
                            container_id=rec.container_id, pod_netns=rec.netns,
                            cni_path=rec.cni_path, cni_args=rec.args,
                        ),
                    )  # fmt: skip
            stop([r for r in st.procs if r.kind != "pod"])
        step("kill leftover processes", lambda: cgroup_kill_all(p.lab_cgroup))
        names = set(netns_list(p.prefix)) | set(st.netns if st else [])
        # pods first, then nodes, then the underlay: links die with their namespace
        order = sorted(names, key=lambda n: (0 if "-pod-" in n else 1 if "-node-" in n else 2, n))
        for n in order:
            if netns_exists(n):
                say(f"removing netns {n}")
            step(f"netns {n}", lambda n=n: netns_del(n))  # type: ignore[misc]
        if p.lab_pins.exists():
            say(f"removing BPF pins {p.lab_pins}")
            step("bpf detach", lambda: _detach_programs(p, st))
            step("bpf pins", lambda: _rm_pins(p.lab_pins))
        if p.lab_cgroup.exists():
            say(f"removing cgroups {p.lab_cgroup}")
            step("cgroups", lambda: cgroup_remove_tree(p.lab_cgroup))
        step("state dir", lambda: shutil.rmtree(p.state_dir, ignore_errors=True))
        if not problems:
            step("state file", lambda: p.state_file.unlink(missing_ok=True))
        # the shared parents (/sys/fs/bpf/ambientmesh, the cgroup, /run/ambientmesh) go with
        # the last lab: rmdir removes only an empty directory, so another lab's stay
        for parent in (p.lab_pins.parent, p.lab_cgroup.parent, p.state_file.parent,
                       p.state_dir.parent):  # fmt: skip
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._state = None
        for pr in problems:
            self.out(f"warning: {pr}")
        return problems

    # -- reporting -----------------------------------------------------------------------

    def pods_table(self, snap: Snapshot | None = None) -> str:
        snap = snap or self.snapshot()
        rows = [("POD", "NODE", "IP", "AMBIENT", "IDENTITY")]
        for pod in snap.pods:
            rows.append(
                (
                    pod.key,
                    str(pod.node),
                    str(pod.ip),
                    "yes" if snap.is_ambient(pod) else "no",
                    snap.identity(pod) if snap.is_ambient(pod) else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in rows)  # fmt: skip

    def status(self) -> dict[str, Any]:
        st = self.state
        procs = [
            {"kind": r.kind, "name": r.name, "pid": r.pid,
             "alive": proc_alive(r.pid, r.start_time)}
            for r in st.procs
        ]  # fmt: skip
        return {"name": st.name, "nodes": st.nodes, "pods": st.pods, "procs": procs,
                "info": st.info}  # fmt: skip

    def ztunnel_metrics(self, node: str) -> str:
        info = self.state.nodes[node]
        return http_get_in_netns(str(info["netns"]), "127.0.0.1", METRICS_PORT, "/metrics")

    def ztunnel_access_log(self, node: str) -> list[dict[str, Any]]:
        rec = self._proc("ztunnel", node)
        log = Path(rec.log) if rec else self.paths.log_dir / f"ztunnel-{node}.log"
        out: list[dict[str, Any]] = []
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if "mesh.access" not in line or "{" not in line:
                continue
            try:
                out.append(json.loads(line[line.index("{") :]))
            except ValueError:
                continue
        return out


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda n, _f: got.append(n)) for sig in _DEFERRED}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got:
            raise KeyboardInterrupt


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _detach_programs(p: LabPaths, st: LabState | None) -> None:
    """Detach every node's programs from ztunnel's and the pods' cgroups before the cgroups
    go. Removing a cgroup detaches too, but the kernel frees a removed cgroup (and with it
    the programs and their maps) only once the last socket accounted to it is gone, which a
    connection lingering in FIN_WAIT can delay by a minute; detaching frees them now."""
    from bpf.loader import NODE_PROGRAMS, POD_PROGRAMS, BpfRedirector, BpfUnavailable

    if not p.lab_pins.is_dir():
        return
    pods = list(st.pods.values()) if st is not None else []
    for node_pins in sorted(d for d in p.lab_pins.iterdir() if d.is_dir()):
        node = node_pins.name
        r = BpfRedirector(pin_root=str(node_pins), ztunnel_cgroup=str(p.ztunnel_cgroup(node)))
        try:
            r.open_pinned()
        except BpfUnavailable:
            continue  # nothing loaded for this node
        for cg, names in [
            (str(p.ztunnel_cgroup(node)), NODE_PROGRAMS),
            *[(str(i["cgroup"]), POD_PROGRAMS) for i in pods if i.get("node") == node],
        ]:  # fmt: skip
            if os.path.isdir(cg):
                r.detach(cg, names)
        r.close()


def _rm_pins(path: Path) -> None:
    for d, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(d, f))
        for sub in dirs:
            os.rmdir(os.path.join(d, sub))
    os.rmdir(path)


def enrol_request(path: Path, msg: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One JSON line to ztunnel's enrolment socket, one JSON line back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(patience(timeout))
    try:
        s.connect(str(path))
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        raise LabError(f"enrolment socket {path}: {exc}") from exc
    finally:
        s.close()
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise LabError(f"enrolment socket {path}: bad reply {buf[:200]!r}") from None
    return reply
