"""The access-log line and its batched writer: the same bytes as the logger's path, written
off the event loop, and a stalled output costs lines (counted), never the loop's time."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import accesslog
from mesh.accesslog import AccessLogWriter, AccessRecord, json_line, log_access, text_line
from ztunnel.main import JsonFormatter

F_SETPIPE_SZ = 1031


def _dumps(r: AccessRecord, now: float) -> str:
    """The line as the first version built it: json.dumps of the fields."""
    d = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "reporter": r.reporter,
        "protocol": r.protocol,
        "src.addr": r.src,
        "dst.addr": r.dst,
        "src.identity": r.src_identity,
        "dst.identity": r.dst_identity,
        "dst.service": r.service,
        "bytes_sent": r.bytes_sent,
        "bytes_recv": r.bytes_received,
        "duration_ms": round(r.duration_s * 1000.0, 3),
        "verdict": r.verdict,
        "response_flags": r.response_flags,
        "policy": r.policy,
        "mtls": r.mtls,
    }
    if r.protocol != "tcp":
        d.update(method=r.method, path=r.path, status=r.status)
    if r.audit_policy is not None:
        d.update(audited=True, audit_policy=r.audit_policy)
    if r.shadow is not None:
        d.update(shadow_result=r.shadow, shadow_policy=r.shadow_policy)
    if r.trace_id is not None:
        d.update(trace_id=r.trace_id, span_id=r.span_id)
        if r.parent_span_id is not None:
            d["parent_span_id"] = r.parent_span_id
    if r.retry_skipped is not None:
        d["retry_skipped"] = r.retry_skipped
    if r.mirror_skipped is not None:
        d["mirror_skipped"] = r.mirror_skipped
    return json.dumps(d, separators=(",", ":"))


text = st.text(max_size=20)
opt = st.none() | text
records = st.builds(
    AccessRecord,
    src=text,
    dst=text,
    src_identity=opt,
    dst_identity=opt,
    service=opt,
    bytes_sent=st.integers(0, 2**40),
    bytes_received=st.integers(0, 2**40),
    duration_s=st.floats(0, 1e6, allow_nan=False) | st.sampled_from([float("inf")]),
    verdict=st.sampled_from(["allow", "deny", "error"]),
    response_flags=text,
    policy=opt,
    mtls=st.booleans(),
    protocol=st.sampled_from(["tcp", "http", "grpc"]),
    method=opt,
    path=opt,
    status=st.none() | st.integers(0, 999),
    reporter=text,
    audit_policy=opt,
    shadow=opt,
    shadow_policy=opt,
    trace_id=opt,
    span_id=opt,
    parent_span_id=opt,
    retry_skipped=opt,
    mirror_skipped=opt,
)


@settings(max_examples=150, deadline=None)
@given(records, st.floats(0, 4e9))
def test_line_is_what_json_dumps_wrote(r: AccessRecord, now: float) -> None:
    assert r.to_json(now) == _dumps(r, now)


@settings(max_examples=50, deadline=None)
@given(records, st.floats(1e9, 4e9))
def test_rendered_lines_match_the_log_formatters(r: AccessRecord, now: float) -> None:
    msg = r.to_json(now)
    rec = logging.LogRecord("mesh.access", logging.INFO, __file__, 1, msg, None, None)
    rec.created, rec.msecs = now, int((now - int(now)) * 1000) + 0.0
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    assert text_line(now, msg) == fmt.format(rec) + "\n"
    assert json_line(now, msg) == JsonFormatter().format(rec) + "\n"


def _rec(i: int) -> AccessRecord:
    return AccessRecord(f"10.0.0.{i % 250}:1", "10.0.1.1:80", None, None, "svc", i, 2 * i,
                        0.001, "allow", protocol="http", method="GET", path=f"/{i}",
                        status=200)  # fmt: skip


def _read_all(fd: int) -> bytes:
    out = b""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def test_writer_batches_lines_through_its_thread() -> None:
    r, w = os.pipe()
    writer = AccessLogWriter(w, interval=0.01)
    accesslog.install(writer)
    access = logging.getLogger("mesh.access")
    level = access.level
    try:
        access.setLevel(logging.INFO)
        for i in range(100):
            log_access(_rec(i))
        assert writer.written == 0  # queued, not written on the request's path
        await asyncio.sleep(0.05)
        assert writer.wait_written()
        lines = _read_all(r).decode().splitlines()
    finally:
        access.setLevel(level)
        assert accesslog.uninstall() is writer
        writer.close()
        os.close(r)
        os.close(w)
    assert len(lines) == 100 and writer.written == 100
    assert [json.loads(ln.split(" INFO ", 1)[1])["path"] for ln in lines] == [
        f"/{i}" for i in range(100)
    ]
    assert all(" mesh.access INFO {" in ln for ln in lines)


async def test_a_stalled_output_never_blocks_the_loop() -> None:
    """Nobody reads the pipe: the writer thread blocks in write(2), the loop does not; past
    the bound lines are dropped and counted, and the output says so once it moves again."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    writer = AccessLogWriter(w, interval=0.005, max_buffered=64 * 1024)
    try:
        t0 = time.monotonic()
        for i in range(5000):
            writer.add(_rec(i))
            if i % 100 == 0:
                await asyncio.sleep(0)
        writer.flush()
        assert time.monotonic() - t0 < 10  # (a blocked loop would never get here)
        assert writer.dropped > 0
        got = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got += _read_all(r)
            if writer.wait_written(0.05):
                got += _read_all(r)
                break
        lines = got.decode().splitlines()
    finally:
        writer.close()
        os.close(r)
        os.close(w)
    notes = [json.loads(ln.split(" INFO ", 1)[1]) for ln in lines if "access_log_dropped" in ln]
    assert notes and sum(n["access_log_dropped"] for n in notes) == writer.dropped > 0
    assert writer.written == len(lines) - len(notes) > 0
    assert writer.written + writer.dropped == 5000


