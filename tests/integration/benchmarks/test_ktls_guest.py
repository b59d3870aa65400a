"""`meshctl bench`'s kTLS guest part, on the host: the rig measures for real (no mesh and the
ztunnel pair with user-space TLS; kTLS needs the guest kernel), its JSON goes through the
host's plumbing (a stand-in for scripts/ktls-guest.sh that runs the same guest code), and the
report section is rendered from that file. What the guest boot itself does is covered by
running scripts/ktls-guest.sh --bench-json (see the README)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import ktls_guest as K
from benchmarks import report
from mesh import ktls

TINY = K.GuestPreset(repeats=2, bulk_mib=4, rate=40.0, duration=0.5, connections=2)
REPO = Path(__file__).resolve().parents[3]


def stand_in(tmp_path: Path, body: str) -> Path:
    """An executable in place of scripts/ktls-guest.sh: takes the same arguments."""
    script = tmp_path / "ktls-guest.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    return K.guest_run(TINY, modes=("nomesh", "userspace"), say=lambda _m: None)


def test_real_small_run_has_every_figure(measured: dict[str, Any]) -> None:
    assert measured["status"] == "ok", measured.get("reason")
    cells = measured["cells"]
    # interleaved: A B, A B
    assert [(c["mode"], c["repeat"]) for c in cells] == [
        ("nomesh", 1), ("userspace", 1), ("nomesh", 2), ("userspace", 2),
    ]  # fmt: skip
    for c in cells:
        assert c["ok"], c
        assert c["bulk"]["mib"] == 4 and c["bulk"]["mib_per_s"] > 0
        assert c["latency"]["completed"] > 0 and c["latency"]["errors"] == 0
    u = [c for c in cells if c["mode"] == "userspace"]
    # the pair ran in its own process, which is what was charged, and it stayed in user space
    assert all(c["hbone_offloaded"] == [False] for c in u)
    assert all(c["latency"]["mesh_cpu_s"] is not None for c in u)
    # its kernel share is a part of its CPU, never more (one tick: two reads of /proc)
    one_tick = 0.01 / (TINY.bulk_mib / 1024)
    for c in u:
        assert 0 <= c["bulk"]["mesh_sys_s_per_gib"] <= c["bulk"]["mesh_cpu_s_per_gib"] + one_tick
    s = measured["summary"]["modes"]
    assert s["nomesh"]["bulk_fraction_of_nomesh"] == 1.0
    assert 0 < s["userspace"]["bulk_fraction_of_nomesh"] < 1.5
    assert s["userspace"]["repeats"] == 2 and s["ktls"]["repeats"] == 0
    assert s["nomesh"]["mesh_cpu_ms_per_request"] is None  # nothing there to charge


def test_report_section_from_the_results_file(measured: dict[str, Any], tmp_path: Path) -> None:
    f = tmp_path / K.RESULT_FILE
    f.write_text(json.dumps(measured))
    results = {"meta": {}, "modes": {}, "ktls_guest": {**json.loads(f.read_text())}}
    md = report.render(results, reference_rate=1000.0, densities=(2,))
    sec = report.ktls_guest_section(results)
    assert sec in md
    assert sec.startswith(f"## kTLS (guest kernel {measured['kernel']} under QEMU/TCG)")
    assert "in-process ztunnel pair" in sec and "2 times, interleaved" in sec
    row = next(ln for ln in sec.splitlines() if ln.startswith("| ztunnel pair, user-space"))
    mib = measured["summary"]["modes"]["userspace"]["bulk_mib_per_s"]
    assert f"{mib:,.1f}" in row
    ktls_row = next(ln for ln in sec.splitlines() if ln.startswith("| ztunnel pair, kTLS"))
    assert set(ktls_row.replace("|", " ").split()[5:]) == {"-"}  # not run here: no figures
    assert "| ratio" in sec


def test_kernel_without_ktls_fails_the_guest_part_with_the_reason() -> None:
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    res = K.guest_run(TINY, say=lambda _m: None)
    assert res["status"] == "failed" and "no kTLS in the guest" in res["reason"]
    sec = report.ktls_guest_section({"ktls_guest": res})
    assert "Failed: no kTLS in the guest" in sec


def test_host_collects_the_guest_json(measured: dict[str, Any], tmp_path: Path) -> None:
    """The host's side end to end against a stand-in that writes what the guest would."""
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS: the host lab runs ambient-ktls instead")
    src = tmp_path / "from-guest.json"
    src.write_text(json.dumps(measured))
    # the real script's argument shape: --no-tests --bench-json PATH [--quick]
    script = stand_in(tmp_path, f'[ "$1 $2" = "--no-tests --bench-json" ] || exit 9\n'
                                f'echo "[guest] working"\ncp {src} "$3"\n')  # fmt: skip
    lines: list[str] = []
    res = K.host_run(tmp_path / "out", True, lines.append, timeout=60, script=script)
    assert res["status"] == "ok"
    assert res["summary"] == measured["summary"]
    assert (tmp_path / "out" / K.RESULT_FILE).exists()
    assert any("[guest] working" in ln for ln in lines)


