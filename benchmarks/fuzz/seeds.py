"""Well-formed inputs for each target: where mutation starts, so the fuzzer reaches the deep
states (an established CONNECT stream, a chunked body, a full Service) without guessing them."""

from __future__ import annotations

import json
from pathlib import Path

import h2.config
import h2.connection
import h2.errors

ROOT = Path(__file__).resolve().parents[2]


def _h2_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.data_to_send()  # the preface: each target adds its own
    return c


def _frames_after_preface(c: h2.connection.H2Connection) -> bytes:
    return bytes(c.data_to_send())


def hbone_seeds() -> list[bytes]:
    """What a client sends after the preface: SETTINGS, CONNECTs, DATA, resets, GOAWAY."""
    out: list[bytes] = []
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    settings = bytes(c.data_to_send())[24:]
    out.append(settings)
    for variant in range(4):
        c = _h2_client()
        buf = settings
        for i in range(3):
            sid = c.get_next_available_stream_id()
            auth = "10.0.0.1:1" if i == 1 else f"10.0.0.{i + 2}:8080"
            c.send_headers(sid, [(":method", "CONNECT"), (":authority", auth)])
            if variant >= 1:
                c.send_data(sid, b"x" * (100 * (i + 1)))
            if variant == 2:
                c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            if variant == 3:
                c.end_stream(sid)
        if variant == 3:
            c.increment_flow_control_window(1000)
            c.ping(b"12345678")
            c.close_connection()
        out.append(buf + _frames_after_preface(c))
    c = _h2_client()
    c.send_headers(1, [(":method", "GET"), (":path", "/"), (":authority", "a"), (":scheme", "h")])
    out.append(settings + _frames_after_preface(c))
    return out


def h1_seeds() -> list[bytes]:
    return [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]


def h2_seeds() -> list[bytes]:
    out: list[bytes] = []
    for variant in range(3):
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        buf = bytes(c.data_to_send())[24:]
        for i in range(2):
            sid = c.get_next_available_stream_id()
            hs = [(":method", "POST"), (":path", f"/{i}"), (":authority", "a"), (":scheme", "http")]
            if variant == 1:
                hs.append(("content-length", "3"))
            c.send_headers(sid, hs, end_stream=variant == 0)
            if variant:
                c.send_data(sid, b"abc")
                if variant == 2:
                    c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                else:
                    c.end_stream(sid)
        out.append(buf + bytes(c.data_to_send()))
    return out


def config_seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted((ROOT / "deploy" / "examples").glob("*.yaml"))]
    return [s for s in seeds if len(s) < 64 * 1024] or [b"kind: Namespace\n"]


def cni_seeds() -> list[bytes]:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    conf = {"cniVersion": "1.0.0", "name": "k8s", "type": "ambientmesh-cni", "prevResult": prev}
    env = "ADD;c1;/var/run/netns/p;eth0;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"
    return [
        f"{env}\n{json.dumps(conf)}".encode(),
        f"{env}\n{json.dumps({**conf, 'meshConfig': 'x', 'timeoutSeconds': 1})}".encode(),
        f"DEL;c1;/n;eth0;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web\n{json.dumps(conf)}".encode(),
        b'VERSION\n{"cniVersion":"0.4.0"}',
        f"CHECK;c1;/n;eth0;\n{json.dumps(conf)}".encode(),
    ]


SEEDS = {
    "hbone": hbone_seeds,
    "h1": h1_seeds,
    "h2": h2_seeds,
    "config": config_seeds,
    "cni": cni_seeds,
}
