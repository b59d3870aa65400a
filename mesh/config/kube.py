"""Live configuration from the Kubernetes API server: list + watch → `Snapshot` → `ConfigStore`.

The second config source next to `FileSource`; it produces the same `Snapshot` through the same
`parse_objects`, so the proxies cannot tell where their config came from.

Choices, and why:

* **Which pods.** ztunnel must route to *remote* pods too (pod IP → node, identity), so the data
  path needs the cluster-wide workload set; Istio's ztunnel gets it from istiod over WDS, and we
  have no istiod, so by default every pod is watched. Where only this node's pods matter (the CNI
  reconciliation that enrols pods that existed before the install), pass
  `local_pods_only=True` with `node_name`: the server-side field selector `spec.nodeName=<node>`
  then keeps the other nodes' pods off the wire.
* **Consistency.** Each kind keeps its own resourceVersion (the last one seen in a list, event or
  BOOKMARK); a dropped connection resumes the watch from it, so events that happened while
  disconnected are replayed by the server, not lost. A `410 Gone` (history compacted past our
  resourceVersion) re-lists that kind and replaces its objects wholesale. Errors back off
  exponentially with full jitter so a fleet of nodes does not stampede a recovering server.
* **Nothing until everything.** No snapshot is published before every kind has listed once: a
  snapshot with pods but not yet the AuthorizationPolicies would briefly allow what policy
  denies.
* **A bad object is skipped, not fatal.** Unlike files (where the operator is at the keyboard
  and the last good snapshot stays), a cluster has many authors; one malformed object must not
  freeze the mesh for everyone. Each object is validated alone (cached per resourceVersion);
  an invalid one is logged once with its kind, name and field and left out, and the rest lands.
  Cross-object conflicts (two Services claiming one VIP) drop the object `parse_objects` names.
* **Debounce.** A burst of events (a Deployment rollout) costs one rebuild, not one per event;
  parsing runs in a worker thread so the watch streams keep draining meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from mesh.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, ConfigError
from mesh.config.parse import ConfigErrors, parse_objects
from mesh.config.snapshot import Snapshot
from mesh.config.source import ConfigStore

log = logging.getLogger("mesh.config.kube")

__all__ = [
    "DEFAULT_KINDS",
    "JWKS_CONFIGMAP_LABEL",
    "WAYPOINT_KINDS",
    "Backoff",
    "KubeSource",
    "WatchedKind",
    "load_api_client",
]

_MAX_LINE = 16 << 20  # one watch event; a bigger one is a broken stream, not an object


@dataclass(frozen=True)
class WatchedKind:
    """One resource type the source lists and watches cluster-wide."""

    kind: str
    api_version: str  # "v1" or "group/version"
    plural: str
    # An optional kind's API may be absent (its CRD not installed): then it counts as listed
    # and empty, so the other kinds still publish, and the source asks again now and then.
    optional: bool = False
    # A server-side label selector: only the labelled objects cross the wire and are held
    # (ConfigMaps: the few that carry JWKS, not every ConfigMap's data in the cluster).
    label_selector: str | None = None

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


DEFAULT_KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "v1", "namespaces"),
    WatchedKind("Node", "v1", "nodes"),
    WatchedKind("Pod", "v1", "pods"),
    WatchedKind("Service", "v1", "services"),
    WatchedKind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices"),
    WatchedKind("Gateway", "gateway.networking.k8s.io/v1", "gateways"),
    WatchedKind("HTTPRoute", "gateway.networking.k8s.io/v1", "httproutes"),
    # Newer than the rest of the Gateway API's standard channel in many clusters.
    WatchedKind("GRPCRoute", "gateway.networking.k8s.io/v1", "grpcroutes", optional=True),
    WatchedKind("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies"),
    WatchedKind("PeerAuthentication", "security.istio.io/v1", "peerauthentications"),
    # Built into every cluster (served even where no CNI enforces it): its absence is an error.
    WatchedKind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies"),
    # Only where Cilium's CRDs are installed; elsewhere "no CiliumNetworkPolicies", not a retry
    # loop.
    WatchedKind("CiliumNetworkPolicy", "cilium.io/v2", "ciliumnetworkpolicies", optional=True),
)

# A ConfigMap a RequestAuthentication's `jwksUri: configmap://<ns>/<name>/<key>` names must
# carry this label (any value) for a waypoint on Kubernetes to see it: the waypoint watches
# ConfigMaps through this selector only, so the rest of the cluster's ConfigMaps (large, and
# none of our business) are never sent to it or held in its memory.
JWKS_CONFIGMAP_LABEL = "ambientmesh.io/jwks"

# What a waypoint watches: everything ztunnel does (the routes, policies and workloads its L7
# decisions read), plus RequestAuthentication (optional: Istio's CRD may be absent) and the
# labelled JWKS ConfigMaps.
WAYPOINT_KINDS: tuple[WatchedKind, ...] = (
    *DEFAULT_KINDS,
    WatchedKind(
        "RequestAuthentication",
        "security.istio.io/v1",
        "requestauthentications",
        optional=True,
    ),
    WatchedKind("ConfigMap", "v1", "configmaps", label_selector=JWKS_CONFIGMAP_LABEL),
)


class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**n))."""

    def __init__(self, base: float = 0.2, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _Gone(Exception):
    """The server no longer has the history from our resourceVersion: re-list."""


class _NotServed(Exception):
    """404 on an optional kind's collection: its CRD is not installed (or was removed)."""


class WatchError(Exception):
    """A list or watch call failed in a way worth a retry (HTTP status or a broken stream)."""


def _obj_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise WatchError("object without metadata")
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _label(kind: str, key: tuple[str, str]) -> str:
    """The object label `parse_objects` uses in its errors ("Pod ns/name", "Node name")."""
    return f"{kind} {key[0]}/{key[1]}" if key[0] else f"{kind} {key[1]}"


def _relevant(kind: str, obj: Mapping[str, Any]) -> bool:
    """Objects that must not enter the snapshot at all. Finished pods keep `status.podIP` after
    the IP has been handed to a new pod; counting them would make a bogus duplicate-IP error."""
    if kind == "Pod":
        status = obj.get("status")
        if isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed"):
            return False
    return True


class KubeSource:
    """List + watch the mesh's kinds and publish snapshots into `store`."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        store: ConfigStore,
        *,
        node_name: str | None = None,
        local_pods_only: bool = False,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        kinds: tuple[WatchedKind, ...] = DEFAULT_KINDS,
        debounce: float = 0.1,
        watch_timeout: int = 300,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        missing_recheck: float = 60.0,
    ) -> None:
        if local_pods_only and not node_name:
            raise ValueError("local_pods_only needs node_name")
        self.api = api_client
        self.store = store
        self.node_name = node_name
        self.local_pods_only = local_pods_only
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.kinds = kinds
        self.debounce = debounce
        self.watch_timeout = watch_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.missing_recheck = missing_recheck
        self.missing: set[str] = set()  # optional kinds the API server does not serve now
        self.objects: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {
            k.kind: {} for k in kinds
        }
        self.resource_versions: dict[str, str | None] = {k.kind: None for k in kinds}
        self.relists: dict[str, int] = {k.kind: 0 for k in kinds}
        self._synced: set[str] = set()
        self.ready = asyncio.Event()  # set once every kind has listed and a snapshot is out
        self._dirty = asyncio.Event()
        # (kind, ns, name, resourceVersion) -> that object's own errors ([] when valid)
        self._verdicts: dict[tuple[str, str, str, str], list[ConfigError]] = {}
        self.skipped: dict[str, list[ConfigError]] = {}  # label -> errors, for the last build

    # -- API calls -------------------------------------------------------------------------

    def _field_selector(self, wk: WatchedKind) -> str | None:
        if wk.kind == "Pod" and self.local_pods_only:
            return f"spec.nodeName={self.node_name}"
        return None

    def _call(self, wk: WatchedKind) -> Callable[..., Awaitable[Any]]:
        """The generated client method that lists `wk` cluster-wide."""
        if wk.api_version == "v1":
            core = k8s.CoreV1Api(self.api)
            table: dict[str, Any] = {
                "namespaces": core.list_namespace,
                "nodes": core.list_node,
                "pods": core.list_pod_for_all_namespaces,
                "services": core.list_service_for_all_namespaces,
                "configmaps": core.list_config_map_for_all_namespaces,
            }
            fn: Callable[..., Awaitable[Any]] = table[wk.plural]
            return fn
        if wk.api_version == "discovery.k8s.io/v1" and wk.plural == "endpointslices":
            return k8s.DiscoveryV1Api(self.api).list_endpoint_slice_for_all_namespaces
        custom = k8s.CustomObjectsApi(self.api)

        async def list_custom(**kw: Any) -> Any:
            return await custom.list_cluster_custom_object(wk.group, wk.version, wk.plural, **kw)

        return list_custom

    async def _request(self, wk: WatchedKind, **kw: Any) -> aiohttp.ClientResponse:
        fs = self._field_selector(wk)
        if fs:
            kw["field_selector"] = fs
        if wk.label_selector:
            kw["label_selector"] = wk.label_selector
        resp: aiohttp.ClientResponse = await self._call(wk)(_preload_content=False, **kw)
        if resp.status == 410:
            resp.release()
            raise _Gone(f"{wk.plural}: 410 Gone")
        if resp.status == 404 and wk.optional:
            resp.release()
            raise _NotServed(wk.plural)
        if resp.status != 200:
            body = (await resp.read())[:500].decode("utf-8", "replace")
            resp.release()
            raise WatchError(f"{wk.plural}: HTTP {resp.status}: {body}")
        return resp

    # -- list ------------------------------------------------------------------------------

    async def _list(self, wk: WatchedKind) -> None:
        resp = await self._request(wk)
        try:
            data = json.loads(await resp.read())
        finally:
            resp.release()
        items = data.get("items") if isinstance(data, Mapping) else None
        meta = data.get("metadata") if isinstance(data, Mapping) else None
        if not isinstance(items, list) or not isinstance(meta, Mapping):
            raise WatchError(f"{wk.plural}: malformed list response")
        fresh: dict[tuple[str, str], Mapping[str, Any]] = {}
        for item in items:
            if isinstance(item, Mapping):
                obj = self._typed(wk, item)
                fresh[_obj_key(obj)] = obj
        self.objects[wk.kind] = fresh
        if wk.kind in self.missing:
            self.missing.discard(wk.kind)
            log.info("the API server serves %s.%s now; watching it", wk.plural, wk.api_version)
        self.resource_versions[wk.kind] = str(meta.get("resourceVersion") or "") or None
        self.relists[wk.kind] += 1
        self._synced.add(wk.kind)
        log.debug(
            "listed %d %s at resourceVersion %s",
            len(fresh),
            wk.plural,
            self.resource_versions[wk.kind],
        )
        self._dirty.set()

    @staticmethod
    def _typed(wk: WatchedKind, item: Mapping[str, Any]) -> Mapping[str, Any]:
        # List items carry no kind/apiVersion; parse_objects dispatches on both.
        if item.get("kind") == wk.kind and item.get("apiVersion") == wk.api_version:
            return item
        return {**item, "kind": wk.kind, "apiVersion": wk.api_version}

    # -- watch -----------------------------------------------------------------------------

    async def _watch(self, wk: WatchedKind, on_event: Callable[[], None]) -> None:
        """One watch connection from the last resourceVersion until the server ends it."""
        resp = await self._request(
            wk,
            watch=True,
            resource_version=self.resource_versions[wk.kind],
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            # no total timeout: the stream is meant to stay open; the server closes it
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.watch_timeout + 30
            ),
        )
        try:
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        self._apply(wk, line)
                        on_event()
                if len(buf) > _MAX_LINE:
                    raise WatchError(f"{wk.plural}: watch event larger than {_MAX_LINE} bytes")
        finally:
            resp.release()

    def _apply(self, wk: WatchedKind, line: bytes) -> None:
        try:
            ev = json.loads(line)
            typ, obj = ev["type"], ev["object"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WatchError(f"{wk.plural}: malformed watch event: {exc}") from None
        if not isinstance(obj, Mapping):
            raise WatchError(f"{wk.plural}: watch event object is not a mapping")
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(f"{wk.plural}: {obj.get('message', 'resourceVersion expired')}")
            raise WatchError(f"{wk.plural}: watch error {obj.get('code')}: {obj.get('message')}")
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if typ == "BOOKMARK":
            if rv:
                self.resource_versions[wk.kind] = str(rv)
            return
        key = _obj_key(obj)
        if typ in ("ADDED", "MODIFIED"):
            self.objects[wk.kind][key] = self._typed(wk, obj)
        elif typ == "DELETED":
            self.objects[wk.kind].pop(key, None)
        else:
            raise WatchError(f"{wk.plural}: unknown watch event type {typ!r}")
        if rv:
            self.resource_versions[wk.kind] = str(rv)
        self._dirty.set()

    async def _run_kind(self, wk: WatchedKind) -> None:
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        while True:
            got_events = False

            def seen() -> None:
                nonlocal got_events
                got_events = True

            try:
                if self.resource_versions[wk.kind] is None:
                    await self._list(wk)
                    backoff.reset()
                await self._watch(wk, seen)
                backoff.reset()  # the server closed a healthy stream (timeoutSeconds): resume
                continue
            except _Gone as exc:
                log.info("%s; re-listing", exc)
                self.resource_versions[wk.kind] = None
                continue
            except _NotServed:
                self._not_served(wk)
                await asyncio.sleep(self.missing_recheck)
                continue
            except asyncio.CancelledError:
                raise
            except (
                WatchError,
                k8s.ApiException,
                aiohttp.ClientError,
                OSError,
                TimeoutError,
                ValueError,
            ) as exc:
                if got_events:
                    backoff.reset()  # a stream that worked and then broke: retry soon
                delay = backoff.next()
                log.warning(
                    "watch %s broken (%s: %s); resuming from resourceVersion %s in %.2fs",
                    wk.plural,
                    type(exc).__name__,
                    exc,
                    self.resource_versions[wk.kind],
                    delay,
                )
                await asyncio.sleep(delay)

    def _not_served(self, wk: WatchedKind) -> None:
        """An optional kind's API is gone or was never there: hold none of its objects and
        count it as listed, so the other kinds keep publishing."""
        if wk.kind not in self.missing:
            log.warning(
                "the API server does not serve %s.%s (is the %s CRD installed?); "
                "no %s objects until it does, checking again every %.0fs",
                wk.plural,
                wk.api_version,
                wk.kind,
                wk.kind,
                self.missing_recheck,
            )
            self.missing.add(wk.kind)
        self.resource_versions[wk.kind] = None
        if self.objects[wk.kind] or wk.kind not in self._synced:
            self.objects[wk.kind] = {}
            self._synced.add(wk.kind)
            self._dirty.set()

    # -- snapshot --------------------------------------------------------------------------

    def _all_objects(self) -> list[tuple[str, tuple[str, str], Mapping[str, Any]]]:
        out = []
        for kind, objs in self.objects.items():
            for key, obj in objs.items():
                if _relevant(kind, obj):
                    out.append((kind, key, obj))
        return out

    def build(self) -> Snapshot:
        """Validate what the watches hold and build a snapshot, leaving out bad objects.
        Thread-safe for a list handed over from the loop: touches only `_verdicts`/`skipped`,
        which only this method uses."""
        return self._build(self._all_objects())

    def _build(self, objs: list[tuple[str, tuple[str, str], Mapping[str, Any]]]) -> Snapshot:
        skipped: dict[str, list[ConfigError]] = {}
        good: dict[str, Mapping[str, Any]] = {}
        verdicts: dict[tuple[str, str, str, str], list[ConfigError]] = {}
        for kind, key, obj in objs:
            meta = obj.get("metadata")
            rv = str(meta.get("resourceVersion", "")) if isinstance(meta, Mapping) else ""
            vkey = (kind, key[0], key[1], rv)
            errs = self._verdicts.get(vkey)
            if errs is None:
                errs = self._validate_one(obj)
                for e in errs:
                    log.error("skipping %s from the API server: %s", _label(kind, key), e)
            verdicts[vkey] = errs
            label = _label(kind, key)
            if errs:
                skipped[label] = errs
            else:
                good[label] = obj
        self._verdicts = verdicts  # forget objects that are gone or changed
        for _ in range(len(good) + 1):
            try:
                snap = parse_objects(
                    list(good.values()),
                    trust_domain=self.trust_domain,
                    root_namespace=self.root_namespace,
                )
                break
            except ConfigErrors as exc:
                named = [e for e in exc.errors if e.obj in good]
                if not named:
                    raise
                for e in named:
                    log.error("skipping %s from the API server: %s", e.obj, e)
                    skipped.setdefault(e.obj, []).append(e)
                    good.pop(e.obj, None)
        else:  # pragma: no cover - each round removes at least one object
            raise RuntimeError("snapshot build did not converge")
        self.skipped = skipped
        return snap

    def _validate_one(self, obj: Mapping[str, Any]) -> list[ConfigError]:
        try:
            parse_objects([obj], trust_domain=self.trust_domain, root_namespace=self.root_namespace)
        except ConfigErrors as exc:
            return list(exc.errors)
        return []

    async def _rebuilder(self) -> None:
        wanted = {k.kind for k in self.kinds}
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # coalesce a burst of events into one build
            self._dirty.clear()
            if not wanted <= self._synced:
                continue
            objs = self._all_objects()  # copy on the loop; the thread never sees live dicts
            try:
                snap = await asyncio.to_thread(self._build, objs)
            except ConfigErrors as exc:
                for err in exc.errors:
                    log.error(
                        "config rejected, keeping version %d: %s", self.store.current.version, err
                    )
                continue
            published = self.store.publish(snap)
            log.info(
                "config version %d from the API server (%d objects, %d skipped)",
                published.version,
                len(objs),
                len(self.skipped),
            )
            self.ready.set()

    async def run(self) -> None:
        """List, watch and publish until cancelled. One task per kind plus the rebuilder, all
        owned by one TaskGroup."""
        async with asyncio.TaskGroup() as tg:
            for wk in self.kinds:
                tg.create_task(self._run_kind(wk), name=f"watch-{wk.plural}")
            tg.create_task(self._rebuilder(), name="kube-rebuild")

    def objects_of(self, kind: str) -> Iterator[Mapping[str, Any]]:
        yield from self.objects.get(kind, {}).values()


async def load_api_client(
    kubeconfig: str | None = None, context: str | None = None
) -> k8s.ApiClient:
    """An ApiClient from, in order: an explicit kubeconfig file, the in-cluster service account
    (projected token, refreshed as the kubelet rotates it), or ~/.kube/config / $KUBECONFIG."""
    cfg = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        await k8s_config.load_kube_config(context=context, client_configuration=cfg)
    return k8s.ApiClient(configuration=cfg)
