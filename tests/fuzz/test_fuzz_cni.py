"""The CNI plugin's input (CNI_* environment and the network config on stdin) fuzzed in
process: every input gets at most one JSON line on stdout, and every failure is a CNI error
result whose code says what was wrong, never "internal error" (an unhandled input)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fuzz.seeds import cni_seeds
from benchmarks.fuzz.targets import CniTarget
from tests.fuzz.fuzzkit import CI


@pytest.fixture(scope="module")
def target() -> Iterator[CniTarget]:
    t = CniTarget()
    yield t
    t.close()


_ANY: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**64), 2**64),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)  # fmt: skip
_KEYS = st.sampled_from(
    ["cniVersion", "name", "type", "prevResult", "enrolSocket", "timeoutSeconds",
     "excludeNamespaces", "kubeconfig", "meshConfig", "cgroupRoot", "logFile"]
)  # fmt: skip
_GOOD = {
    "cniVersion": st.sampled_from(["1.0.0", "0.4.0", "0.3.1", "0.2.0", "2.0", ""]),
    "prevResult": st.just({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}]}),
    "timeoutSeconds": st.one_of(st.floats(0.01, 1), st.just(0), st.just(-1), st.just(1e300)),
    "excludeNamespaces": st.lists(st.sampled_from(["kube-system", "shop"]), max_size=2),
}


@st.composite
def invocations(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    env = {
        "CNI_COMMAND": draw(st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "GET", ""])),
        "CNI_IFNAME": "eth0",
    }
    if draw(st.booleans()):
        env["CNI_CONTAINERID"] = draw(st.sampled_from(["c1", "x" * 200]))
    if draw(st.booleans()):
        env["CNI_NETNS"] = "/var/run/netns/p"
    args = draw(st.lists(st.sampled_from(
        ["K8S_POD_NAMESPACE=shop", "K8S_POD_NAME=web", "K8S_POD_NAMESPACE=kube-system",
         "IgnoreUnknown=1", "=", ";;", "K8S_POD_NAME"]), max_size=4))  # fmt: skip
    env["CNI_ARGS"] = ";".join(args)
    conf: dict[str, Any] = {}
    for key in draw(st.lists(_KEYS, max_size=6, unique=True)):
        good = _GOOD.get(key)
        conf[key] = draw(good) if good is not None and draw(st.booleans()) else draw(_ANY)
    stdin = json.dumps(conf) if draw(st.integers(0, 9)) else draw(st.text(max_size=30))
    return env, stdin


@CI
@given(inv=invocations())
def test_invocations(target: CniTarget, inv: tuple[dict[str, str], str]) -> None:
    target.run(*inv)


@CI
@given(seed=st.sampled_from(cni_seeds()), cut=st.integers(0, 300), junk=st.binary(max_size=8))
def test_seeds_spliced(target: CniTarget, seed: bytes, cut: int, junk: bytes) -> None:
    target(seed[:cut] + junk + seed[cut:])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("logFile", 1),  # once opened as fd 1: the plugin closed its own stdout
        ("timeoutSeconds", "5"),
        ("timeoutSeconds", float("nan")),
        ("timeoutSeconds", 1e300),
        ("excludeNamespaces", "kube-system"),
        ("enrolSocket", ["a"]),
        ("cniVersion", 1),
    ],
)
def test_wrong_types_are_netconf_errors(target: CniTarget, key: str, value: Any) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/n",
           "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"}  # fmt: skip
    conf = {"cniVersion": "1.0.0", "prevResult": {}, key: value}
    res = target.run(env, json.dumps(conf))
    assert res is not None and res["code"] == 4, res
    assert key in res["msg"]


def test_deep_json_is_a_netconf_error(target: CniTarget) -> None:
    res = target.run({"CNI_COMMAND": "VERSION"}, "[" * 100000)
    assert res is not None and res["code"] == 4, res
