"""Raw Kubernetes-style objects → a validated `Snapshot`.

Both config sources (YAML files, a Kubernetes watch) hand raw dicts to `parse_objects`, so
validation lives once and a bad object never reaches the data path. Every problem of a load is
collected, not just the first, because an operator fixing a manifest wants the whole list.
File handling lives only in `load_snapshot`, keeping `parse_objects` usable by any source.

This package holds the assembly (`parse_objects`: which kind goes to which parser, and the
checks across objects) and file reading; each family of kinds has its own module (`core`,
`routes`, `security`, `netpol`) on top of what they share (`common`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mesh.config.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    CiliumNetworkPolicy,
    ConfigError,
    ConfigMap,
    HTTPRoute,
    Namespace,
    NetworkPolicy,
    Node,
    PeerAuthentication,
    Pod,
    RequestAuthentication,
    Service,
    Waypoint,
)
from mesh.config.parse.common import ConfigErrors, parse_duration
from mesh.config.parse.core import _gateway, _namespace, _node, _pod, _service
from mesh.config.parse.netpol import _cilium_policy, _network_policy
from mesh.config.parse.routes import _grpc_route, _http_route
from mesh.config.parse.security import (
    _authz,
    _config_map,
    _peer_authn,
    _request_authn,
    configmap_refs,
)
from mesh.config.snapshot import Snapshot

__all__ = ["ConfigErrors", "load_snapshot", "parse_duration", "parse_objects"]


# -- assembly ----------------------------------------------------------------------------------

_GW_GROUP = "gateway.networking.k8s.io/"
_SEC_GROUP = "security.istio.io/"


MAX_LIST_DEPTH = 8


def _flatten(
    docs: Iterable[Any], errors: list[ConfigError], depth: int = 0
) -> Iterator[Mapping[str, Any]]:
    """Documents with `kind: List` expanded. YAML anchors can make a List contain itself,
    and nesting has no natural bound: both stop at MAX_LIST_DEPTH with an error."""
    for d in docs:
        if d is None:
            continue
        if isinstance(d, Mapping) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            if depth >= MAX_LIST_DEPTH:
                why = f"Lists nest deeper than {MAX_LIST_DEPTH} (or a List contains itself)"
                errors.append(ConfigError("List", "items", why))
                continue
            yield from _flatten(d["items"], errors, depth + 1)
        else:
            yield d


def _describe(doc: Mapping[str, Any], api: str) -> str:
    """ "Kind ns/name (apiVersion)" of an object we skip, tolerating any shape of metadata."""
    meta = doc.get("metadata")
    name = ns = ""
    if isinstance(meta, Mapping):
        name = str(meta.get("name", "") or "")
        ns = str(meta.get("namespace", "") or "")
    who = f"{ns}/{name}" if ns and name else name or "(unnamed)"
    kind = doc.get("kind")
    kind = kind if isinstance(kind, str) and kind else "(no kind)"
    return f"{kind} {who} ({api or 'no apiVersion'})"


def parse_objects(
    docs: Iterable[Mapping[str, Any]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    version: int = 0,
    ignored: list[str] | None = None,
) -> Snapshot:
    """Validate raw objects and build a Snapshot; raise `ConfigErrors` listing every problem.

    Kinds we do not model (ConfigMap, Deployment, …) are skipped: the same manifests go to
    `kubectl apply`, and they are not ours to judge. But skipping must not look like
    accepting, so each skipped object is described in `ignored` when the caller passes a
    list (`meshctl config validate` names them all).
    """
    errors: list[ConfigError] = []
    nodes: list[Node] = []
    namespaces: list[Namespace] = []
    pods: list[Pod] = []
    services: list[Service] = []
    waypoints: list[Waypoint] = []
    routes: list[HTTPRoute] = []
    policies: list[AuthorizationPolicy] = []
    peers: list[PeerAuthentication] = []
    netpols: list[NetworkPolicy] = []
    cnps: list[CiliumNetworkPolicy] = []
    authns: list[RequestAuthentication] = []
    config_maps: list[tuple[Mapping[str, Any], str]] = []  # kept only if a JWKS names them
    seen: set[tuple[str, str]] = set()
    for i, doc in enumerate(_flatten(docs, errors)):
        if not isinstance(doc, Mapping):
            errors.append(ConfigError(f"document {i}", "", "must be a mapping"))
            continue
        kind = doc.get("kind")
        api = str(doc.get("apiVersion", ""))
        obj: Any = None
        if kind == "Namespace" and api == "v1":
            obj = _namespace(doc, errors)
            bucket: list[Any] = namespaces
        elif kind == "Pod" and api == "v1":
            obj, bucket = _pod(doc, errors), pods
        elif kind == "Service" and api == "v1":
            obj, bucket = _service(doc, errors), services
        elif kind == "Node" and api == "v1":
            obj, bucket = _node(doc, errors), nodes
        elif kind == "Gateway" and api.startswith(_GW_GROUP):
            obj, bucket = _gateway(doc, errors), waypoints
        elif kind == "HTTPRoute" and api.startswith(_GW_GROUP):
            obj, bucket = _http_route(doc, errors), routes
        elif kind == "GRPCRoute" and api == _GW_GROUP + "v1":
            obj, bucket = _grpc_route(doc, errors), routes
        elif kind == "AuthorizationPolicy" and api in (_SEC_GROUP + "v1", _SEC_GROUP + "v1beta1"):
            obj, bucket = _authz(doc, errors, root_namespace), policies
        elif kind == "RequestAuthentication" and api in (
            _SEC_GROUP + "v1",
            _SEC_GROUP + "v1beta1",
        ):
            obj, bucket = _request_authn(doc, errors, root_namespace), authns
        elif kind == "ConfigMap" and api == "v1":
            # Named as ignored now (keeping the files' order), unnamed below if a JWKS uses it.
            config_maps.append((doc, _describe(doc, api)))
            if ignored is not None:
                ignored.append(config_maps[-1][1])
            continue
        elif kind == "PeerAuthentication" and api in (_SEC_GROUP + "v1", _SEC_GROUP + "v1beta1"):
            obj, bucket = _peer_authn(doc, errors), peers
        elif kind == "NetworkPolicy" and api == "networking.k8s.io/v1":
            obj, bucket = _network_policy(doc, errors), netpols
        elif kind == "CiliumNetworkPolicy" and api == "cilium.io/v2":
            obj, bucket = _cilium_policy(doc, errors), cnps
        else:
            if ignored is not None:
                ignored.append(_describe(doc, api))
            continue
        if obj is None:
            continue
        key = obj.key if hasattr(obj, "key") else obj.name
        ident = (str(kind), key)
        if ident in seen:
            errors.append(ConfigError(f"{kind} {key}", "metadata.name", "is defined twice"))
            continue
        seen.add(ident)
        bucket.append(obj)

    # ConfigMaps are read only when a RequestAuthentication takes its JWKS from one; any
    # other is not ours to judge, and is named as ignored like every kind we do not read.
    wanted = configmap_refs(authns)
    maps: list[ConfigMap] = []
    for doc, described in config_maps:
        meta = doc.get("metadata")
        ident = (
            (str(meta.get("namespace", "default")), str(meta.get("name", "")))
            if isinstance(meta, Mapping)
            else ("", "")
        )
        if ident not in wanted:
            continue
        if ignored is not None and described in ignored:
            ignored.remove(described)
        cm = _config_map(doc, errors)
        if cm is not None:
            maps.append(cm)
    by_ip: dict[str, Pod] = {}
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.ip is None:
            continue
        other = by_ip.get(pod.ip)
        if other is not None:
            errors.append(
                ConfigError(f"Pod {pod.key}", "status.podIP", f"{pod.ip} is also {other.key}'s")
            )
        else:
            by_ip[pod.ip] = pod
    by_vip: dict[tuple[str, int], Service] = {}
    for svc in sorted(services, key=lambda s: s.key):
        if svc.cluster_ip is None:
            continue
        for sp in svc.ports:
            o = by_vip.get((svc.cluster_ip, sp.port))
            if o is not None:
                errors.append(
                    ConfigError(
                        f"Service {svc.key}",
                        "spec.clusterIP",
                        f"{svc.cluster_ip}:{sp.port} is also Service {o.key}'s",
                    )
                )
            else:
                by_vip[(svc.cluster_ip, sp.port)] = svc
    if errors:
        raise ConfigErrors(errors)

    def k(o: Any) -> str:
        return str(o.key)

    return Snapshot(
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        nodes=tuple(sorted(nodes, key=lambda n: n.name)),
        namespaces=tuple(sorted(namespaces, key=lambda n: n.name)),
        pods=tuple(sorted(pods, key=k)),
        services=tuple(sorted(services, key=k)),
        waypoints=tuple(sorted(waypoints, key=k)),
        http_routes=tuple(sorted(routes, key=lambda r: (r.creation_timestamp, r.key))),
        authorization_policies=tuple(sorted(policies, key=k)),
        peer_authentications=tuple(sorted(peers, key=k)),
        network_policies=tuple(sorted(netpols, key=k)),
        cilium_policies=tuple(sorted(cnps, key=k)),
        request_authentications=tuple(sorted(authns, key=k)),
        config_maps=tuple(sorted(maps, key=k)),
        version=version,
    )


def _files(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


def read_documents(paths: Sequence[str | Path]) -> list[Any]:
    """All YAML documents from files/directories; an unreadable or malformed file raises
    `ConfigErrors` naming the file."""
    docs: list[Any] = []
    errors: list[ConfigError] = []
    for f in _files(paths):
        try:
            docs.extend(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            errors.append(ConfigError(f"file {f}", "", str(exc).replace("\n", " ")))
        except RecursionError:  # PyYAML's parser recurses once per nesting level
            errors.append(ConfigError(f"file {f}", "", "nests too deeply to be a manifest"))
    if errors:
        raise ConfigErrors(errors)
    return docs


def load_snapshot(
    paths: Sequence[str | Path],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    version: int = 0,
    ignored: list[str] | None = None,
) -> Snapshot:
    """`parse_objects` over every *.yaml/*.yml under `paths` (multi-document, `kind: List`)."""
    return parse_objects(
        read_documents(paths),
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        version=version,
        ignored=ignored,
    )
