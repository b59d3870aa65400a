"""The values an installation is rendered from: the defaults, and the strict deep merge of a
user's values files and `--set` expressions over them (an unknown key is an error, not a no-op)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from mesh.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN
from mesh.ports import CA_PORT, FLOWS_PORT
from meshctl.errors import UsageError

Obj = dict[str, Any]

DEFAULT_VALUES: Obj = {
    "namespace": "ambientmesh-system",
    "trustDomain": DEFAULT_TRUST_DOMAIN,
    "rootNamespace": DEFAULT_ROOT_NAMESPACE,
    "image": {
        "repository": "ghcr.io/ambientmesh/ambientmesh",
        "tag": "0.1.0",
        "pullPolicy": "IfNotPresent",
    },
    "logLevel": "info",
    "crds": {"install": True},
    "ztunnel": {
        "maxUnavailable": 1,
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "extraArgs": [],
    },
    "cni": {
        "binDir": "/opt/cni/bin",
        "confDir": "/etc/cni/net.d",
        "excludeNamespaces": ["kube-system"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        },
    },
    "ca": {
        "replicas": 2,
        "port": CA_PORT,
        "secretName": "ambientmesh-ca",
        "tokenAudience": "ambientmesh-ca",
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
    },
    "observe": {
        # ztunnel's read-only flow stream (`meshctl observe --kube` reads it through the API
        # server's pods/proxy, on this port). ztunnel is hostNetwork, so anyone who can reach
        # a node can read which workloads talk there: 0 or off serves it on localhost's admin
        # port only.
        "flowsPort": FLOWS_PORT,
    },
    "controller": {
        "replicas": 1,
        "resources": {
            "requests": {"cpu": "50m", "memory": "96Mi"},
            "limits": {"memory": "256Mi"},
        },
    },
}

# -- values ----------------------------------------------------------------------------------


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any], path: str = "") -> Obj:
    """Deep-merge `override` into `base`; a key `base` does not have is a UsageError (typos in
    values files must not be silently ignored)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        where = f"{path}.{k}" if path else str(k)
        if k not in out:
            raise UsageError(f"unknown value {where!r}")
        if isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise UsageError(f"value {where!r} must be a mapping")
            # resources and similar maps are replaced wholesale below their known keys
            if where.endswith("resources"):
                out[k] = copy.deepcopy(dict(v))
            else:
                out[k] = merge_values(out[k], v, where)
        else:
            if isinstance(out[k], list) and not isinstance(v, list):
                raise UsageError(f"value {where!r} must be a list")
            out[k] = copy.deepcopy(v)
    return out


def parse_set(expr: str) -> Obj:
    """`a.b.c=value` → {"a": {"b": {"c": value}}}; the value is a YAML scalar/flow value."""
    key, sep, raw = expr.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {expr!r}: expected KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {expr!r}: {exc}") from None
    if isinstance(value, float):  # no value of ours is a float; "1.10" is a tag, not 1.1
        value = raw
    out: Obj = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out