def test_host_reports_skip_failure_and_timeout(tmp_path: Path) -> None:
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    skip = stand_in(tmp_path, 'echo "SKIPPED: QEMU cannot run here: no qemu"\n')
    res = K.host_run(tmp_path / "a", True, lambda _m: None, timeout=60, script=skip)
    assert res == {"status": "skipped", "reason": "QEMU cannot run here: no qemu"}
    broken = stand_in(tmp_path, "echo guest fell over\nexit 3\n")
    res = K.host_run(tmp_path / "b", True, lambda _m: None, timeout=60, script=broken)
    assert res["status"] == "failed" and "exit 3" in res["reason"]
    assert "guest fell over" in res["output_tail"]
    slow = stand_in(tmp_path, "echo started; exec sleep 60\n")
    res = K.host_run(tmp_path / "c", True, lambda _m: None, timeout=2, script=slow)
    assert res["status"] == "failed" and "over 2s" in res["reason"]


def test_guest_entry_writes_json_even_when_it_cannot_measure(tmp_path: Path) -> None:
    """The guest's entry always leaves a file for the host (here: this kernel lacks kTLS)."""
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    import subprocess

    out = tmp_path / "g.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.ktls_guest", "guest", "--json", str(out), "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1
    assert json.loads(out.read_text())["status"] == "failed"


def test_guest_saves_as_it_goes_and_host_keeps_a_partial_run(tmp_path: Path) -> None:
    """A guest too slow for the host's patience still leaves the runs it finished."""
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    saved: list[dict[str, Any]] = []
    K.guest_run(TINY, modes=("nomesh", "userspace"), say=lambda _m: None,
                save=lambda r: saved.append(json.loads(json.dumps(r))))  # fmt: skip
    assert [s["status"] for s in saved] == ["partial", "partial", "partial", "ok"]
    first = saved[0]
    assert len(first["cells"]) == 1 and first["planned_runs"] == 4
    src = tmp_path / "partial.json"
    src.write_text(json.dumps(saved[1]))
    slow = stand_in(tmp_path, f'cp {src} "$3"\nexec sleep 60\n')
    res = K.host_run(tmp_path / "out", True, lambda _m: None, timeout=3, script=slow)
    assert res["status"] == "ok"
    assert "took over 3s after 2 of 4 runs" in res["reason"]
    assert res["summary"]["modes"]["userspace"]["repeats"] == 1
    assert "after 2 of 4 runs" in report.ktls_guest_section({"ktls_guest": res})


def test_crypto_facts_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags : fpu sse2 aes pclmulqdq avx\n")
    (tmp_path / "crypto").write_text(
        "name         : gcm(aes)\ndriver       : generic-gcm-aesni\npriority     : 400\n\n"
        "name         : gcm(aes)\ndriver       : gcm_base(ctr(aes-generic),ghash-generic)\n"
        "priority     : 100\n\nname         : sha256\ndriver       : sha256-avx2\n"
        "priority     : 900\n"
    )
    facts = K.crypto_facts(tmp_path)
    assert facts == {"cpu_crypto_flags": ["aes", "pclmulqdq", "avx"],
                     "kernel_gcm_aes_driver": "generic-gcm-aesni"}  # fmt: skip
    assert K.crypto_facts(tmp_path / "missing") == {}
