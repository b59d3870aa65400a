"""One lab: bring it up from a manifest, change labels live, restart a ztunnel, tear it down.

Order matters on the way up (underlay, nodes, pod netns + CNI, config, service rules, mesh,
then the pods' commands, then enrolment) and is reversed on the way down. Each object goes into
the state file before it exists, so `down` after a crash at any step still finds it; `down`
also scans for the lab's name prefix to catch anything a crash kept out of the file.

`Lab` is the order of those steps and the lab's public face; the steps themselves belong to
its parts, each an object over the shared `LabContext` (paths, output, state file):
`Topology` (underlay, nodes, pod netns through the CNI chain, service rules), `Processes`
(spawning, finding and running things in pods), `Ztunnels` (the mesh: capture, ztunnel per
node, enrolment), `MeshCni` (the chain's `ambientmesh-cni` step) and `teardown`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from meshctl.image import default_cache_dir
from meshctl.lab import container, manifest
from meshctl.lab.context import LabContext
from meshctl.lab.enrolment import MeshCni
from meshctl.lab.names import LabPaths, check_lab_name
from meshctl.lab.processes import Processes
from meshctl.lab.state import LabState
from meshctl.lab.system import LabError, netns_list, proc_alive
from meshctl.lab.teardown import signals_deferred, teardown
from meshctl.lab.topology import Topology
from meshctl.lab.ztunnels import Ztunnels


class Lab:
    def __init__(
        self,
        paths: LabPaths,
        *,
        out: Callable[[str], None] = print,
        mesh: bool = True,
        capture: str = "auto",
        image: Path | None = None,
        ztunnel_args: Sequence[str] = (),
    ) -> None:
        """`image`: an archive from `meshctl image build`; each node's ztunnel and the
        waypoints then run from it with an OCI runtime (meshctl.lab.container) instead of
        from this tree on the host. `ztunnel_args`: extra flags for every node's ztunnel
        (the benchmark's per-mode switches, such as `--ktls off|on`)."""
        check_lab_name(paths.lab)
        if capture not in ("auto", "enrol", "node"):
            raise ValueError(f"capture {capture!r}: expected auto, enrol or node")
        self.ctx = LabContext(paths, out, mesh=mesh)
        self.requested_capture = capture
        self.image = image
        self.topology = Topology(self.ctx)
        self.procs = Processes(self.ctx)
        self.ztunnels = Ztunnels(self.ctx, self.procs, ztunnel_args)
        self.mesh_cni = MeshCni(self.ctx)

    @property
    def paths(self) -> LabPaths:
        return self.ctx.paths

    @property
    def out(self) -> Callable[[str], None]:
        return self.ctx.out

    @property
    def mesh(self) -> bool:
        return self.ctx.mesh

    @property
    def state(self) -> LabState:
        return self.ctx.state

    @property
    def capture(self) -> str:
        """How enrolled pods' traffic reaches ztunnel (see `LabContext.capture`)."""
        return self.ctx.capture

    def exists(self) -> bool:
        return self.paths.state_file.exists()

    def snapshot(self) -> Snapshot:
        return self.ctx.snapshot()

    # -- up ------------------------------------------------------------------------------

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
        image_info = None
        if self.image is not None:
            self.out(f"image: {self.image} (unpacking once per image)")
            try:
                image_info = container.lab_image_info(self.image, default_cache_dir() / "rootfs")
            except container.ImageError as exc:
                raise LabError(f"--image {self.image}: {exc}") from None
            self.out(f"image: {', '.join(image_info['refs'])} run by {image_info['runtime']}")
        self.topology.ensure_filesystems()
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
        if image_info is not None:
            st.info["image"] = image_info
        self.ctx.begin(st)
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

        self.topology.build_nodes(topo.nodes)

        pod_ips: dict[tuple[str, str], str] = {}
        for pod in topo.snapshot.pods:
            assert pod.node is not None
            pod_ips[(pod.namespace, pod.name)] = self.topology.make_pod(
                pod.namespace, pod.name, pod.node
            )

        vips = manifest.allocate_vips(docs)
        node_ips = {n: str(i["ip"]) for n, i in st.nodes.items()}
        generated = manifest.render(docs, pod_ips=pod_ips, node_ips=node_ips, vips=vips)
        snap = parse_objects(generated)
        manifest.write_atomic(p.config_file, manifest.dump(generated))
        self.out(f"config: {p.config_file}")
        st.info["capture"] = self.ztunnels.choose_capture(self.requested_capture)
        st.save()
        self.topology.apply_service_rules(snap)

        if self.mesh:
            self.ztunnels.start_all(snap)
            if self.capture == "enrol":
                for pod in snap.pods:  # every pod: ztunnel decides who is in the mesh
                    self.mesh_cni.add(pod.namespace, pod.name)
                self.ztunnels.report_enrolled()
        for pod in snap.pods:
            self.procs.start_pod(snap, pod.namespace, pod.name)
        self.topology.record_pods(snap)
        self.out(self.pods_table(snap))
        return snap

    # -- what tests, demos and the CLI do with a lab that is up --------------------------

    def cni_mesh_plugin(self, command: str, namespace: str, name: str) -> dict[str, Any]:
        return self.mesh_cni.run(command, namespace, name)

    def await_enrolment(
        self, snap: Snapshot | None = None, nodes: Sequence[str] | None = None,
        timeout: float = 20.0,
    ) -> None:  # fmt: skip
        self.ztunnels.await_enrolment(snap, nodes, timeout)

    def exec_in_pod(
        self, namespace: str, name: str, cmd: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.procs.exec_in_pod(namespace, name, cmd, timeout=timeout)

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
        self.topology.apply_service_rules(snap)
        if self.mesh:
            self.await_enrolment(snap)
        self.topology.record_pods(snap)

    def stop_ztunnel(self, node: str) -> None:
        self.ztunnels.stop(node)

    def restart_ztunnel(self, node: str) -> int:
        return self.ztunnels.restart(node)

    def ztunnel_metrics(self, node: str) -> str:
        return self.ztunnels.metrics(node)

    def ztunnel_access_log(self, node: str) -> list[dict[str, Any]]:
        return self.ztunnels.access_log(node)

    # -- down ----------------------------------------------------------------------------

    def down(self, *, quiet: bool = False) -> list[str]:
        """Remove everything of this lab, recorded or found by prefix. Idempotent.

        Ctrl-C and SIGTERM are held off meanwhile: an impatient second signal must not leave
        half a lab behind (every step has its own timeout instead)."""
        with signals_deferred():
            problems = teardown(self.paths, (lambda _m: None) if quiet else self.out)
        self.ctx.forget()
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
