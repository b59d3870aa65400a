"""Every container the installation (and the waypoint controller) deploys starts one of our
programs with flags that program really has: each command + args is parsed by that program's
own argparse parser, so a manifest can never name a module or flag that does not exist."""

from __future__ import annotations

import argparse
import importlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.waypoint import desired_objects
from meshctl.install import render

CONSOLE_SCRIPTS = {"ztunnel": "ztunnel.main", "waypoint": "waypoint.main"}
# (program, flag) whose absolute path is not opened in the container: the CNI installer
# writes the host's enrolment socket path into the plugin config the host runs
NOT_FILES = frozenset({("cni.install", "--enrol-socket")})


def parser_module(command: list[str]) -> str:
    if command[:2] in (["python3", "-m"], ["python", "-m"]):
        return command[2]
    return CONSOLE_SCRIPTS[command[0]]


def parser_for(command: list[str]) -> tuple[Callable[[], argparse.ArgumentParser], list[str]]:
    """The parser behind a container command, and the args the command itself carries."""
    if command[:2] in (["python3", "-m"], ["python", "-m"]):
        module, rest = command[2], command[3:]
    elif command[0] in CONSOLE_SCRIPTS:
        module, rest = CONSOLE_SCRIPTS[command[0]], command[1:]
    else:
        raise AssertionError(f"container command {command} is not one of our programs")
    mod = importlib.import_module(module)
    build = getattr(mod, "build_parser", None)
    assert callable(build), f"{module} has no build_parser()"
    return build, rest


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{d['kind']}/{d['metadata']['name']}/{c['name']}", c


def cases() -> list[tuple[str, dict[str, Any]]]:
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u1"},
        "spec": {
            "gatewayClassName": "waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }
    waypoint = desired_objects(gateway, image="img", trust_domain="cluster.local")
    return [*containers(render()), *containers(waypoint)]


@pytest.mark.parametrize(("where", "container"), cases(), ids=[w for w, _ in cases()])
def test_container_args_parse_with_the_programs_own_flags(
    where: str, container: dict[str, Any]
) -> None:
    build, rest = parser_for(container["command"])
    args = [*rest, *container.get("args", [])]
    parser = build()
    parser.exit_on_error = False
    try:
        parsed = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise AssertionError(f"{where}: {' '.join(container['command'])} {args}: {exc}") from None
    module = parser_module(container["command"])
    check = getattr(importlib.import_module(module), "check_args", None)
    if check is not None:  # combinations the program refuses at start
        assert check(parsed) is None, f"{where}: {check(parsed)}"
    # every absolute path a flag names lives in a volume the container mounts
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    for flag, value in itertools.pairwise(args):
        if flag.startswith("--") and value.startswith("/") and (module, flag) not in NOT_FILES:
            assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{where}: {flag} {value} is in no volume mount ({mounts})"
            )


def test_a_wrong_flag_is_caught() -> None:
    """The check itself can fail: a flag the program lacks is reported."""
    build, _ = parser_for(["ztunnel"])
    parser = build()
    parser.exit_on_error = False
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args(["--node", "n1", "--kube", "--ca-dir", "x", "--no-such-flag"])
