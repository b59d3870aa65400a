"""One request through the waypoint: L7 policy, route, filters, backend choice, retries,
timeouts, mirrors, then the response streamed back; one metric update and one access-log
line at the end.

Whatever the HTTP versions on either side, a request is a `ServerExchange` (downstream) and
one or more `ClientExchange`s (upstream attempts). Bodies stream both ways at once (gRPC
bidirectional streaming needs that): a pump task sends the request body while the response
is awaited and forwarded. A retry is possible until the response head has been forwarded and
while the request body is still small enough to send again (`ReplayableBody`, as Envoy's
retry buffer; past it the first answer is final and the access log says
`retry_skipped`, as a mirror past it is skipped with `mirror_skipped`: never a truncated copy);
a pooled HTTP/1.1 connection that the backend closed while idle is retried once
on a fresh connection without counting as a route retry.

Timeouts follow the Gateway API: `timeouts.request` covers the whole transaction (retries
included) and `timeouts.backendRequest` one attempt, each until the *full* response has been
received. Before the response head a timeout is a 504; after it, the response is cut (a reset
downstream, flag UT), as Envoy does. Unset or "0s" means no limit, which is what long gRPC
streams want.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from mesh.accesslog import AccessRecord, log_access
from mesh.authz import AuthzRequest, RequestAuth, authorize
from mesh.config.model import BackendRef, HeaderModifier, RouteRetry, RouteTimeouts, Service
from mesh.config.snapshot import PolicySet
from mesh.flows import REASONS, Flow, FlowRing
from mesh.hbone import HboneError
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.netpolicy import HttpRules
from mesh.otlp import SPAN_KIND_SERVER, OtlpExporter, Span
from mesh.requestauthn import Authenticator
from mesh.telemetry import account_request
from mesh.tracecontext import TraceContext, continue_trace, with_trace
from waypoint.limits import Refusal
from waypoint.routing import Forward, Redirect, Request, RouteTable, apply_filters, modify_headers
from waypoint.service import NoBackend, ServiceRoutes, Target
from waypoint.upstream import Upstreams
from waypoint.wire import (
    ClientExchange,
    Headers,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    ServerExchange,
    StreamReset,
    UpstreamProtocolError,
)

log = logging.getLogger("waypoint")

MAX_MIRRORS_IN_FLIGHT = 64
TEXT = [("content-type", "text/plain")]


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What every request on one downstream connection shares: who called, for what."""

    caller: str  # the caller's SPIFFE ID, verified by TLS at the HBONE handshake
    src_ip: str
    service: Service
    port: int
    routes: ServiceRoutes  # the snapshot's view the connection started with
    table: RouteTable
    policies: PolicySet  # L7 policies of this waypoint for this service
    caller_ns: str | None = None
    authn: Authenticator | None = None  # RequestAuthentication (JWT) for this service
    http_rules: tuple[HttpRules, ...] = ()  # CiliumNetworkPolicy L7 rules for this caller


def with_request_identity(
    req: Request,
    client_ip: str,
    scheme: str,
    forwarded_by: str | None = None,
    trace: TraceContext | None = None,
) -> Request:
    """The headers every forwarded request carries, as Envoy (Istio's waypoint) adds them, so
    applications moving from other meshes keep their request correlation and client address.

    `x-request-id` is kept when the caller sent one (it ties the hops of one request together)
    and generated otherwise; `x-forwarded-for` gets the caller's address appended (the address
    HBONE vouched for, not anything the caller claims); `x-forwarded-proto` is the scheme the
    caller used, replacing whatever the caller claimed. With `forwarded_by` (the waypoint's
    `--forwarded`), an RFC 7239 `Forwarded` element `for=<client>;by=<us>;proto=<scheme>` is
    appended too, after any the caller sent (one header, elements comma-joined). With `trace`,
    the caller's `traceparent`/`tracestate` are replaced by the ones naming our span (see
    `mesh.tracecontext`). Added before routing, so route header matches and filters see them
    as a backend will."""
    # One pass over the caller's headers (this runs for every request): what we replace is
    # collected on the way, the rest kept in order.
    has_id = False
    xff: list[str] = []
    prior: list[str] = []
    hs: list[tuple[str, str]] = []
    for k, v in req.headers:
        if k[:1] == "x":
            if k == "x-forwarded-proto":
                continue
            if k == "x-forwarded-for" and client_ip:
                xff.append(v)
                continue
            if k == "x-request-id" and v:
                has_id = True
        elif k == "forwarded" and forwarded_by is not None:
            prior.append(v)
            continue
        elif trace is not None and (k == "traceparent" or k == "tracestate"):
            continue  # replaced below
        hs.append((k, v))
    if not has_id:
        hs = [(k, v) for k, v in hs if k != "x-request-id"]
        hs.append(("x-request-id", _request_id()))
    if client_ip:
        xff.append(client_ip)
        hs.append(("x-forwarded-for", ", ".join(xff)))
    proto = scheme if scheme in ("http", "https") else "http"
    hs.append(("x-forwarded-proto", proto))
    if forwarded_by is not None:
        element = f"by={forwarded_node(forwarded_by)};proto={proto}"
        if client_ip:
            element = f"for={forwarded_node(client_ip)};{element}"
        prior.append(element)
        hs.append(("forwarded", ", ".join(prior)))
    if trace is not None:
        hs.extend(with_trace([], trace))  # (the caller's were skipped above)
    return Request(req.method, req.path, req.query, tuple(hs), req.host, req.scheme, req.port)


