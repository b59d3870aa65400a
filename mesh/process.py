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

from mesh.config.model import ConfigError
from mesh.identity.svid import CertificateError


class EnvironmentUnfit(RuntimeError):
    """The machine lacks something the process needs; the message says what and the fix."""


def run(prog: str, main: Coroutine[Any, Any, None], *, log_level: str = "info") -> int:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
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
