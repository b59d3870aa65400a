"""The waypoint controller: each Gateway of class `waypoint` → ServiceAccount + Deployment +
Service running our `waypoint`, with status reported on the Gateway (as Istio's does).

* The Gateway watch reuses `KubeSource` (resourceVersions, 410 re-list, backoff) restricted to
  Gateways; every change, plus a periodic resync (someone deleted our Deployment), triggers a
  reconcile of every waypoint Gateway. Reconciling is idempotent: objects carry a hash of what
  we want in an annotation, and only a changed hash costs a PATCH.
* Owned objects carry an ownerReference to the Gateway, so deleting the Gateway lets the
  garbage collector remove them; the controller never deletes anything itself.
* The ServiceAccount is named after the Gateway: the waypoint's SPIFFE identity is
  `spiffe://<td>/ns/<ns>/sa/<gateway>`, which is what AuthorizationPolicies name.
* Waypoint pods are labelled `istio.io/dataplane-mode: none` (a waypoint is never redirected
  into ztunnel; it speaks HBONE itself) and with `gateway.networking.k8s.io/gateway-name`, the
  label the snapshot uses to find a waypoint's pods.
* Each waypoint reads its config from the API server (`waypoint --kube`), so its
  ServiceAccount needs read access cluster-wide: the ClusterRole `ambientmesh-waypoint`
  (rendered by `meshctl install`) and one ClusterRoleBinding of the same name, whose subjects
  the controller keeps equal to the ServiceAccounts of the current waypoint Gateways. A
  cluster-scoped object cannot be owned by a namespaced Gateway, so the garbage collector
  cannot remove a deleted waypoint's subject: the reconcile does, by updating the list
  (the binding itself is never deleted). The pods also serve the read-only flow stream on
  the flows port, which `meshctl observe --kube` reads through pods/proxy.
* Status: `Accepted` once the Gateway is ours and valid, `Programmed` once the Service has an
  address (reported in `status.addresses`), with `observedGeneration`; conditions keep their
  `lastTransitionTime` while unchanged, so status writes happen only on real changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client as k8s

from mesh.config.kube import KubeSource, WatchedKind, load_api_client
from mesh.config.model import (
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    GATEWAY_NAME_LABEL,
    WAYPOINT_GATEWAY_CLASS,
)
from mesh.config.source import ConfigStore
from mesh.ports import CA_PORT, FLOWS_PORT, HBONE_PORT, READINESS_PORT

log = logging.getLogger("controller.waypoint")

__all__ = [
    "CONTROLLER_NAME",
    "WAYPOINT_CLUSTER_ROLE",
    "WaypointController",
    "binding_subjects",
    "desired_binding",
    "desired_objects",
    "main",
]

CONTROLLER_NAME = "ambientmesh.io/waypoint-controller"
HASH_ANNOTATION = "ambientmesh.io/config-hash"
GATEWAY_KIND = WatchedKind("Gateway", "gateway.networking.k8s.io/v1", "gateways")
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_CA_ADDRESS = f"ambientmesh-ca.ambientmesh-system.svc:{CA_PORT}"
CA_ROOT_CONFIGMAP = "ambientmesh-ca-root"  # in the mesh's namespace (see meshctl install)
CA_ROOT_KEY = "root-cert.pem"
CA_TOKEN_AUDIENCE = "ambientmesh-ca"
# the ClusterRole `meshctl install` renders (meshctl.install.controller.WAYPOINT_CLUSTER_ROLE),
# and the ClusterRoleBinding to it the controller keeps
WAYPOINT_CLUSTER_ROLE = "ambientmesh-waypoint"
RBAC_GROUP = "rbac.authorization.k8s.io"

Obj = dict[str, Any]


def _hbone_port(gw: Mapping[str, Any]) -> int:
    for li in gw.get("spec", {}).get("listeners") or []:
        if isinstance(li, Mapping) and li.get("protocol") == "HBONE":
            port = li.get("port", HBONE_PORT)
            if isinstance(port, int) and 1 <= port <= 65535:
                return port
    return HBONE_PORT


def _hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def desired_objects(
    gw: Mapping[str, Any],
    *,
    image: str,
    trust_domain: str,
    ca_address: str = DEFAULT_CA_ADDRESS,
    ca_root_pem: str = "",
) -> list[Obj]:
    """The ServiceAccount, Deployment and Service for one waypoint Gateway, and a ConfigMap
    with the mesh's trust bundle: a pod can mount ConfigMaps of its own namespace only, so
    the controller copies the bundle next to each waypoint (as istiod copies its root cert
    into every namespace). The waypoint gets its SVID from the CA service with its projected
    service-account token (the CA gives a service account its own identity only)."""
    meta = gw["metadata"]
    ns, name = meta["namespace"], meta["name"]
    port = _hbone_port(gw)
    owner = {
        "apiVersion": gw.get("apiVersion", GATEWAY_KIND.api_version),
        "kind": "Gateway",
        "name": name,
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = {
        GATEWAY_NAME_LABEL: name,
        "app.kubernetes.io/managed-by": "ambientmesh-waypoint-controller",
    }

    def m() -> Obj:
        return {
            "name": name,
            "namespace": ns,
            "labels": dict(labels),
            "ownerReferences": [dict(owner)],
        }

    sa: Obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": m()}
    pod_labels = {**labels, DATAPLANE_MODE_LABEL: DATAPLANE_MODE_NONE}
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": m(),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 30,
                    "volumes": [
                        {"name": "ca-root", "configMap": {"name": f"{name}-ca-root"}},
                        {
                            "name": "ca-token",
                            "projected": {
                                "sources": [
                                    {
                                        "serviceAccountToken": {
                                            "audience": CA_TOKEN_AUDIENCE,
                                            "expirationSeconds": 3600,
                                            "path": "ca-token",
                                        }
                                    }
                                ]
                            },
                        },
                    ],
                    "containers": [
                        {
                            "name": "waypoint",
                            "image": image,
                            "command": ["waypoint"],
                            "args": [
                                "--name",
                                name,
                                "--namespace",
                                ns,
                                "--trust-domain",
                                trust_domain,
                                "--hbone-addr",
                                f"0.0.0.0:{port}",
                                "--readiness-addr",
                                f"0.0.0.0:{READINESS_PORT}",
                                "--ca",
                                ca_address,
                                "--ca-bundle",
                                f"/etc/ambientmesh/ca-root/{CA_ROOT_KEY}",
                                "--token-file",
                                "/var/run/secrets/tokens/ca-token",
                                "--kube",
                                "--flows-addr",
                                f"0.0.0.0:{FLOWS_PORT}",
                            ],
                            "volumeMounts": [
                                {
                                    "name": "ca-root",
                                    "mountPath": "/etc/ambientmesh/ca-root",
                                    "readOnly": True,
                                },
                                {
                                    "name": "ca-token",
                                    "mountPath": "/var/run/secrets/tokens",
                                    "readOnly": True,
                                },
                            ],
                            "ports": [
                                {"name": "hbone", "containerPort": port},
                                {"name": "http-ready", "containerPort": READINESS_PORT},
                                {"name": "http-flows", "containerPort": FLOWS_PORT},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz/ready", "port": READINESS_PORT},
                                "periodSeconds": 5,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                                "runAsUser": 1337,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": m(),
        "spec": {
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {
                    "name": "mesh",
                    "port": port,
                    "targetPort": port,
                    "protocol": "TCP",
                    "appProtocol": "hbone",
                }
            ],
        },
    }
    root: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**m(), "name": f"{name}-ca-root"},
        "data": {CA_ROOT_KEY: ca_root_pem},
    }
    for o in (sa, dep, svc, root):
        o["metadata"]["annotations"] = {HASH_ANNOTATION: _hash(o)}
    return [sa, dep, svc, root]


def binding_subjects(gateways: Sequence[Mapping[str, Any]]) -> list[Obj]:
    """The waypoint ServiceAccounts (named after their Gateway) of the waypoint Gateways, in a
    stable order so an unchanged set is an unchanged binding."""
    seen = set()
    for gw in gateways:
        meta = gw.get("metadata") or {}
        if (gw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
            continue
        ns, name = meta.get("namespace"), meta.get("name")
        if isinstance(ns, str) and isinstance(name, str) and ns and name:
            seen.add((ns, name))
    return [{"kind": "ServiceAccount", "name": name, "namespace": ns} for ns, name in sorted(seen)]


def desired_binding(gateways: Sequence[Mapping[str, Any]]) -> Obj:
    """The ClusterRoleBinding giving every waypoint read access to its config."""
    b: Obj = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": WAYPOINT_CLUSTER_ROLE,
            "labels": {"app.kubernetes.io/managed-by": "ambientmesh-waypoint-controller"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": WAYPOINT_CLUSTER_ROLE},
        "subjects": binding_subjects(gateways),
    }
    b["metadata"]["annotations"] = {HASH_ANNOTATION: _hash(b)}
    return b


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(old: Sequence[Mapping[str, Any]], new: Sequence[Obj]) -> list[Obj]:
    """Keep lastTransitionTime for conditions whose status did not change."""
    prev = {c.get("type"): c for c in old if isinstance(c, Mapping)}
    out = []
    for c in new:
        p = prev.get(c["type"])
        if p is not None and p.get("status") == c["status"]:
            c["lastTransitionTime"] = p.get("lastTransitionTime", c["lastTransitionTime"])
        out.append(c)
    return out


class WaypointController:
    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        image: str,
        trust_domain: str = "cluster.local",
        resync: float = 60.0,
        debounce: float = 0.1,
        ca_address: str = DEFAULT_CA_ADDRESS,
        mesh_namespace: str = "ambientmesh-system",
    ) -> None:
        self.api = api_client
        self.image = image
        self.trust_domain = trust_domain
        self.ca_address = ca_address
        self.mesh_namespace = mesh_namespace
        self.resync = resync
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.rbac = k8s.RbacAuthorizationV1Api(api_client)
        self.store = ConfigStore()
        self.source = KubeSource(api_client, self.store, kinds=(GATEWAY_KIND,), debounce=debounce)
        self.reconciles = 0
        self._kick = asyncio.Event()  # a Gateway changed: reconcile before the next resync

    def ready(self) -> bool:
        return self.source.ready.is_set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.source.run(), name="gateway-watch")
            tg.create_task(self._watch_store(), name="gateway-changes")
            tg.create_task(self._loop(), name="waypoint-reconcile")

    async def _watch_store(self) -> None:
        async for _ in self.store.subscribe():
            self._kick.set()

    async def _loop(self) -> None:
        await self.source.ready.wait()
        while True:
            self._kick.clear()
            await self.reconcile_all()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # races the inner wait completing, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync):
                    await self._kick.wait()

    async def reconcile_all(self) -> None:
        self.reconciles += 1
        gateways = list(self.source.objects_of("Gateway"))
        try:
            await self.reconcile_binding(gateways)
        except (k8s.ApiException, OSError, ValueError) as exc:
            log.error("ClusterRoleBinding %s: reconcile failed: %s", WAYPOINT_CLUSTER_ROLE, exc)
        for gw in gateways:
            if gw.get("spec", {}).get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
                continue
            key = f"{gw['metadata'].get('namespace')}/{gw['metadata'].get('name')}"
            try:
                await self.reconcile(gw)
            except (k8s.ApiException, OSError, ValueError, KeyError) as exc:
                # one Gateway's trouble must not starve the others; the resync retries it
                log.error("waypoint %s: reconcile failed: %s", key, exc)

    async def _ca_root(self) -> str:
        """The bundle from the mesh's ConfigMap; ValueError (logged per Gateway) if missing."""
        try:
            cm = await self.core.read_namespaced_config_map(CA_ROOT_CONFIGMAP, self.mesh_namespace)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            cm = None
        pem = ((cm.data if cm is not None else None) or {}).get(CA_ROOT_KEY)
        if not pem:
            raise ValueError(
                f"ConfigMap {self.mesh_namespace}/{CA_ROOT_CONFIGMAP} with key {CA_ROOT_KEY} is "
                f"missing: kubectl -n {self.mesh_namespace} create configmap {CA_ROOT_CONFIGMAP} "
                f"--from-file={CA_ROOT_KEY}=<ca dir>/{CA_ROOT_KEY}"
            )
        return str(pem)

    async def reconcile(self, gw: Mapping[str, Any]) -> None:
        ns = gw["metadata"]["namespace"]
        sa, dep, svc, root = desired_objects(
            gw, image=self.image, trust_domain=self.trust_domain, ca_address=self.ca_address,
            ca_root_pem=await self._ca_root(),
        )  # fmt: skip
        await self._ensure(
            root,
            self.core.read_namespaced_config_map,
            self.core.create_namespaced_config_map,
            self.core.patch_namespaced_config_map,
        )
        await self._ensure(
            sa,
            self.core.read_namespaced_service_account,
            self.core.create_namespaced_service_account,
            self.core.patch_namespaced_service_account,
        )
        await self._ensure(
            dep,
            self.apps.read_namespaced_deployment,
            self.apps.create_namespaced_deployment,
            self.apps.patch_namespaced_deployment,
        )
        live_svc = await self._ensure(
            svc,
            self.core.read_namespaced_service,
            self.core.create_namespaced_service,
            self.core.patch_namespaced_service,
        )
        cluster_ip = (live_svc.get("spec") or {}).get("clusterIP")
        await self._status(gw, ns, cluster_ip if cluster_ip not in (None, "", "None") else None)

    async def reconcile_binding(self, gateways: Sequence[Mapping[str, Any]]) -> None:
        """Subjects = the current waypoints' ServiceAccounts: a new waypoint gains read access,
        a deleted one loses it (a merge patch replaces the list wholesale)."""
        await self._ensure(
            desired_binding(gateways),
            self.rbac.read_cluster_role_binding,
            self.rbac.create_cluster_role_binding,
            self.rbac.patch_cluster_role_binding,
        )

    async def _ensure(self, want: Obj, read: Any, create: Any, patch: Any) -> Obj:
        name = want["metadata"]["name"]
        ns = want["metadata"].get("namespace")
        where = (ns,) if ns is not None else ()  # cluster-scoped: no namespace argument
        label = f"{ns}/{name}" if ns is not None else name
        try:
            cur = await read(name, *where, _preload_content=False)
            cur_obj: Obj = json.loads(await cur.read())
            cur.release()
            if cur.status == 404:
                raise k8s.ApiException(status=404)
            if cur.status != 200:
                raise k8s.ApiException(status=cur.status, reason=str(cur_obj.get("message")))
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            resp = await create(*where, want, _preload_content=False)
            created: Obj = json.loads(await resp.read())
            resp.release()
            if resp.status not in (200, 201):
                raise k8s.ApiException(
                    status=resp.status, reason=str(created.get("message"))
                ) from None
            log.info("created %s %s", want["kind"], label)
            return created
        have = (cur_obj.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
        if have == want["metadata"]["annotations"][HASH_ANNOTATION]:
            return cur_obj
        resp = await patch(name, *where, want, _content_type=MERGE_PATCH, _preload_content=False)
        patched: Obj = json.loads(await resp.read())
        resp.release()
        if resp.status != 200:
            raise k8s.ApiException(status=resp.status, reason=str(patched.get("message")))
        log.info("updated %s %s", want["kind"], label)
        return patched

    async def _status(self, gw: Mapping[str, Any], ns: str, address: str | None) -> None:
        gen = gw["metadata"].get("generation", 1)
        now = _now()
        new = [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": f"Handled by {CONTROLLER_NAME}",
                "observedGeneration": gen,
                "lastTransitionTime": now,
            },
            {
                "type": "Programmed",
                "status": "True" if address else "False",
                "reason": "Programmed" if address else "Pending",
                "message": "Waypoint Deployment and Service created"
                if address
                else "Waiting for the waypoint Service to get an address",
                "observedGeneration": gen,
                "lastTransitionTime": now,
            },
        ]
        old_status = gw.get("status") or {}
        status: Obj = {
            "conditions": _conditions(old_status.get("conditions") or [], new),
            "addresses": [{"type": "IPAddress", "value": address}] if address else [],
        }
        if (
            old_status.get("conditions") == status["conditions"]
            and (old_status.get("addresses") or []) == status["addresses"]
        ):
            return
        group, version = GATEWAY_KIND.group, GATEWAY_KIND.version
        patch_status: Any = self.custom.patch_namespaced_custom_object_status  # typed w/o kwargs
        await patch_status(
            group,
            version,
            ns,
            GATEWAY_KIND.plural,
            gw["metadata"]["name"],
            {"status": copy.deepcopy(status)},
            _content_type=MERGE_PATCH,
        )
        log.info(
            "status of Gateway %s/%s: Programmed=%s", ns, gw["metadata"]["name"], bool(address)
        )


