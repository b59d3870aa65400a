"""The lab's manifest: what the operator wrote, and the config the lab generates from it.

The generated config is the same YAML with what a cluster would have filled in: pods'
`status.podIP` (from the CNI results), nodes' InternalIP (the underlay address), services'
`clusterIP` (allocated from 10.96.0.0/16 when absent). ztunnel watches that file, so label
edits are a rewrite of the file, never a restart.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.config.model import ConfigError
from mesh.config.parse import parse_objects, read_documents
from mesh.config.snapshot import Snapshot
from meshctl.lab.names import SERVICE_NET

Doc = dict[str, Any]
MAX_NODES = 250  # node i gets 10.244.i.0/24 and 172.30.0.i


def flatten(docs: Iterable[Any]) -> list[Doc]:
    out: list[Doc] = []
    for d in docs:
        if d is None:
            continue
        if isinstance(d, Mapping) and d.get("kind") == "List":
            out.extend(flatten(d.get("items") or []))
        elif isinstance(d, Mapping):
            out.append(copy.deepcopy(dict(d)))
        else:
            raise ConfigError("manifest", "", f"document {d!r} is not a mapping")
    return out


def load(paths: Sequence[str | Path]) -> list[Doc]:
    return flatten(read_documents(paths))


def _meta(d: Mapping[str, Any]) -> Mapping[str, Any]:
    m = d.get("metadata")
    return m if isinstance(m, Mapping) else {}


def key(d: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name) of a document."""
    m = _meta(d)
    return str(d.get("kind")), str(m.get("namespace") or "default"), str(m.get("name"))


@dataclass(frozen=True, slots=True)
class Topology:
    """The lab's shape derived from the manifest: node order fixes node addresses."""

    nodes: tuple[str, ...]
    snapshot: Snapshot  # as parsed from the operator's manifest (no pod IPs yet)


def plan(docs: Sequence[Mapping[str, Any]]) -> Topology:
    """Validate the manifest and order its nodes: declared Nodes first, then pods' nodeNames."""
    snap = parse_objects(docs)
    errors: list[ConfigError] = []
    nodes: list[str] = [n.name for n in snap.nodes]
    for pod in snap.pods:
        if not pod.node:
            errors.append(ConfigError(f"Pod {pod.key}", "spec.nodeName", "is required in the lab"))
        elif pod.node not in nodes:
            nodes.append(pod.node)
        if not pod.command:
            errors.append(
                ConfigError(
                    f"Pod {pod.key}",
                    "spec.containers[0].command",
                    "is required in the lab (it is what runs inside the pod)",
                )
            )
    if len(nodes) > MAX_NODES:
        errors.append(ConfigError("manifest", "", f"at most {MAX_NODES} nodes ({len(nodes)})"))
    if errors:
        from mesh.config.parse import ConfigErrors

        raise ConfigErrors(errors)
    return Topology(tuple(nodes), snap)


def allocate_vips(docs: Sequence[Doc]) -> dict[tuple[str, str], str]:
    """clusterIP for every Service: the manifest's own, else the next free one in 10.96/16."""
    used = set()
    for d in docs:
        if d.get("kind") == "Service":
            cip = (d.get("spec") or {}).get("clusterIP")
            if cip not in (None, "", "None"):
                used.add(str(cip))
    free = (str(a) for a in SERVICE_NET.hosts() if int(a) & 0xFFFF >= 10 and str(a) not in used)
    out: dict[tuple[str, str], str] = {}
    for d in docs:
        if d.get("kind") != "Service":
            continue
        _, ns, name = key(d)
        cip = (d.get("spec") or {}).get("clusterIP")
        if cip == "None":
            continue  # headless: no VIP, like Kubernetes
        out[(ns, name)] = str(cip) if cip else next(free)
    return out


def render(
    docs: Sequence[Doc],
    *,
    pod_ips: Mapping[tuple[str, str], str],
    node_ips: Mapping[str, str],
    vips: Mapping[tuple[str, str], str],
) -> list[Doc]:
    """The generated config: the manifest plus what the lab assigned."""
    out: list[Doc] = []
    seen_nodes: set[str] = set()
    seen_ns: set[str] = set()
    pod_namespaces: set[str] = set()
    for src in docs:
        d = copy.deepcopy(src)
        kind, ns, name = key(d)
        if kind == "Pod":
            pod_namespaces.add(ns)
            ip = pod_ips.get((ns, name))
            if ip:
                status = d.setdefault("status", {})
                status["podIP"] = ip
                status["podIPs"] = [{"ip": ip}]
                status["phase"] = "Running"
                status["conditions"] = [{"type": "Ready", "status": "True"}]
        elif kind == "Node" and d.get("apiVersion") == "v1":
            seen_nodes.add(name)
            if name in node_ips:
                d.setdefault("status", {})["addresses"] = [
                    {"type": "InternalIP", "address": node_ips[name]}
                ]
        elif kind == "Service" and (ns, name) in vips:
            d.setdefault("spec", {})["clusterIP"] = vips[(ns, name)]
        elif kind == "Namespace":
            seen_ns.add(name)
        out.append(d)
    for node, ip in node_ips.items():
        if node not in seen_nodes:
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
                }
            )
    for ns in sorted(pod_namespaces - seen_ns):
        out.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return out


def set_label(
    docs: Sequence[Doc], kind: str, namespace: str | None, name: str, change: str
) -> list[Doc]:
    """A copy of `docs` with `key=value` set (or `key-` removed) on one object's labels."""
    if change.endswith("-") and "=" not in change:
        label, value = change[:-1], None
    else:
        label, sep, v = change.partition("=")
        if not sep:
            raise ValueError(f"{change!r}: expected key=value or key-")
        value = v
    if not label:
        raise ValueError(f"{change!r}: empty label key")
    out = [copy.deepcopy(d) for d in docs]
    for d in out:
        k, ns, n = key(d)
        if k == kind and n == name and (namespace is None or ns == namespace):
            labels = d.setdefault("metadata", {}).setdefault("labels", {}) or {}
            d["metadata"]["labels"] = labels
            if value is None:
                labels.pop(label, None)
            else:
                labels[label] = value
            return out
    # namespaces implied by pods exist in the lab even when the manifest omits them
    implied = any(key(d)[0] == "Pod" and key(d)[1] == name for d in out)
    if kind == "Namespace" and value is not None and implied:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {label: value}},
            }
        )
        return out
    where = f"{namespace}/{name}" if namespace else name
    raise ValueError(f"{kind} {where}: not in the lab's manifest")


def dump(docs: Sequence[Doc]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so ztunnel's watcher never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_vip(ip: str) -> None:
    ipaddress.IPv4Address(ip)
