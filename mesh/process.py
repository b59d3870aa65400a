"""How a mesh process runs and exits, the same for ztunnel and the waypoint.

Operators script around exit codes: 2 is "your input is wrong" (config, certificates), with a
message naming what; 1 is an environment failure (a port taken, BPF unavailable), with the
fix where we know it; 130 an interrupt.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from mesh import accesslog
from mesh.config.model import ConfigError
from mesh.identity.svid import CertificateError


class EnvironmentUnfit(RuntimeError):
    """The machine lacks something the process needs; the message says what and the fix."""


def run(
    prog: str,
    main: Coroutine[Any, Any, None],
    *,
    log_level: str = "info",
    access_line: accesslog.LineFormat = accesslog.text_line,
) -> int:
    """`access_line` renders access-log lines as the process's log format would (they are
    written in batches beside the logger's output, to stderr, see `mesh.accesslog`)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by something fd-less
        writer = None
    else:
        writer = accesslog.AccessLogWriter(fd, access_line)
        accesslog.install(writer)
    try:
        return _run(prog, main)
    finally:
        if writer is not None:
            accesslog.uninstall()
            writer.close()


def _run(prog: str, main: Coroutine[Any, Any, None]) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(main)
    except ConfigError as exc:
        print(f"{prog}: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except CertificateError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, EnvironmentUnfit) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
