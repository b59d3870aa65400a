"""The mesh in a lab: one ztunnel per node, in the node's netns and a cgroup of its own, with
the lab's CA; how pods' traffic reaches it (capture); and watching it enrol the pods the
config puts in the mesh, including after a restart."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.config.snapshot import Snapshot
from mesh.ports import (
    ADMIN_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
)
from meshctl.lab import container
from meshctl.lab.context import LabContext
from meshctl.lab.processes import Processes
from meshctl.lab.state import ProcRecord
from meshctl.lab.system import (
    LabError,
    cgroup_make,
    http_get_in_netns,
    patience,
    proc_start_time,
    stop_process,
    wait_ready,
)


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


class Ztunnels:
    def __init__(self, ctx: LabContext, procs: Processes, extra_args: Sequence[str] = ()) -> None:
        """`extra_args`: appended to every ztunnel's command line (a benchmark mode's own
        flags, e.g. `--ktls on`), so one lab shape serves every variant of ztunnel."""
        self.ctx = ctx
        self.procs = procs
        self.extra_args = tuple(extra_args)

    def choose_capture(self, requested: str) -> str:
        if not self.ctx.mesh:
            return "none"
        feats = ZtunnelFeatures.probe()
        self.ctx.state.info["ztunnel_features"] = {
            "enrol_socket": feats.enrol_socket,
            "redirect": feats.redirect,
        }
        want = requested
        if want == "enrol" and not feats.enrol_socket:
            raise LabError("capture 'enrol' needs a ztunnel with --enrol-socket (not this one)")
        if want == "auto":
            want = "enrol" if feats.enrol_socket else "node"
        self.ctx.out(
            "capture: "
            + (
                "BPF in each enrolled pod's cgroup, ztunnel listeners inside the pod"
                if want == "enrol"
                else "netfilter REDIRECT in the node netns to ztunnel's node listeners"
            )
        )
        return want

    def start_all(self, snap: Snapshot) -> None:
        from certs.ca import CertificateAuthority

        p, st = self.ctx.paths, self.ctx.state
        if not (p.ca_dir / "root.pem").exists() and not any(p.ca_dir.glob("*")):
            CertificateAuthority.init(p.ca_dir, snap.trust_domain)
        self.ctx.out(f"mesh CA: {p.ca_dir} (trust domain {snap.trust_domain})")
        feats = ZtunnelFeatures.probe()
        for node in st.nodes:
            self.start(node, feats)
        for node in st.nodes:
            self.wait_ready(node)

    def argv(self, node: str, feats: ZtunnelFeatures) -> list[str]:
        p, info = self.ctx.paths, self.ctx.state.nodes[node]
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
        capture = self.ctx.capture
        if capture == "enrol":
            args += ["--enrol-socket", str(p.enrol_socket(node))]
            if feats.redirect:
                args += ["--redirect", "bpf"]
            if feats.pin_root_flag:
                args += [feats.pin_root_flag, str(p.lab_pins)]
        elif capture == "node":
            args += ["--outbound-addr", f"0.0.0.0:{OUTBOUND_PORT}", "--inbound-plaintext-addr",
                     f"0.0.0.0:{INBOUND_PLAINTEXT_PORT}"]  # fmt: skip
        return [*args, *self.extra_args]

    def start(self, node: str, feats: ZtunnelFeatures | None = None) -> int:
        p, st = self.ctx.paths, self.ctx.state
        feats = feats or ZtunnelFeatures.probe()
        cg = p.ztunnel_cgroup(node)
        st.add_cgroup(str(cg))
        cgroup_make(cg)
        sock = p.enrol_socket(node)
        if sock.exists():
            sock.unlink()
        log = p.log_dir / f"ztunnel-{node}.log"
        img = container.lab_image(st.info)
        if img is not None:  # from the image, as the DaemonSet runs it
            c = container.lab_ztunnel(
                img, f"{p.prefix}zt-{node}", self.argv(node, feats),
                bundle=p.state_dir / "bundles" / f"ztunnel-{node}",
                node_netns=str(st.nodes[node]["netns"]), cgroup=cg, state_dir=p.state_dir,
                env={"NODE_NAME": node},
            )  # fmt: skip
            c.delete()  # what a hard-killed predecessor left
            container.record(st.info, c)
            st.save()
            argv = c.argv()
        else:
            argv = [
                sys.executable, "-m", "meshctl.lab.podexec",
                "--netns", str(st.nodes[node]["netns"]), "--cgroup", str(cg), "--",
                *self.argv(node, feats),
            ]  # fmt: skip
        pid = self.procs.spawn(argv, log, {"NODE_NAME": node})
        st.add_proc(ProcRecord("ztunnel", node, pid, proc_start_time(pid) or 0, str(log)))
        self.ctx.out(f"ztunnel {node}: pid {pid}, hbone {st.nodes[node]['ip']}:{HBONE_PORT}")
        return pid

    def wait_ready(self, node: str, timeout: float = 60.0) -> None:
        info = self.ctx.state.nodes[node]
        rec = self.procs.find("ztunnel", node)
        if rec is None:
            raise LabError(f"ztunnel {node} was never started")

        def probe() -> None:
            http_get_in_netns(str(info["netns"]), str(info["ip"]), READINESS_PORT,
                              "/healthz/ready", timeout=patience(1.0))  # fmt: skip
            if self.ctx.capture == "enrol" and not self.ctx.paths.enrol_socket(node).exists():
                raise OSError("enrolment socket not there yet")

        wait_ready(f"ztunnel {node} (pid {rec.pid})", rec.pid, rec.start_time, rec.log, probe,
                   timeout)  # fmt: skip

    def stop(self, node: str) -> None:
        rec = self.procs.find("ztunnel", node)
        if rec is None:
            raise LabError(f"no ztunnel recorded for node {node!r}")
        stop_process(rec.pid, rec.start_time, group=True)
        self.ctx.state.drop_proc(rec.pid)

    def restart(self, node: str) -> int:
        """Replace a node's ztunnel (stopped or crashed); it re-enrols that node's pods from
        the state its predecessor kept (nobody re-announces them), and the pods keep running."""
        if node not in self.ctx.state.nodes:
            raise LabError(f"node {node!r} is not in lab {self.ctx.paths.lab}")
        rec = self.procs.find("ztunnel", node)
        if rec is not None:
            stop_process(rec.pid, rec.start_time, group=True)
            self.ctx.state.drop_proc(rec.pid)
        pid = self.start(node)
        self.wait_ready(node)
        self.await_enrolment(nodes=[node])  # the new ztunnel restored its pods from its state
        return pid

    def await_enrolment(
        self, snap: Snapshot | None = None, nodes: Sequence[str] | None = None,
        timeout: float = 20.0,
    ) -> None:  # fmt: skip
        """Wait until every node's ztunnel reports each of its pods enrolled exactly when the
        snapshot says the pod is ambient: ztunnel follows label changes from its config (as it
        follows the API server on a node), and re-enrols from its own state after a restart;
        the lab only watches it happen."""
        if self.ctx.capture != "enrol":
            return
        snap = snap or self.ctx.snapshot()
        deadline = time.monotonic() + patience(timeout)
        while True:
            wrong: list[str] = []
            for node in nodes if nodes is not None else list(self.ctx.state.nodes):
                try:
                    listed = enrol_request(self.ctx.paths.enrol_socket(node), {"op": "list"})
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

    def report_enrolled(self) -> None:
        """What each ztunnel says it enrolled (its own answer, not the lab's expectation)."""
        for node in self.ctx.state.nodes:
            reply = enrol_request(self.ctx.paths.enrol_socket(node), {"op": "list"})
            for pod in reply.get("pods", []):
                if pod.get("enrolled"):
                    listeners = ", ".join(pod.get("listeners", []))
                    self.ctx.out(f"enrolled {pod['pod']} on {node}: listening on {listeners}")

    def metrics(self, node: str) -> str:
        info = self.ctx.state.nodes[node]
        return http_get_in_netns(str(info["netns"]), "127.0.0.1", METRICS_PORT, "/metrics")

    def access_log(self, node: str) -> list[dict[str, Any]]:
        rec = self.procs.find("ztunnel", node)
        log = Path(rec.log) if rec else self.ctx.paths.log_dir / f"ztunnel-{node}.log"
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
