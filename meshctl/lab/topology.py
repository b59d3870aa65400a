"""The lab's network, as a cluster's nodes and CNI would build it: an underlay bridge, one netns
per node with a veth on it and routes to the other nodes' pod CIDRs, one netns and cgroup per
pod wired by the reference CNI plugins (loopback, bridge), and kube-proxy style service rules.

Every object goes into the state file before it is made, so teardown after a crash at any
step still finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from bpf.mounts import MountUnavailable, ensure_bpffs, ensure_cgroup2
from mesh.config.snapshot import Snapshot
from meshctl.lab import cni, kubeproxy
from meshctl.lab.context import LabContext
from meshctl.lab.names import node_ip, pod_cidr, underlay_link
from meshctl.lab.state import CniRecord
from meshctl.lab.system import LabError, cgroup_make, in_netns, netns_add, run, sysctl


class Topology:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def ensure_filesystems(self) -> None:
        """cgroup v2 for the pods and ztunnels, bpffs for the pins: mounted if a fresh host
        has none yet (ztunnel's loader would mount bpffs too; doing it here says so once)."""
        paths = self.ctx.paths
        try:
            root, done = ensure_cgroup2()
            if self.ctx.mesh:
                done += ensure_bpffs(str(paths.pin_root))
        except MountUnavailable as exc:
            raise LabError(str(exc)) from None
        for what in done:
            self.ctx.out(f"{what} (nothing was mounted there)")
        if not str(paths.cgroup_root).startswith(root.rstrip("/") + "/"):
            raise LabError(
                f"cgroup root {paths.cgroup_root} is not on cgroup v2 (mounted at {root}); "
                f"pass --cgroup-root {root}/ambientmesh"
            )

    def build_nodes(self, nodes: Sequence[str]) -> None:
        """The underlay bridge, the nodes on it, and each node's routes to the others' pods."""
        p, st = self.ctx.paths, self.ctx.state
        self.ctx.out(f"underlay: netns {p.underlay_netns}, bridge br0")
        st.add_netns(p.underlay_netns)
        netns_add(p.underlay_netns)
        run(in_netns(p.underlay_netns, "ip", "link", "add", "br0", "type", "bridge"))
        run(in_netns(p.underlay_netns, "ip", "link", "set", "br0", "up"))

        for i, node in enumerate(nodes, start=1):
            ns, ip, cidr = p.node_netns(node), node_ip(i), str(pod_cidr(i))
            self.ctx.out(f"node {node}: netns {ns}, address {ip}, pods {cidr}")
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

    def make_pod(self, namespace: str, name: str, node: str) -> str:
        """A pod's netns and cgroup, wired by the CNI chain's reference plugins; its IP."""
        p, st = self.ctx.paths, self.ctx.state
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
        self.ctx.out(f"pod {key}: netns {ns}, {ip} on {node}")
        return ip

    def apply_service_rules(self, snap: Snapshot) -> None:
        st = self.ctx.state
        rules = kubeproxy.service_rules(snap)
        for node, info in st.nodes.items():
            cap = None
            if self.ctx.capture == "node":
                ips = tuple(p.ip for p in snap.pods_on_node(node) if p.ip and snap.is_ambient(p))
                cap = kubeproxy.NodeCapture(ips, ips)
            table = kubeproxy.nat_table(rules, str(info["cidr"]), cap)
            run(in_netns(str(info["netns"]), "iptables-restore", "-w"), stdin=table)
        n = sum(1 for r in rules if r.endpoints)
        self.ctx.out(f"service rules (kube-proxy style) on {len(st.nodes)} nodes: {n} VIPs")

    def record_pods(self, snap: Snapshot) -> None:
        """What the config says of each pod (in the mesh? which identity?), for `status`."""
        st = self.ctx.state
        for pod in snap.pods:
            info = st.pods.setdefault(pod.key, {})
            info["ambient"] = snap.is_ambient(pod)
            info["identity"] = snap.identity(pod)
        st.save()
