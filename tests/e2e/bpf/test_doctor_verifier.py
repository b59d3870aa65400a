"""`meshctl doctor` asks this kernel's verifier, not a version table (root only: loading BPF)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bpf.doctor as doctor
import bpf.loader

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to load BPF programs")


def test_programs_pass_this_kernels_verifier() -> None:
    c = doctor._bcc_and_compile()
    assert c.ok, c.detail


def test_a_helper_the_program_type_forbids_is_named_with_the_kernel_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bpf_skb_load_bytes exists only for skb programs: connect4 compiles, the verifier refuses
    src = bpf.loader._SRC.read_text().replace(
        "if (ctx->type != 1 /* SOCK_STREAM */) return 1;",
        "char b[4]; if (bpf_skb_load_bytes(ctx, 0, b, 4)) return 0; if (ctx->type != 1) return 1;",
    )
    assert "bpf_skb_load_bytes" in src
    bad = tmp_path / "redirect.bpf.c"
    bad.write_text(src)
    monkeypatch.setattr(bpf.loader, "_SRC", bad)
    c = doctor._bcc_and_compile()
    assert not c.ok
    assert c.detail.startswith("connect4:"), c.detail
    assert "5.15" in c.fix
