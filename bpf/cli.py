"""`meshctl doctor`: is this node able to run the redirect?"""

from __future__ import annotations

import argparse
from typing import Any


def _doctor(args: argparse.Namespace) -> int:
    from bpf.doctor import run

    failed = False
    for c in run():
        state = "OK" if c.ok else ("MISSING" if c.required else "MISSING (optional)")
        line = f"{state:20} {c.name}" + (f" [{c.detail}]" if c.detail else "")
        if not c.ok:
            line += f"  fix: {c.fix}"
            failed |= c.required
        print(line)
    return 1 if failed else 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("doctor", help="check kernel/BPF/BCC/iptables/kTLS readiness")
    p.set_defaults(func=_doctor)
