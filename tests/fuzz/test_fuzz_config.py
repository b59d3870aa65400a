"""The config parser fed arbitrary documents: the result is a Snapshot or a ConfigErrors whose
every entry names an object, never another exception (a bad file must not stop a reload)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fuzz.seeds import config_seeds
from benchmarks.fuzz.targets import ConfigTarget
from mesh.config.parse import ConfigErrors, load_snapshot
from tests.fuzz.fuzzkit import CI


@pytest.fixture(scope="module")
def target() -> Iterator[ConfigTarget]:
    t = ConfigTarget()
    yield t
    t.close()


_KINDS = st.sampled_from(
    ["Namespace", "Pod", "Service", "Node", "Gateway", "HTTPRoute", "AuthorizationPolicy",
     "PeerAuthentication", "List", "ConfigMap", "GRPCRoute", "NetworkPolicy",
     "CiliumNetworkPolicy", "RequestAuthentication"]
)  # fmt: skip
_APIS = st.sampled_from(
    ["v1", "gateway.networking.k8s.io/v1", "security.istio.io/v1", "security.istio.io/v1beta1",
     "networking.k8s.io/v1", "cilium.io/v2"]
)  # fmt: skip
_KEYS = st.sampled_from(
    ["name", "namespace", "labels", "spec", "status", "ports", "port", "targetPort", "clusterIP",
     "selector", "matchLabels", "podIP", "nodeName", "serviceAccountName", "rules", "matches",
     "path", "type", "value", "headers", "queryParams", "method", "backendRefs", "weight",
     "filters", "parentRefs", "timeouts", "request", "retry", "attempts", "codes", "action",
     "from", "to", "when", "source", "principals", "ipBlocks", "notIpBlocks", "operation",
     "methods", "paths", "mtls", "mode", "portLevelMtls", "gatewayClassName", "listeners",
     "addresses", "address", "items", "targetRefs", "group", "kind", "requestHeaderModifier",
     "set", "add", "remove", "urlRewrite", "requestRedirect", "statusCode", "requestMirror",
     "backendRef", "creationTimestamp", "protocol", "appProtocol", "hostnames", "service",
     "podSelector", "namespaceSelector", "policyTypes", "ingress", "egress", "ipBlock", "cidr",
     "except", "endpointSelector", "fromEndpoints", "toEndpoints", "toPorts", "toEntities",
     "toCIDR", "authentication", "http", "specs", "jwtRules", "issuer", "jwks", "jwksUri",
     "fromHeaders", "fromParams", "audiences", "key", "values", "notValues",
     "requestPrincipals", "annotations", "data", "prefix", "outputPayloadToHeader"]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["10.0.0.1", "10.0.0.0/8", "::1", "1.2.3.4/99", "80", "10s", "500ms", "x",
                     "PathPrefix", "Exact", "RegularExpression", "(", "ALLOW", "DENY", "STRICT",
                     "ambient", "waypoint", "*", "cluster.local/ns/a/sa/b", "world",
                     "required", "TCP", "UDP", "Ingress", "Egress", "GET", "/api/.*",
                     "request.headers[x]", "request.auth.claims[a][b]", "source.ip", "AUDIT",
                     "configmap://a/b/c", "file:///nonexistent", '{"keys": []}']),
)  # fmt: skip
_VALUES: st.SearchStrategy[Any] = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=25,
)


@st.composite
def documents(draw: st.DrawFn) -> list[Any]:
    docs: list[Any] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 9)) == 0:
            docs.append(draw(_VALUES))
            continue
        meta = draw(st.dictionaries(_KEYS, _VALUES, max_size=3))
        if draw(st.booleans()):
            meta["name"] = draw(st.sampled_from(["a", "b", "Bad_Name", "", "x" * 300]))
        doc = {"kind": draw(_KINDS), "apiVersion": draw(_APIS), "metadata": meta}
        doc["spec"] = draw(_VALUES)
        doc.update(draw(st.dictionaries(_KEYS, _VALUES, max_size=2)))
        docs.append(doc)
    return docs


@CI
@given(docs=documents())
def test_documents(target: ConfigTarget, docs: list[Any]) -> None:
    target(yaml.safe_dump_all(docs).encode())


@CI
@given(seed=st.sampled_from(config_seeds()), cut=st.integers(0, 4000), junk=st.text(max_size=16))
def test_seed_files_spliced(target: ConfigTarget, seed: bytes, cut: int, junk: str) -> None:
    target(seed[:cut] + junk.encode() + seed[cut:])


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 5000,  # deeper than the parser's recursion limit
        b"a: &x [*x]\n",  # a recursive alias
        b"- &a [x, x]\n- &b [*a, *a]\n- &c [*b, *b]\n- &d [*c, *c]\n- [*d, *d]\n",
        b"\xff\xfe\x00",
        b"kind: Pod\napiVersion: v1\nmetadata: {name: !!python/object:os.system x}\n",
        b"kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {ports: [{port: 1e999}]}\n",
        b"kind: List\nitems:\n"
        + b"".join(b"  " * i + b"- kind: List\n" + b"  " * i + b"  items:\n" for i in range(400)),
    ],
    ids=[
        "deep-flow",
        "recursive-alias",
        "alias-bomb",
        "bad-utf8",
        "python-tag",
        "huge-float",
        "deep-lists",
    ],
)
def test_hostile_files(target: ConfigTarget, text: bytes) -> None:
    target(text)


def test_list_containing_itself_is_a_config_error(tmp_path: Path) -> None:
    """`&a {kind: List, items: [*a]}` once recursed until RecursionError escaped the parser
    (a reload would have died on it instead of keeping the last good snapshot)."""
    f = tmp_path / "loop.yaml"
    f.write_text("&a {kind: List, items: [*a]}\n")
    with pytest.raises(ConfigErrors) as err:
        load_snapshot([f])
    assert err.value.errors[0].obj == "List" and err.value.errors[0].field_path == "items"


def test_deep_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text("[" * 5000)
    with pytest.raises(ConfigErrors) as err:
        load_snapshot([f])
    assert err.value.errors[0].obj == f"file {f}"
