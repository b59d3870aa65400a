"""CRDs for Istio's AuthorizationPolicy and PeerAuthentication: structural schemas with the
same fields as Istio's, served as v1 and v1beta1."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from meshctl.install.values import Obj

# -- CRDs ------------------------------------------------------------------------------------


def _s(desc: str = "", **kw: Any) -> Obj:
    out: Obj = {"type": "string", **kw}
    if desc:
        out["description"] = desc
    return out


def _strs(desc: str = "") -> Obj:
    out: Obj = {"type": "array", "items": {"type": "string"}}
    if desc:
        out["description"] = desc
    return out


def _o(props: Mapping[str, Obj], desc: str = "", **kw: Any) -> Obj:
    out: Obj = {"type": "object", "properties": dict(props), **kw}
    if desc:
        out["description"] = desc
    return out


def _selector() -> Obj:
    return _o(
        {
            "matchLabels": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "maxProperties": 4096,
            }
        },
        "Criteria used to select the specific set of pods/VMs on which this policy applies.",
    )


def _target_ref() -> Obj:
    return _o(
        {
            "group": _s("group is the group of the target resource.", maxLength=253),
            "kind": _s("kind is kind of the target resource.", maxLength=63, minLength=1),
            "name": _s("name is the name of the target resource.", maxLength=253, minLength=1),
            "namespace": _s("namespace is the namespace of the referent."),
        },
        "A policy target reference.",
        required=["kind", "name"],
    )


def _authz_spec() -> Obj:
    source = _o(
        {
            k: _strs()
            for k in (
                "principals",
                "notPrincipals",
                "requestPrincipals",
                "notRequestPrincipals",
                "namespaces",
                "notNamespaces",
                "ipBlocks",
                "notIpBlocks",
                "remoteIpBlocks",
                "notRemoteIpBlocks",
                "serviceAccounts",
                "notServiceAccounts",
            )
        },
        "Source specifies the source of a request.",
    )
    operation = _o(
        {
            k: _strs()
            for k in (
                "hosts",
                "notHosts",
                "ports",
                "notPorts",
                "methods",
                "notMethods",
                "paths",
                "notPaths",
            )
        },
        "Operation specifies the operation of a request.",
    )
    rule = _o(
        {
            "from": {"type": "array", "items": _o({"source": source})},
            "to": {"type": "array", "items": _o({"operation": operation})},
            "when": {
                "type": "array",
                "items": _o(
                    {"key": _s(), "values": _strs(), "notValues": _strs()}, required=["key"]
                ),
            },
        }
    )
    return _o(
        {
            "action": _s("Optional.", enum=["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
            "provider": _o(
                {"name": _s()}, "Specifies detailed configuration of the CUSTOM action."
            ),
            "rules": {"type": "array", "items": rule, "maxItems": 512, "description": "Optional."},
            "selector": _selector(),
            "targetRef": _target_ref(),
            "targetRefs": {"type": "array", "items": _target_ref(), "maxItems": 16},
        },
        "Configuration for access control on workloads.",
    )


def _peer_spec() -> Obj:
    mode = _s(
        "Defines the mTLS mode used for peer authentication.",
        enum=["UNSET", "DISABLE", "PERMISSIVE", "STRICT"],
    )
    return _o(
        {
            "mtls": _o({"mode": mode}, "Mutual TLS settings for workload."),
            "portLevelMtls": {
                "type": "object",
                "description": "Port specific mutual TLS settings.",
                "additionalProperties": _o({"mode": mode}),
                "minProperties": 1,
            },
            "selector": _selector(),
        },
        "Peer authentication configuration for workloads.",
    )


def _crd(kind: str, plural: str, spec: Obj, short: list[str], columns: list[Obj]) -> Obj:
    schema = {
        "openAPIV3Schema": _o(
            {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }
        )
    }
    versions = []
    for name, storage in (("v1", False), ("v1beta1", True)):
        versions.append(
            {
                "name": name,
                "served": True,
                "storage": storage,
                "schema": copy.deepcopy(schema),
                "subresources": {"status": {}},
                "additionalPrinterColumns": copy.deepcopy(columns),
            }
        )
    names: Obj = {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "categories": ["istio-io", "security-istio-io"],
    }
    if short:
        names["shortNames"] = short
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.security.istio.io",
            "labels": {"app.kubernetes.io/part-of": "ambientmesh"},
        },
        "spec": {
            "group": "security.istio.io",
            "scope": "Namespaced",
            "names": names,
            "versions": versions,
        },
    }


def crds() -> list[Obj]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return [
        _crd(
            "AuthorizationPolicy",
            "authorizationpolicies",
            _authz_spec(),
            [],
            [
                {
                    "name": "Action",
                    "type": "string",
                    "jsonPath": ".spec.action",
                    "description": "The operation to take.",
                },
                age,
            ],
        ),
        _crd(
            "PeerAuthentication",
            "peerauthentications",
            _peer_spec(),
            ["pa"],
            [
                {
                    "name": "Mode",
                    "type": "string",
                    "jsonPath": ".spec.mtls.mode",
                    "description": "Defines the mTLS mode used for peer authentication.",
                },
                age,
            ],
        ),
    ]