async def _amain(args: argparse.Namespace) -> int:
    from mesh.observability import ObservabilityServer

    api = await load_api_client(args.kubeconfig)
    ctl = WaypointController(
        api, image=args.image, trust_domain=args.trust_domain, resync=args.resync,
        ca_address=args.ca_address, mesh_namespace=args.mesh_namespace,
    )  # fmt: skip
    host, _, port = args.readiness_addr.rpartition(":")
    try:
        async with ObservabilityServer(host or "0.0.0.0", int(port), ready=ctl.ready):
            await ctl.run()
    finally:
        await api.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Also used by the tests that check every manifest's args against the real flags."""
    p = argparse.ArgumentParser(prog="waypoint-controller", description=__doc__.split("\n")[0])
    p.add_argument("--image", required=True, help="waypoint image for the Deployments")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--ca-address", default=DEFAULT_CA_ADDRESS, help="the CA service waypoints use")
    p.add_argument(
        "--mesh-namespace",
        default="ambientmesh-system",
        help=f"where the {CA_ROOT_CONFIGMAP} ConfigMap lives",
    )
    p.add_argument("--kubeconfig", help="default: in-cluster, then ~/.kube/config")
    p.add_argument("--readiness-addr", default=f"0.0.0.0:{READINESS_PORT}")
    p.add_argument("--resync", type=float, default=60.0, help="seconds between full resyncs")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
