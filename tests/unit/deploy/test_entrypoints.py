"""Every container a manifest starts is parsed with our real argument parsers, so a manifest can
never name a module, console script or flag that does not exist (or a flag combination the
process refuses at start), nor a file it does not mount.

Covered: every container of every object `meshctl install --render` produces (with default and
non-default values), and the waypoint Deployment the controller creates for a Gateway."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl.install import render
from waypoint.controller import desired_objects

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Flags whose value is a path on the host, not in the container: the CNI installer writes the
# enrolment socket's host path into the CNI config the runtime (on the host) hands the plugin.
HOST_PATH_FLAGS = {"ztunnel.cni_install": {"--enrol-socket"}}


def _pod_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if "template" in spec:
        yield spec["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield spec


def containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for obj in objs:
        for pod in _pod_specs(obj):
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                yield f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c, pod


def _module_of(command: list[str]) -> str:
    """The Python module a container command runs: `python3 -m M` or a console script."""
    if command[0] in ("python", "python3") and command[1:2] == ["-m"]:
        return command[2]
    assert len(command) == 1, f"unexpected command {command}"
    assert command[0] in SCRIPTS, f"{command[0]!r} is no console script of ours ({SCRIPTS})"
    return SCRIPTS[command[0]].split(":")[0]


def _parser_for(module: str) -> tuple[argparse.ArgumentParser, Callable[..., str | None] | None]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"no module {module}"
    if spec.submodule_search_locations:  # a package: `-m pkg` runs pkg/__main__.py
        assert importlib.util.find_spec(f"{module}.__main__"), f"{module} has no __main__"
        main_mod = importlib.import_module(f"{module}.main")
    else:
        source = Path(spec.origin).read_text()
        assert 'if __name__ == "__main__":' in source, f"`python -m {module}` would do nothing"
        main_mod = importlib.import_module(module)
    build = getattr(main_mod, "build_parser", None)
    assert callable(build), f"{main_mod.__name__} has no build_parser()"
    return build(), getattr(main_mod, "check_args", None)


def _expand(arg: str, env: dict[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not in the container's env"
        return env[m.group(1)]

    return VAR.sub(sub, arg)


def check_container(where: str, c: dict[str, Any], pod: dict[str, Any]) -> argparse.Namespace:
    env = {e["name"]: f"value-of-{e['name'].lower()}" for e in c.get("env", [])}
    args = [_expand(a, env, where) for a in c.get("args", [])]
    module = _module_of(c["command"])
    parser, check = _parser_for(module)
    parser.exit_on_error = False
    errors: list[str] = []
    parser.error = lambda msg: errors.append(msg)  # type: ignore[assignment,method-assign]
    try:
        ns = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise AssertionError(f"{where}: {c['command']} {args}: {exc}") from None
    assert not errors, f"{where}: {c['command']} {args}: {errors}"
    if check is not None:
        problem = check(ns)
        assert problem is None, f"{where}: the process would refuse to start: {problem}"
    # Every absolute path passed as a flag value must be inside a mount of this container.
    mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        assert m["name"] in volumes, f"{where}: mount of undeclared volume {m['name']}"
    host_flags = HOST_PATH_FLAGS.get(module, set())
    for prev, a in zip(["", *args], args, strict=False):
        if a.startswith("/") and prev not in host_flags:
            assert any(a.startswith(m) or a + "/" == m for m in mounts), (
                f"{where}: {a} is not inside any volume mount {mounts}"
            )
    return ns


def _all_renders() -> list[dict[str, Any]]:
    other = {
        "namespace": "mesh",
        "trustDomain": "example.org",
        "logLevel": "debug",
        "ztunnel": {"extraArgs": ["--ktls", "off"]},
        "ca": {"port": 9443, "tokenAudience": "mesh-ca"},
    }
    return [*render(), *render(other)]


CASES = list(containers(_all_renders()))


@pytest.mark.parametrize(("where", "c", "pod"), CASES, ids=[w for w, _, _ in CASES])
def test_rendered_container_commands_parse(
    where: str, c: dict[str, Any], pod: dict[str, Any]
) -> None:
    check_container(where, c, pod)


def test_every_process_of_the_install_is_covered() -> None:
    modules = {_module_of(c["command"]) for _, c, _ in containers(render())}
    assert modules == {
        "ztunnel.main",
        "ztunnel.cni_install",
        "certs.service",
        "waypoint.controller",
    }


def test_waypoint_deployment_of_the_controller_parses() -> None:
    gw = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u1"},
        "spec": {
            "gatewayClassName": "waypoint",
            "listeners": [{"port": 15009, "protocol": "HBONE"}],
        },
    }
    objs = desired_objects(gw, image="img", trust_domain="example.org")
    ((where, c, pod),) = containers(objs)
    ns = check_container(where, c, pod)
    assert ns.namespace == "shop" and ns.hbone_addr.endswith(":15009")


def test_ztunnel_daemonset_runs_kubernetes_mode() -> None:
    (entry,) = [x for x in containers(render()) if x[0] == "DaemonSet/ztunnel/ztunnel"]
    ns = check_container(*entry)
    assert ns.kube and ns.ca and ns.ca_token and ns.ca_bundle and not ns.node_cert
    assert ns.redirect == "bpf" and ns.bpf_pin_root and ns.enrol_socket
    assert ns.node == "value-of-node_name"


def test_the_checker_can_fail() -> None:
    """The checks above must be able to fail: a misspelt flag, a module that does not exist, a
    flag combination the process refuses, and an unmounted path are all caught."""
    (where, c, pod) = next(x for x in containers(render()) if x[0] == "DaemonSet/ztunnel/ztunnel")
    bad = [
        {**c, "args": [*c["args"], "--ca-tokn", "x"]},
        {**c, "command": ["python3", "-m", "ztunnel.nonexistent"]},
        {**c, "command": ["ambientmesh-nonexistent"]},
        {
            **c,
            "args": [
                a for a in c["args"] if a not in ("--ca-token", "/var/run/secrets/tokens/ca-token")
            ],
        },
        {**c, "args": [*c["args"], "--config", "/etc/nowhere/mesh.yaml"]},
        {**c, "args": [*c["args"], "--kubeconfig", "/sys/fs/bpf/kubeconfig", "--node", "$(NOPE)"]},
    ]
    for b in bad:
        with pytest.raises(AssertionError):
            check_container(where, b, pod)
