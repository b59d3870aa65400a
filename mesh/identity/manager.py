"""Workload certificates for both proxies: fetched on demand, cached, rotated at half life.

The signer is either the local CA (`--ca-dir`: single host, the lab, tests) or the CA service
client (`--ca`: a node proves itself with its node certificate and gets only its own pods'
identities). Everything else in a proxy asks this class for TLS contexts and never sees keys.

Rotation never breaks a live connection: TLS authenticates once, at the handshake, so a live
session keeps the certificate it negotiated; new handshakes get the new one. Listeners switch
context per handshake (`listener_context`), pools dial with the current client context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast, runtime_checkable

from mesh import ktls
from mesh.hbone.pool import ClientContext, ListenerContext
from mesh.identity.svid import Svid
from mesh.tls import client_context, server_context

log = logging.getLogger("mesh.identity")

DEFAULT_TTL = timedelta(hours=24)


class Signer(Protocol):
    """Turns an identity into a fresh SVID (the key is made locally; only a CSR travels)."""

    async def sign(self, identity: str, ttl: timedelta) -> Svid: ...


@runtime_checkable
class LocalCa(Protocol):
    """A CA whose key this process holds (`certs.ca.CertificateAuthority`, `--ca-dir`).

    A protocol, not the class, so the shared floor never imports the CA room above it."""

    bundle_pem: bytes

    def issue(self, identity: str, ttl: timedelta) -> Svid: ...


class LocalSigner:
    """Signs with a CA whose key this process holds: single-host demos and tests."""

    def __init__(self, ca: LocalCa) -> None:
        self.ca = ca

    def sign_now(self, identity: str, ttl: timedelta) -> Svid:
        return self.ca.issue(identity, ttl)

    async def sign(self, identity: str, ttl: timedelta) -> Svid:
        return self.ca.issue(identity, ttl)


def _now() -> datetime:
    return datetime.now(UTC)


class Identities:
    """SVIDs and TLS contexts per identity.

    `await ensure(identity)` before first use (it signs once even if many connections ask at
    the same moment); the sync accessors then answer from the cache. With a local CA the sync
    accessors also sign on a miss, so simple callers need no await. `run()` rotates every
    cached identity at half life and retries a failing CA with back-off until expiry."""

    def __init__(
        self,
        source: LocalCa | Signer,
        ttl: timedelta = DEFAULT_TTL,
        *,
        bundle_pem: bytes | None = None,
        ktls: bool = False,
        on_rotate: Callable[[Svid], None] | None = None,
    ) -> None:
        if isinstance(source, LocalCa):
            self.signer: Signer = LocalSigner(source)
            self.bundle_pem = source.bundle_pem
        else:
            if bundle_pem is None:
                raise ValueError("a remote signer needs the trust bundle")
            self.signer = source
            self.bundle_pem = bundle_pem
        self.ttl = ttl
        self.ktls = ktls
        self.on_rotate = on_rotate
        self._svids: dict[str, Svid] = {}
        self._client: dict[str, ClientContext] = {}
        self._server: dict[str, ClientContext] = {}
        self._inflight: dict[str, asyncio.Future[Svid]] = {}
        self._changed = asyncio.Event()

    # -- the cache -------------------------------------------------------------------------

    def _refresh_bundle(self) -> None:
        """Adopt the trust bundle the CA last answered with (a remote signer carries it): a
        new root added for rotation is trusted from the next handshake on. Cached contexts
        are dropped, so every identity's next connection is built on the new bundle; the
        listeners pick it up through `listener_context`'s per-handshake switch."""
        bundle = getattr(self.signer, "bundle_pem", None)
        if not isinstance(bundle, bytes) or bundle == self.bundle_pem:
            return
        self.bundle_pem = bundle
        self._client.clear()
        self._server.clear()
        log.info("trust bundle updated from the CA (%d bytes)", len(bundle))

    def _install(self, svid: Svid) -> Svid:
        self._refresh_bundle()
        old = self._svids.get(svid.identity)
        self._svids[svid.identity] = svid
        self._client.pop(svid.identity, None)
        self._server.pop(svid.identity, None)
        if old is not None:
            log.info(
                "rotated %s: serial %x -> %x, valid until %s",
                svid.identity, old.serial, svid.serial, svid.not_after.isoformat(),
            )  # fmt: skip
            if self.on_rotate is not None:
                self.on_rotate(svid)
        self._changed.set()
        return svid

    def add(self, svid: Svid) -> None:
        """Seed an SVID obtained elsewhere (the node certificate read from disk)."""
        self._install(svid)

    def forget(self, identity: str) -> None:
        """Stop rotating an identity nobody on this node uses any more."""
        self._svids.pop(identity, None)
        self._client.pop(identity, None)
        self._server.pop(identity, None)

    def _stale(self, svid: Svid | None) -> bool:
        return svid is None or _now() >= svid.refresh_at

    async def ensure(self, identity: str) -> Svid:
        """The current SVID, signing (once, however many ask) when missing or at half life."""
        svid = self._svids.get(identity)
        if not self._stale(svid):
            assert svid is not None
            return svid
        pending = self._inflight.get(identity)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[identity] = pending
            try:
                fresh = self._install(await self.signer.sign(identity, self.ttl))
            except BaseException as exc:
                del self._inflight[identity]
                pending.set_exception(exc)
                pending.exception()  # retrieved here; waiters get it through shield
                if svid is not None and not svid.expired(_now()):
                    log.warning("renewing %s failed, keeping the current one: %s", identity, exc)
                    return svid
                raise
            del self._inflight[identity]
            pending.set_result(fresh)
            return fresh
        return await asyncio.shield(pending)

    def svid(self, identity: str) -> Svid:
        svid = self._svids.get(identity)
        if self._stale(svid) and isinstance(self.signer, LocalSigner):
            svid = self._install(self.signer.sign_now(identity, self.ttl))
        if svid is None:
            raise KeyError(f"no certificate for {identity} yet (await ensure() first)")
        return svid

    # -- contexts --------------------------------------------------------------------------

    def client_context(self, identity: str) -> ClientContext:
        svid = self.svid(identity)
        ctx = self._client.get(identity)
        if ctx is None:
            make = ktls.client_context if self.ktls else client_context
            ctx = self._client[identity] = make(svid, self.bundle_pem)
        return ctx

    def server_context(self, identity: str) -> ClientContext:
        svid = self.svid(identity)
        ctx = self._server.get(identity)
        if ctx is None:
            make = ktls.server_context if self.ktls else server_context
            ctx = self._server[identity] = make(svid, self.bundle_pem)
        return ctx

    async def client_context_async(self, identity: str) -> ClientContext:
        """For the pool: signs on first use of a source identity instead of failing."""
        await self.ensure(identity)
        return self.client_context(identity)

    def listener_context(self, identity: str) -> ListenerContext:
        """For a listener that outlives certificates: every handshake switches to the context
        of the identity's current SVID, so new connections get the rotated certificate while
        live ones keep theirs. (Our clients always send SNI, which triggers the switch.)"""
        if self.ktls:
            return lambda: cast(ktls.KtlsContext, self.server_context(identity))
        base = self.server_context(identity)
        assert isinstance(base, ssl.SSLContext)

        def switch(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _c: object) -> None:
            # forgotten while a handshake was under way: keep the base
            with contextlib.suppress(KeyError):
                obj.context = cast(ssl.SSLContext, self.server_context(identity))

        base.sni_callback = switch
        return base

    # -- rotation --------------------------------------------------------------------------

    async def run(
        self, *, min_sleep: float = 0.2, retry: float = 5.0, max_retry: float = 60.0
    ) -> None:
        """Rotate every cached identity at half life, forever (cancel to stop). While the CA
        fails, the current certificates keep serving and renewal is retried with exponential
        back-off from `retry` up to `max_retry` seconds, never hammering a CA that is down."""
        failures = 0
        while True:
            now = _now()
            due = [i for i, s in self._svids.items() if now >= s.refresh_at]
            failed = False
            for identity in due:
                try:
                    # a failed renewal with a still-valid SVID comes back stale, not raised
                    failed |= self._stale(await self.ensure(identity))
                except Exception as exc:
                    failed = True
                    log.error("could not renew %s: %s", identity, exc)
            self._changed.clear()
            if self._svids:
                nxt = min(s.refresh_at for s in self._svids.values())
                wait = max(min_sleep, (nxt - _now()).total_seconds())
            else:
                wait = 3600.0
            failures = failures + 1 if failed else 0
            if failed:
                wait = max(wait, min(retry * 2 ** (failures - 1), max_retry))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def dump(self) -> list[dict[str, str]]:
        return [
            {
                "identity": i,
                "serial": hex(s.serial),
                "not_before": s.not_before.isoformat(),
                "not_after": s.not_after.isoformat(),
                "refresh_at": s.refresh_at.isoformat(),
            }
            for i, s in sorted(self._svids.items())
        ]