def _request_id() -> str:
    """A random (version 4) UUID, as Envoy makes for `x-request-id`. It has to be unique, not
    secret: drawn from `random` like the trace ids, without uuid4's getrandom(2) per request."""
    x = random.getrandbits(128) & ~(0xF000 << 64 | 0xC << 60) | (0x4000 << 64 | 0x8 << 60)
    h = f"{x:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def forwarded_node(node: str) -> str:
    """An RFC 7239 node value: an IPv4 address or an obfuscated name (`_x`) as a token; an
    IPv6 address bracketed and quoted (`"[2001:db8::1]"`, section 6); anything else quoted."""
    if ":" in node and not node.startswith("["):
        return f'"[{node}]"'
    if node and all(c.isascii() and (c.isalnum() or c in "._-") for c in node):
        return node
    escaped = node.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class _Failed(Exception):
    """An attempt that produced no response head: a local status and Envoy-style flag."""

    def __init__(self, status: int, flag: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.flag = flag


@dataclass(slots=True)
class _Attempt:
    up: ClientExchange
    resp: ResponseHead
    pump: asyncio.Task[None] | None  # None: the request had no body to stream
    target: Target
    deadline: float | None = None  # loop time by which the whole response must be in


def _grpc_retryable(att: _Attempt | None, failed: bool, codes: tuple[int, ...]) -> bool:
    """A gRPC failure is known before anything is forwarded only as a trailers-only answer
    (grpc-status in the head); one that comes after messages ends a stream already under way.
    No upstream at all is what the caller would see as UNAVAILABLE (14)."""
    if att is None:
        return failed and 14 in codes
    if not att.resp.end_stream:
        return False
    raw = next((v for k, v in att.resp.headers if k == "grpc-status"), None)
    try:
        return raw is not None and int(raw) in codes
    except ValueError:
        return False


class RequestHandler:
    """Shared by all streams of the waypoint process; per-request state lives on the stack."""

    def __init__(
        self,
        upstreams: Upstreams,
        metrics: MeshMetrics,
        *,
        trust_domain: str = "cluster.local",
        rng: random.Random | None = None,
        retry_buffer: int = 1 << 20,
        exporter: OtlpExporter | None = None,
        forwarded_by: str | None = None,
        trace_sampling: float = 1.0,
        flows: FlowRing | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.flows = flows if flows is not None and flows.size else None  # None: not recorded
        self.trust_domain = trust_domain
        self.rng = rng or random.Random()
        self.retry_buffer = retry_buffer
        self.exporter = exporter  # None: spans go to the access log only
        self.forwarded_by = forwarded_by  # None: no `Forwarded` header added
        self.trace_sampling = trace_sampling  # share of the traces we start that are sampled
        self._mirrors: set[asyncio.Task[None]] = set()
        self.in_flight = 0  # requests started and not yet accounted
        # Labels per (caller address, caller, service, pod, protocol, flags): building them
        # costs more than the rest of the accounting, and the set of combinations is small.
        self._labels: dict[tuple[object, ...], ConnectionLabels] = {}
        self._labels_snap: object = None
        self.refused_c = metrics.waypoint_refused_c

    async def __call__(self, ctx: StreamContext, ex: ServerExchange) -> None:
        t0 = time.monotonic()
        wall0 = time.time_ns()
        head = ex.head
        req = Request.from_target(
            head.method, head.target, head.headers, host=head.authority, lowered=True
        )
        # The waypoint is a hop of the trace: the backend's parent span is ours.
        tc = continue_trace(head.headers, self.trace_sampling)
        req = with_request_identity(req, ctx.src_ip, head.scheme, self.forwarded_by, tc)
        body = ReplayableBody(ex.body, self.retry_buffer)
        outcome = _Outcome()
        self.in_flight += 1
        try:
            await self._handle(ctx, ex, req, body, outcome)
        except StreamReset as exc:
            outcome.flag = outcome.flag if outcome.flag != "-" else "DC"
            outcome.status = outcome.status or 0
            log.debug("request %s %s ended early: %s", req.method, req.path, exc)
            ex.reset()
            refusal: Refusal | None = getattr(ex, "refusal", None)
            if refusal is not None:
                # Malformed mid-way (a bad chunk): answered as the connection refused it.
                outcome.status, outcome.flag = refusal.status, refusal.flag
                self.refused_c.labels(refusal.reason, refusal.flag).inc()
        except asyncio.CancelledError:
            outcome.flag = "DC"  # the client went away (stream reset / connection lost)
            raise
        finally:
            self.in_flight -= 1
            self._account(ctx, ex, req, body, outcome, time.monotonic() - t0, tc, wall0)

    # -- the decision ----------------------------------------------------------------------

    async def _handle(
        self,
        ctx: StreamContext,
        ex: ServerExchange,
        req: Request,
        body: ReplayableBody,
        out: _Outcome,
    ) -> None:
        pol = ctx.policies
        if ctx.authn is not None or ctx.http_rules or pol.allow or pol.deny or pol.audit:
            checked = await self._policy(ctx, ex, req, out)
            if checked is None:
                return
            req = checked
        route = ctx.table.route(req)
        if route is not None and route.route is not None:
            out.route = f"{route.route.namespace}/{route.route.name}"
        if route is None and ctx.table:
            # Routes are attached but none matches: Gateway API says 404, not "the Service".
            await self._local(ex, out, 404, "route not found\n", flag="NR")
            return
        timeouts, retry = RouteTimeouts(), RouteRetry()
        resp_mods: list[HeaderModifier] = []
        backend: BackendRef | None = None
        fwd: Forward
        if route is None or route.rule is None or route.chooser is None:
            fwd = Forward(req.path, req.query, req.host, list(req.headers))
        else:
            rule = route.rule
            timeouts, retry = rule.timeouts, rule.retry
            res = apply_filters(rule.filters, req, route.matched_prefix)
            if isinstance(res, Redirect):
                await self._local(ex, out, res.status, "", [("location", res.location)])
                return
            fwd = res
            if rule.backend_refs:
                backend = route.chooser.choose(self.rng.random())
                if backend is None:
                    await self._local(ex, out, 500, "no backend with a non-zero weight\n")
                    return
                if backend.filters:
                    sub = Request(req.method, fwd.path, fwd.query, tuple(fwd.headers), fwd.host)
                    res2 = apply_filters(backend.filters, sub, route.matched_prefix)
                    if isinstance(res2, Redirect):
                        await self._local(ex, out, res2.status, "", [("location", res2.location)])
                        return
                    res2.response_modifiers[:0] = fwd.response_modifiers
                    res2.mirrors[:0] = fwd.mirrors
                    fwd = res2
            resp_mods = fwd.response_modifiers
        h = ex.head
        up_head = RequestHead(
            h.method,
            fwd.path + ("?" + fwd.query if fwd.query else ""),
            fwd.host,
            [(k, v) for k, v in fwd.headers if k != "host"],
            scheme=h.scheme,
            te_trailers=h.te_trailers,
            content_length=h.content_length,
            end_stream=h.end_stream,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                att = await self._attempts(
                    ctx, ex, up_head, backend, body, timeouts, retry, tg, out
                )
                if att is None:
                    return
                try:
                    await self._respond(ex, att, resp_mods, out)
                finally:
                    att.up.release()
                    if att.pump is not None and not att.pump.done():
                        att.pump.cancel()  # the response is over; so is the request body
        except ExceptionGroup as eg:
            # The TaskGroup wraps whatever its body raised: a StreamReset (the client went
            # away, or its request turned out malformed) is handled by the caller as itself.
            first = eg.exceptions[0]
            if all(isinstance(e, StreamReset) for e in eg.exceptions):
                raise first from None
            raise
        for m in fwd.mirrors:
            self._mirror(ctx, m, up_head, body, out)

    async def _policy(
        self, ctx: StreamContext, ex: ServerExchange, req: Request, out: _Outcome
    ) -> Request | None:
        """JWT authentication (401), then AuthorizationPolicy (403), then CiliumNetworkPolicy
        HTTP rules (403): the request to go on with (tokens stripped), or None once refused."""
        auth: RequestAuth | None = None
        if ctx.authn is not None:
            res = ctx.authn.authenticate(req.headers, req.query, time.time())
            if res.error is not None:
                out.policy, out.unauthenticated = res.policy, True
                challenge = 'Bearer realm="mesh", error="invalid_token"'
                await self._local(
                    ex, out, 401, f"{res.error}\n", [*TEXT, ("www-authenticate", challenge)]
                )
                return None
            auth = res.auth
            if res.headers != req.headers:
                req = dataclasses.replace(req, headers=res.headers)
        pol = ctx.policies
        if pol.allow or pol.deny or pol.audit:
            decision = authorize(
                pol,
                AuthzRequest(
                    ctx.caller,
                    ctx.caller_ns,
                    ctx.src_ip,
                    ctx.port,
                    req.method,
                    req.path,
                    req.host,
                    req.headers,
                    auth,
                ),
                l7=True,
            )
            out.policy = decision.policy
            if decision.audit_policy is not None:
                out.audit_policy = decision.audit_policy
                self.metrics.waypoint_audited_c.labels(decision.audit_policy).inc()
            if decision.shadow is not None:
                out.shadow, out.shadow_policy = decision.shadow, decision.shadow_policy
                self.metrics.waypoint_dry_run_c.labels(
                    decision.shadow_policy or "-", decision.shadow
                ).inc()
            if not decision.allowed:
                why = f"policy {decision.policy}" if decision.policy else decision.reason
                await self._local(ex, out, 403, f"RBAC: access denied ({why})\n", flag="DENY")
                return None
        for rules in ctx.http_rules:
            if not rules.allows(req.method, req.path):
                out.policy = rules.policy
                await self._local(ex, out, 403, f"Access denied ({rules.policy})\n", flag="DENY")
                return None
        return req

    async def _attempts(
        self,
        ctx: StreamContext,
        ex: ServerExchange,
        up_head: RequestHead,
        backend: BackendRef | None,
        body: ReplayableBody,
        timeouts: RouteTimeouts,
        retry: RouteRetry,
        tg: asyncio.TaskGroup,
        out: _Outcome,
    ) -> _Attempt | None:
        """Try until a response head is worth forwarding; None when a local answer was sent."""
        tries = 0
        loop = asyncio.get_running_loop()
        overall = loop.time() + timeouts.request if timeouts.request else None
        try:
            # (no route timeout, the usual case: no Timeout object and its bookkeeping)
            limit = asyncio.timeout(timeouts.request) if timeouts.request is not None else _NO_LIMIT
            async with limit:
                while True:
                    try:
                        att = await self._attempt(
                            ctx, up_head, backend, body, timeouts, tg, out, upstream_protocol(ex)
                        )
                        status, failure = att.resp.status, None
                    except _Failed as f:
                        att, status, failure = None, f.status, f
                    retryable = status in retry.codes or (
                        failure is not None and 503 in retry.codes
                    )
                    if retry.grpc_codes and not retryable:
                        retryable = _grpc_retryable(att, failure is not None, retry.grpc_codes)
                    if tries < retry.attempts and retryable and not body.replayable:
                        out.retry_skipped = self._too_big("retry")
                    if tries < retry.attempts and retryable and body.replayable:
                        tries += 1
                        out.retries = tries
                        if att is not None:
                            att.up.reset()
                            await _stop(att.pump)
                        await asyncio.sleep(retry.backoff * (2 ** (tries - 1)))
                        continue
                    if failure is not None:
                        await self._local(
                            ex, out, failure.status, f"{failure}\n", flag=failure.flag
                        )
                        return None
                    assert att is not None
                    ends = [d for d in (overall, att.deadline) if d is not None]
                    att.deadline = min(ends) if ends else None
                    return att
        except TimeoutError:
            out.flag = "UT"
            await self._local(ex, out, 504, "upstream request timeout\n", flag="UT")
            return None

    async def _attempt(
        self,
        ctx: StreamContext,
        up_head: RequestHead,
        backend: BackendRef | None,
        body: ReplayableBody,
        timeouts: RouteTimeouts,
        tg: asyncio.TaskGroup,
        out: _Outcome,
        down_protocol: str,
    ) -> _Attempt:
        try:
            target = ctx.routes.pick(ctx.service, ctx.port, backend)
        except NoBackend as exc:
            raise _Failed(503, "UH", f"no healthy upstream: {exc}") from None
        out.target = target
        protocol = target.protocol or down_protocol
        fresh = False
        while True:
            try:
                up, reused = await self.upstreams.open(
                    target, up_head, protocol, ctx.caller, ctx.src_ip, fresh=fresh
                )
            except (HboneError, OSError, StreamReset) as exc:
                raise _Failed(503, "UF", f"upstream connect error: {exc}") from None
            started = asyncio.get_running_loop().time()
            pump: asyncio.Task[None] | None = None
            if up_head.end_stream and body.source.ended:
                await self._pump(body, up)  # nothing to stream: no task needed
            else:
                pump = tg.create_task(self._pump(body, up))
            try:
                if timeouts.backend_request is None:
                    resp = await up.response
                else:
                    async with asyncio.timeout(timeouts.backend_request):
                        resp = await up.response
                backend_deadline = (
                    started + timeouts.backend_request if timeouts.backend_request else None
                )
                return _Attempt(up, resp, pump, target, backend_deadline)
            except UpstreamProtocolError as exc:
                up.reset()
                await _stop(pump)
                raise _Failed(502, "UPE", f"upstream protocol error: {exc}") from None
            except StreamReset as exc:
                up.reset()
                await _stop(pump)
                if reused and not fresh and body.replayable and not body.source.failed:
                    fresh = True  # a pooled connection the backend had closed: once more
                    continue
                if reused and not fresh and not body.replayable:
                    out.retry_skipped = self._too_big("retry")
                raise _Failed(503, "UR", f"upstream reset before response headers: {exc}") from None
            except TimeoutError:
                if pump is not None:
                    pump.cancel()
                up.reset()
                raise _Failed(504, "UT", "upstream request timeout") from None
            except BaseException:
                if pump is not None:
                    pump.cancel()
                up.reset()
                raise

    @staticmethod
    async def _pump(body: ReplayableBody, up: ClientExchange) -> None:
        """The request body to one attempt. A downstream failure resets the upstream; an
        upstream one ends the pump quietly (the response side reports it)."""
        try:
            await body.pump(up)
        except StreamReset:
            if body.source.failed:
                up.reset()

    async def _respond(
        self, ex: ServerExchange, att: _Attempt, mods: list[HeaderModifier], out: _Outcome
    ) -> None:
        resp = att.resp
        headers: Headers = resp.headers
        for mod in mods:
            headers = modify_headers(headers, mod)
        out.status = resp.status
        out.head_at = time.monotonic()
        up = att.up
        first = b"" if resp.end_stream else up.body.read_nowait()
        # The usual small response is all here by now: it goes out whole, head, body and end
        # in one write, without the read loop and its timeout below.
        body = up.body
        last = not resp.end_stream and body.ended and not body.buffered and not body.trailers
        await ex.send_head(ResponseHead(resp.status, headers, resp.end_stream), first, last=last)
        if resp.end_stream or last:
            return
        try:
            async with asyncio.timeout_at(att.deadline):
                while data := await up.body.read():
                    await ex.send_data(data)
        except StreamReset:
            if up.body.failed:
                out.flag = "UR"  # the backend broke off mid-body: the client must see a reset
            raise
        except TimeoutError:
            out.flag = "UT"  # the head went out already: all we can do is cut the response
            up.reset()
            raise StreamReset("response timeout") from None
        await ex.finish(up.body.trailers)
        if up.body.trailers:
            out.grpc_status = next((v for k, v in up.body.trailers if k == "grpc-status"), None)

    async def _local(
        self,
        ex: ServerExchange,
        out: _Outcome,
        status: int,
        text: str,
        headers: Headers | None = None,
        *,
        flag: str = "-",
    ) -> None:
        """A response the waypoint makes itself (denial, redirect, errors)."""
        out.status = status
        out.head_at = time.monotonic()
        if flag != "-":
            out.flag = flag
        data = text.encode()
        hs = list(headers if headers is not None else TEXT)
        hs.append(("content-length", str(len(data))))
        await ex.send_head(ResponseHead(status, hs, end_stream=not data))
        if data:
            await ex.send_data(data)
            await ex.finish()

    # -- mirrors ---------------------------------------------------------------------------

    def _too_big(self, what: str) -> str:
        n = self.retry_buffer
        size = f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
        return f"body exceeds {size} {what} buffer"

    def _mirror(
        self,
        ctx: StreamContext,
        ref: BackendRef,
        head: RequestHead,
        body: ReplayableBody,
        out: _Outcome,
    ) -> None:
        """Fire a copy at `ref`; its answer is discarded and its failure never matters. Owned
        by this handler (`close` cancels them) and bounded in number. A copy is sent whole or
        not at all: a body past the buffer (already streamed to the primary backend and gone)
        or not yet complete is skipped, and the access log says why (`mirror_skipped`)."""
        if body.rec.overflow:
            out.mirror_skipped = self._too_big("mirror")
            return
        if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
            out.mirror_skipped = f"{MAX_MIRRORS_IN_FLIGHT} mirrors already in flight"
            return
        if not body.rec.complete:
            out.mirror_skipped = "response ended before the request body"
            return
        data = b"".join(body.rec.chunks)
        copy = RequestHead(
            head.method,
            head.target,
            head.authority,
            list(head.headers),
            scheme=head.scheme,
            content_length=len(data) if data else None,
            end_stream=not data,
        )
        task = asyncio.get_running_loop().create_task(self._send_mirror(ctx, ref, copy, data))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _send_mirror(
        self, ctx: StreamContext, ref: BackendRef, head: RequestHead, data: bytes
    ) -> None:
        with contextlib.suppress(NoBackend, HboneError, OSError, StreamReset, TimeoutError):
            async with asyncio.timeout(10.0):
                t = ctx.routes.pick(ctx.service, ctx.port, ref)
                up, _ = await self.upstreams.open(
                    t, head, t.protocol or "http/1.1", ctx.caller, ctx.src_ip
                )
                try:
                    if data:
                        await up.send_data(data)
                    await up.finish(None)
                    await up.response
                    while await up.body.read():
                        pass
                finally:
                    up.release()

    async def close(self) -> None:
        for t in list(self._mirrors):
            t.cancel()
        if self._mirrors:
            await asyncio.wait(list(self._mirrors), timeout=2)

    # -- telemetry -------------------------------------------------------------------------

    def refused(self, ctx: StreamContext | None, r: Refusal) -> None:
        """Work refused before any request was forwarded: one metric, one access-log line.

        Counted in `ambientmesh_waypoint_refused_total{reason,response_flags}` always, and in
        istio_requests_total when there was a request to speak of (an HTTP status)."""
        self.refused_c.labels(r.reason, r.flag).inc()
        if ctx is not None and self.flows is not None:
            self.flows.record_lazy(
                self._build_flow, time.time(), ctx, r.method, r.path, r.status or None, None,
                "DROPPED", REASONS.get(r.flag, r.reason), None, None, 0.0, 0, 0, "http/1.1", None,
                None,
            )  # fmt: skip
        if ctx is None or not r.log:
            return
        snap = ctx.routes.snapshot
        if r.status:
            labels = ConnectionLabels.build(
                reporter="waypoint",
                source=snap.pod_by_ip(ctx.src_ip),
                source_principal=ctx.caller,
                destination=None,
                service=ctx.service,
                protocol="http",
                mtls=True,
                response_flags=r.flag,
                trust_domain=snap.trust_domain,
            )
            self.metrics.request_done(labels, r.status, 0.0, 0, 0)
        log_access(
            AccessRecord(
                src=ctx.src_ip,
                dst="-",
                src_identity=ctx.caller,
                dst_identity=None,
                service=ctx.service.hostname,
                bytes_sent=0,
                bytes_received=0,
                duration_s=0.0,
                verdict="error",
                response_flags=r.flag,
                policy=None,
                mtls=True,
                protocol="http",
                method=r.method,
                path=r.path,
                status=r.status,
                reporter="waypoint",
            )
        )

    def _account(
        self,
        ctx: StreamContext,
        ex: ServerExchange,
        req: Request,
        body: ReplayableBody,
        out: _Outcome,
        duration: float,
        tc: TraceContext,
        wall0: int,
    ) -> None:
        snap = ctx.routes.snapshot
        t = out.target
        grpc = any(k == "content-type" and v.startswith("application/grpc") for k, v in req.headers)
        dst = t.pod if t is not None else None
        if snap is not self._labels_snap:
            self._labels.clear()  # pods and services may have new labels
            self._labels_snap = snap
        key = (ctx.src_ip, ctx.caller, ctx.service.key, dst.key if dst else "", grpc, out.flag)
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) > 10_000:
                self._labels.clear()  # many callers: never grow without bound
            labels = self._labels[key] = ConnectionLabels.build(
                reporter="waypoint",
                source=snap.pod_by_ip(ctx.src_ip),
                source_principal=ctx.caller,
                destination=dst,
                service=ctx.service,
                protocol="grpc" if grpc else "http",
                mtls=True,
                response_flags=out.flag,
                trust_domain=snap.trust_domain,
            )
        req_bytes = body.rec.size
        resp_bytes = ex.bytes_sent
        if self.flows is not None:
            if out.flag == "DENY":
                verdict, reason = "DENIED", None
            elif t is None or not out.status or out.flag in REASONS:
                verdict, reason = "DROPPED", REASONS.get(out.flag, out.flag)
            else:
                verdict, reason = "FORWARDED", None
            latency = duration - (time.monotonic() - out.head_at) if out.head_at else None
            self.flows.record_lazy(
                self._build_flow, time.time(), ctx, req.method, req.path, out.status or None,
                out.grpc_status, verdict, reason, out.policy, t, duration, req_bytes, resp_bytes,
                "grpc" if grpc else ex.protocol, req.host, latency,
            )  # fmt: skip
        account_request(
            self.metrics,
            labels,
            AccessRecord(
                src=ctx.src_ip,
                dst=f"{t.ip}:{t.port}" if t is not None else "-",
                src_identity=ctx.caller,
                dst_identity=snap.identity(t.pod) if t is not None and t.pod else None,
                service=ctx.service.hostname,
                bytes_sent=req_bytes,
                bytes_received=resp_bytes,
                duration_s=duration,
                verdict="deny"
                if out.flag == "DENY" or out.unauthenticated
                else ("allow" if out.status else "error"),
                response_flags=out.flag,
                policy=out.policy,
                mtls=True,
                protocol="grpc" if grpc else "http",
                method=req.method,
                path=req.path,
                status=out.status,
                reporter="waypoint",
                audit_policy=out.audit_policy,
                shadow=out.shadow,
                shadow_policy=out.shadow_policy,
                trace_id=tc.trace_id,
                span_id=tc.span_id,
                parent_span_id=tc.parent_id,
                retry_skipped=out.retry_skipped,
                mirror_skipped=out.mirror_skipped,
            ),
        )
        if self.exporter is not None and tc.sampled:
            self.exporter.submit(self._span(ctx, ex, req, out, tc, wall0, snap))

    def _span(
        self,
        ctx: StreamContext,
        ex: ServerExchange,
        req: Request,
        out: _Outcome,
        tc: TraceContext,
        wall0: int,
        snap: Any,
    ) -> Span:
        """The request as one span, attributes after OTel's HTTP server conventions, plus
        the mesh's own (Istio's attribute names: who called whom, over which route)."""
        host, sep, port = req.host.rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            host, port = req.host, ""
        attrs: list[tuple[str, str | int | bool]] = [
            ("http.request.method", req.method),
            ("url.path", req.path),
            ("url.scheme", ex.head.scheme),
            ("server.address", host.strip("[]")),
            ("client.address", ctx.src_ip),
            ("network.protocol.version", "2" if ex.protocol == "h2" else "1.1"),
            ("source.principal", ctx.caller),
            ("destination.service.host", ctx.service.hostname),
            ("response_flags", out.flag),
        ]
        if port:
            attrs.append(("server.port", int(port)))
        if out.status:
            attrs.append(("http.response.status_code", out.status))
        error = out.status >= 500 or out.status == 0
        if error:
            attrs.append(("error.type", str(out.status) if out.status else out.flag))
        t = out.target
        if t is not None:
            sns, _, sname = t.service.partition("/")
            attrs.append(("upstream_cluster", f"outbound|{t.service_port}||{sname}.{sns}.svc"))
            attrs.append(("upstream_address", f"{t.ip}:{t.port}"))
            dst_id = snap.identity(t.pod) if t.pod else None
            if dst_id:
                attrs.append(("destination.principal", dst_id))
        if out.route:
            attrs.append(("route_name", out.route))
        if out.retries:
            attrs.append(("http.request.resend_count", out.retries))
        return Span(
            tc.trace_id,
            tc.span_id,
            tc.parent_id,
            tc.tracestate,
            f"{req.method} {ctx.service.hostname}",
            SPAN_KIND_SERVER,
            wall0,
            time.time_ns(),
            tuple(attrs),
            error,
        )

    def _build_flow(
        self,
        now: float,
        ctx: StreamContext,
        method: str | None,
        path: str | None,
        status: int | None,
        grpc_status: str | None,
        verdict: str,
        reason: str | None,
        policy: str | None,
        t: Target | None,
        duration: float,
        sent: int,
        received: int,
        protocol: str,
        authority: str | None,
        latency: float | None,
    ) -> Flow:
        """One request's flow (`mesh.flows`), built from what `record_lazy` kept, only when a
        reader asks."""
        flows = self.flows
        assert flows is not None
        snap = ctx.routes.snapshot
        src = snap.pod_by_ip(ctx.src_ip)
        dst = t.pod if t is not None else None
        svc = ctx.service
        return Flow(
                time=now, verdict=verdict, node=flows.node or None, reporter="waypoint",
                proxy=flows.proxy or None,
                src_namespace=src.namespace if src is not None else ctx.caller_ns,
                src_pod=src.name if src is not None else None, src_identity=ctx.caller,
                src_ip=ctx.src_ip,
                dst_namespace=dst.namespace if dst is not None else svc.namespace,
                dst_pod=dst.name if dst is not None else None,
                dst_identity=snap.identity(dst) if dst is not None else None,
                dst_ip=t.ip if t is not None else None, dst_port=t.port if t is not None else None,
                dst_service=f"{svc.name}.{svc.namespace}", protocol=protocol, method=method,
                authority=authority, path=path, status=status,
                grpc_status=int(grpc_status) if grpc_status and grpc_status.isdigit() else None,
                policy=policy, reason=reason, mtls=True, duration_ms=duration * 1000.0,
                latency_ms=None if latency is None else max(0.0, latency) * 1000.0,
                bytes_sent=sent, bytes_received=received,
        )  # fmt: skip


_NO_LIMIT: contextlib.nullcontext[None] = contextlib.nullcontext()


async def _stop(pump: asyncio.Task[None] | None) -> None:
    if pump is not None and not pump.done():
        pump.cancel()
        await asyncio.wait([pump])


@dataclass(slots=True)
class _Outcome:
    status: int = 0
    flag: str = "-"
    policy: str | None = None
    target: Target | None = None
    retries: int = 0
    grpc_status: str | None = None
    audit_policy: str | None = None
    shadow: str | None = None
    shadow_policy: str | None = None
    unauthenticated: bool = False  # refused by RequestAuthentication (a 401, no Envoy flag)
    route: str | None = None  # namespace/name of the route that matched
    retry_skipped: str | None = None
    mirror_skipped: str | None = None
    head_at: float = 0.0  # monotonic time the response head went out (the flow's latency)


def upstream_protocol(ex: ServerExchange) -> str:
    """No protocol declared on the port: keep the client's (Envoy's USE_DOWNSTREAM_PROTOCOL);
    gRPC is HTTP/2 whatever the client spoke."""
    if ex.protocol == "h2":
        return "h2"
    grpc = any(k == "content-type" and v.startswith("application/grpc") for k, v in ex.head.headers)
    return "h2" if grpc else "http/1.1"
