"""`meshctl config validate` as an operator runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "meshctl.cli", "config", "validate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_validate_ok() -> None:
    out = run(str(ROOT / "deploy" / "examples" / "kinds.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "ok: 10 objects\n"


def test_validate_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {clusterIP: 10.1.1.1, ports: [{port: 0}, {port: 80, targetPort: 99999}]}\n"
    )
    out = run(str(tmp_path))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "Service default/web: spec.ports[0].port must be between 1 and 65535",
        "Service default/web: spec.ports[1].targetPort must be between 1 and 65535",
    ]


SERVICE = (
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
    "spec: {clusterIP: 10.1.1.1, ports: [{port: 80}]}\n"
)


def test_validate_names_every_ignored_kind(tmp_path: Path) -> None:
    f = tmp_path / "mixed.yaml"
    f.write_text(
        SERVICE + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm, namespace: shop}\n"
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
        "---\napiVersion: example.com/v9\nkind: HTTPRoute\nmetadata: {name: odd, namespace: a}\n"
    )
    out = run(str(f))
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines() == [
        "ignored: ConfigMap shop/cm (v1): not a kind the mesh reads",
        "ignored: Deployment web (apps/v1): not a kind the mesh reads",
        "ignored: HTTPRoute a/odd (example.com/v9): not a kind the mesh reads",
        "ok: 1 objects, 3 ignored",
    ]


def test_validate_never_says_ok_about_nothing(tmp_path: Path) -> None:
    f = tmp_path / "only.yaml"
    f.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n")
    out = run(str(f))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "ignored: ConfigMap cm (v1): not a kind the mesh reads",
        "error: no mesh objects read (1 ignored)",
    ]
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    out = run(str(empty))
    assert out.returncode == 1
    assert "ok" not in out.stdout


def test_validate_ok_counts_ignored(tmp_path: Path) -> None:
    f = tmp_path / "two.yaml"
    f.write_text(SERVICE + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    out = run(str(f))
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines() == [
        "ignored: Secret s (v1): not a kind the mesh reads",
        "ok: 1 objects, 1 ignored",
    ]


def test_validate_reads_grpc_route(tmp_path: Path) -> None:
    f = tmp_path / "grpc.yaml"
    route = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n"
        "metadata: {name: echo, namespace: grpc}\n"
        "spec:\n  parentRefs: [{kind: Service, group: '', name: echo}]\n"
        "  rules:\n  - matches: [{method: {service: echo.Echo, method: %s}}]\n"
        "    backendRefs: [{name: echo, port: 50051}]\n"
    )
    f.write_text(route % "Say")
    out = run(str(f))
    assert (out.returncode, out.stdout) == (0, "ok: 1 objects\n")
    f.write_text(route % "'Say/Hi'")
    out = run(str(f))
    assert out.returncode == 1
    assert out.stdout == (
        "GRPCRoute grpc/echo: spec.rules[0].matches[0].method.method "
        "'Say/Hi' is not a valid gRPC method name\n"
    )


def test_validate_knows_network_policies() -> None:
    """Before NetworkPolicy and CiliumNetworkPolicy were read, the five policies of this file
    were listed as ignored and the count was 9."""
    out = run(str(ROOT / "deploy" / "examples" / "cilium" / "policies.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "ok: 14 objects\n"


def test_validate_names_unsupported_cilium_field(tmp_path: Path) -> None:
    bad = tmp_path / "cnp.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
        "spec: {endpointSelector: {}, egress: [{toFQDNs: [{matchName: a.example}]}]}\n"
    )
    out = run(str(bad))
    assert out.returncode == 1
    assert out.stdout.startswith(
        "CiliumNetworkPolicy default/p: spec.egress[0].toFQDNs is not supported: "
    )
