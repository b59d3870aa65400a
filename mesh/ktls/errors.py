"""The one error every kTLS stage raises, so callers catch one type whichever stage failed."""

from __future__ import annotations


class KtlsError(Exception):
    """A kTLS connection failed: handshake, key installation, or a record the kernel or we
    refused. The connection is closed; no byte of a refused record was delivered."""
