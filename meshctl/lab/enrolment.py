"""The CNI chain's last link in a lab: `ambientmesh-cni`, run for a pod as a node's runtime
runs it (the bridge's result as prevResult, the kubelet's CNI_ARGS), which hands the pod to
its node's ztunnel through the enrolment socket."""

from __future__ import annotations

from typing import Any

from meshctl.lab import cni
from meshctl.lab.context import LabContext
from meshctl.lab.system import LabError


class MeshCni:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def add(self, namespace: str, name: str) -> None:
        """The chain's last step, `ambientmesh-cni` ADD with the bridge's result as prevResult,
        as the runtime runs it on a node. (The lab runs it once the node's ztunnel is up: it
        needs pod IPs, from the earlier steps, to write ztunnel's config.)"""
        p, st = self.ctx.paths, self.ctx.state
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
        result = self.run("ADD", namespace, name)
        rec.results.append(result)
        st.save()
        self.ctx.out(f"CNI ADD {cni.MESH_PLUGIN} {key}")

    def run(self, command: str, namespace: str, name: str) -> dict[str, Any]:
        """Run `ambientmesh-cni` for a pod of the lab once more, exactly as the runtime ran it
        in the chain (its config, the bridge's result as prevResult, the same CNI_ARGS). A
        failure raises LabError carrying the plugin's CNI error."""
        p, st = self.ctx.paths, self.ctx.state
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
