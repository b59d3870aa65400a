"""Who a CONNECT is on behalf of: the `Forwarded` header a trusted proxy sets on HBONE.

Both ztunnel's inbound and the waypoint read it, so it lives beside the HBONE code.
"""

from __future__ import annotations


def forwarded_for(value: str) -> str | None:
    """The first `for=` address of an RFC 7239 `Forwarded` header (quotes, brackets and a
    port stripped), or None."""
    for element in value.split(","):
        for pair in element.split(";"):
            k, _, v = pair.strip().partition("=")
            if k.lower() == "for" and v:
                v = v.strip('"')
                if v.startswith("["):
                    return v[1 : v.find("]")] or None
                host, sep, port = v.rpartition(":")
                return host if sep and port.isdigit() else v
    return None