def test_without_a_writer_lines_go_to_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    assert accesslog.uninstall() is None
    with caplog.at_level(logging.INFO, logger="mesh.access"):
        log_access(_rec(7))
    (rec,) = caplog.records
    assert json.loads(rec.getMessage())["path"] == "/7"


def test_a_process_writes_its_access_lines_to_stderr_in_its_log_format() -> None:
    """`mesh.process.run` installs the writer; what is queued at exit is still written."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = (
        "import asyncio\n"
        "from mesh import accesslog, process\n"
        "from mesh.accesslog import AccessRecord, log_access\n"
        "async def main():\n"
        "    for i in range(3):\n"
        "        log_access(AccessRecord('a', 'b', None, None, None, i, 0, 0.0, 'allow'))\n"
        "    await asyncio.sleep(0)\n"
        "raise SystemExit(process.run('t', main(), access_line=accesslog.json_line))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stderr.splitlines() if "mesh.access" in ln]
    assert [(ln["logger"], ln["bytes_sent"]) for ln in lines] == [
        ("mesh.access", i) for i in range(3)
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9000), min_size=1, max_size=40))
def test_into_a_pipe_batches_go_in_whole_lines_of_at_most_pipe_buf(lengths: list[int]) -> None:
    """Beyond PIPE_BUF a pipe may interleave another writer's bytes into ours (the logger's
    own lines share stderr): pieces end at line ends, and only a longer line goes alone."""
    import select

    data = b"".join(b"x" * n + b"\n" for n in lengths)
    r, w = os.pipe()
    writer = AccessLogWriter(w)
    try:
        pieces = writer._pieces(data)
    finally:
        writer.close()
        os.close(r)
        os.close(w)
    assert b"".join(pieces) == data
    for p in pieces:
        assert p.endswith(b"\n")
        assert len(p) <= select.PIPE_BUF or p.count(b"\n") == 1
