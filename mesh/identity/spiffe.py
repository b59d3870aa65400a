"""SPIFFE IDs: strict parsing, because a lax parser lets a forged SAN alias a real identity."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TD = re.compile(r"^[a-z0-9._-]+$")
_SEG = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class SpiffeId:
    """A parsed ``spiffe://<trust_domain><path>`` identity."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Reject anything but a canonical SPIFFE ID (no query, fragment, port, userinfo)."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise ValueError(f"SPIFFE ID {uri!r}: scheme must be spiffe://")
        rest = uri[len(prefix) :]
        if "?" in rest or "#" in rest:
            raise ValueError(f"SPIFFE ID {uri!r}: query and fragment are not allowed")
        td, sep, path = rest.partition("/")
        if not td or not _TD.match(td):
            raise ValueError(f"SPIFFE ID {uri!r}: invalid trust domain {td!r}")
        if not sep or not path:
            raise ValueError(f"SPIFFE ID {uri!r}: path must not be empty")
        for seg in path.split("/"):
            if seg in ("", ".", "..") or not _SEG.match(seg):
                raise ValueError(f"SPIFFE ID {uri!r}: invalid path segment {seg!r}")
        return cls(td, "/" + path)

    def _parts(self) -> list[str]:
        return self.path.split("/")[1:]

    @property
    def is_workload(self) -> bool:
        p = self._parts()
        return len(p) == 4 and p[0] == "ns" and p[2] == "sa"

    @property
    def namespace(self) -> str | None:
        return self._parts()[1] if self.is_workload else None

    @property
    def service_account(self) -> str | None:
        return self._parts()[3] if self.is_workload else None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def workload_id(td: str, ns: str, sa: str) -> str:
    """The identity of pods running as service account ``sa`` in ``ns``."""
    return str(SpiffeId.parse(f"spiffe://{td}/ns/{ns}/sa/{sa}"))


def node_id(td: str, node: str) -> str:
    """A node ztunnel's own identity (CA client auth and its :15008 server name)."""
    return str(SpiffeId.parse(f"spiffe://{td}/node/{node}"))
