"""The CNI plugin run as the runtime runs it (its own process, env + stdin) with malformed
input, talking to a real ztunnel's enrolment socket: every refusal is one CNI error result
with a code that names the problem (never "internal error", never a traceback), a good ADD
works right after, and ztunnel's fds are back at their baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.adversarial.inputs.inputkit import ROOT, Ztunnel, eventually, ztunnel

PLUGIN = ROOT / "cni" / "plugin.py"  # the very file the installer copies to the host
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}


@pytest.fixture(scope="module")
def zt(tmp_path_factory: pytest.TempPathFactory) -> object:
    with ztunnel(tmp_path_factory.mktemp("cni")) as z:
        yield z


def run_plugin(env: dict[str, str], stdin: bytes) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    p = subprocess.run(
        [sys.executable, str(PLUGIN)], input=stdin, env={**base, **env},
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def add_env(name: str = "web", ns: str = "plain") -> dict[str, str]:
    return {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent/netns",
        "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}",
    }  # fmt: skip


def conf(z: Ztunnel, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "k8s", "type": "ambientmesh-cni",
            "enrolSocket": str(z.enrol), "prevResult": PREV, **extra}  # fmt: skip


def good_add(z: Ztunnel) -> None:
    rc, out, err = run_plugin(add_env(), json.dumps(conf(z)).encode())
    assert rc == 0, (out, err)
    assert json.loads(out)["interfaces"] == PREV["interfaces"]


CASES: list[tuple[str, dict[str, str] | None, Any, int]] = [
    ("garbage", None, b"\x00\xff\xfe garbage", 4),
    ("truncated", None, b'{"cniVersion": "1.0.0", "prevResult": {"ips', 4),
    ("array", None, b"[1, 2, 3]", 4),
    ("deep", None, b"[" * 200000, 4),
    ("huge", None, b'{"cniVersion": "1.0.0", "x": "' + b"a" * (16 << 20) + b'"}', 4),
    ("version", None, {"cniVersion": "9.9.9"}, 1),
    ("version-type", None, {"cniVersion": 1}, 4),
    ("no-prev", None, {"prevResult": None}, 4),
    ("prev-type", None, {"prevResult": "x"}, 4),
    ("timeout-type", None, {"timeoutSeconds": "5"}, 4),
    ("timeout-nan", None, b"NaN", 4),
    ("logfile-fd", None, {"logFile": 1}, 4),
    ("socket-type", None, {"enrolSocket": ["a"]}, 4),
    ("exclude-type", None, {"excludeNamespaces": "kube-system"}, 4),
    ("command", {"CNI_COMMAND": "DESTROY"}, {}, 7),
    ("no-netns", {"CNI_NETNS": ""}, {}, 7),
    ("no-container", {"CNI_CONTAINERID": ""}, {}, 7),
]


@pytest.mark.parametrize(
    ("env", "stdin", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_invocation_is_a_cni_error(
    zt: Ztunnel, env: dict[str, str] | None, stdin: Any, code: int
) -> None:
    base = zt.fds()
    if isinstance(stdin, dict):
        stdin = json.dumps(conf(zt, **stdin)).encode()
    elif stdin == b"NaN":
        stdin = json.dumps(conf(zt)).replace('"type"', '"timeoutSeconds": NaN, "type"').encode()
    rc, out, err = run_plugin({**add_env(), **(env or {})}, stdin)
    assert rc == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = out.splitlines()
    assert len(lines) == 1, out
    res = json.loads(lines[0])
    assert res["code"] == code, res
    assert not res["msg"].startswith("internal error"), res
    good_add(zt)
    assert eventually(lambda: zt.fds() <= base), (zt.fds(), base)


def test_ambient_pod_with_bad_netns_is_an_enrolment_error(zt: Ztunnel) -> None:
    """ztunnel's own refusal (the netns does not exist) arrives as code 100 with its reason."""
    rc, out, _ = run_plugin(add_env(ns="shop"), json.dumps(conf(zt)).encode())
    assert rc == 1
    res = json.loads(out)
    assert res["code"] == 100 and "/nonexistent/netns" in res["msg"], res
    good_add(zt)
