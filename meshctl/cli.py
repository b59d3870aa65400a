"""The `meshctl` entry point.

Each feature owns its subcommands in its own module and exposes `register(subparsers)`, so the
CLI grows without one file that every change has to touch. A handler returns the exit code; a
`UsageError` from a handler becomes a one-line message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from meshctl.errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]

# Modules that contribute subcommands; each has `register(subparsers) -> None`.
COMMAND_MODULES: tuple[str, ...] = (
    "meshctl.ca",
    "meshctl.config",
    "meshctl.analyze",
    "meshctl.waypoint",
    "meshctl.doctor",
    "meshctl.install",
    "meshctl.image",
    "meshctl.lab.cli",
    "meshctl.observe.cli",
    "benchmarks.suite",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description="Operate the ambient mesh: CA, lab, waypoints, diagnostics."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
