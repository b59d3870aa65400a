"""`python -m meshctl.lab.podexec --netns NAME --cgroup DIR -- CMD...`: become a pod process.

Joins the cgroup first (so the BPF programs attached to it see every socket the command ever
opens, including those of its children), then the network namespace, then execs the command:
nothing of the pod runs for even an instant outside its cgroup and netns.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence

from meshctl.lab.names import netns_path

CLONE_NEWNET = 0x40000000


def enter(netns: str | None, cgroup: str | None) -> None:
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if netns:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns if netns.startswith("/") else netns_path(netns), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {netns}: {os.strerror(err)}")
        finally:
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podexec")
    p.add_argument("--netns", help="netns name (under /var/run/netns) or path")
    p.add_argument("--cgroup", help="cgroup v2 directory to join")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given after --")
    try:
        enter(args.netns, args.cgroup)
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"podexec: {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
