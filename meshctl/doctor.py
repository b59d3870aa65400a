"""`meshctl doctor`: is this node able to run the redirect?"""

from __future__ import annotations

import argparse
from typing import Any


def _doctor(args: argparse.Namespace) -> int:
    from bpf.doctor import fix, run

    if getattr(args, "fix", False):
        done, could_not = fix()
        for what in done:
            print(f"fixed: {what}")
        for why in could_not:
            print(f"could not fix: {why}")
        if not done and not could_not:
            print("fixed: nothing needed fixing")
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
    p.add_argument(
        "--fix", action="store_true",
        help="first do every safe fix: mount cgroup v2 and bpffs, link kernel headers, "
        "load the tls module",
    )  # fmt: skip
    p.set_defaults(func=_doctor)
