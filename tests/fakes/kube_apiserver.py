"""A wire-level stand-in for the Kubernetes API server, for tests on a machine without one.

It speaks the real protocol over real HTTP on 127.0.0.1 (port 0) so the real
`kubernetes_asyncio` client drives it unchanged: collection/item URLs for core and group APIs,
list responses with a collection resourceVersion, chunked `?watch=1` streams of JSON lines
(ADDED / MODIFIED / DELETED / BOOKMARK / ERROR), one global resourceVersion counter, an event
history that can be compacted (so a too-old resourceVersion gets a 410 ERROR event, as etcd
compaction causes), `fieldSelector=spec.nodeName=...`, equality `labelSelector`s,
create / replace / merge-patch / delete, the `status` subresource, the
`pods/{name}[:port]/proxy/...` subresource (GET, streamed, to the pod's `status.podIP`,
loopback only), and TokenReview. Tests reach in through methods (`put`, `delete`, `compact`,
`drop_watches`, `bookmark`) to make the cluster change under the client.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# (group/version, plural) -> (kind, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "namespaces"): ("Namespace", False),
    ("v1", "nodes"): ("Node", False),
    ("v1", "pods"): ("Pod", True),
    ("v1", "services"): ("Service", True),
    ("v1", "configmaps"): ("ConfigMap", True),
    ("v1", "serviceaccounts"): ("ServiceAccount", True),
    ("discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", True),
    ("apps/v1", "deployments"): ("Deployment", True),
    ("gateway.networking.k8s.io/v1", "gateways"): ("Gateway", True),
    ("gateway.networking.k8s.io/v1", "httproutes"): ("HTTPRoute", True),
    ("gateway.networking.k8s.io/v1", "grpcroutes"): ("GRPCRoute", True),
    ("security.istio.io/v1", "authorizationpolicies"): ("AuthorizationPolicy", True),
    ("security.istio.io/v1", "peerauthentications"): ("PeerAuthentication", True),
    ("security.istio.io/v1", "requestauthentications"): ("RequestAuthentication", True),
    ("rbac.authorization.k8s.io/v1", "clusterroles"): ("ClusterRole", False),
    ("rbac.authorization.k8s.io/v1", "clusterrolebindings"): ("ClusterRoleBinding", False),
    ("networking.k8s.io/v1", "networkpolicies"): ("NetworkPolicy", True),
    ("cilium.io/v2", "ciliumnetworkpolicies"): ("CiliumNetworkPolicy", True),
}
KIND_TO_RESOURCE = {kind: key for key, (kind, _) in RESOURCES.items()}


@dataclass
class Event:
    rv: int
    type: str
    resource: tuple[str, str]
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclass
class TokenIdentity:
    """What a TokenReview reports for one bearer token."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, list[str]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _field_matches(obj: Mapping[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        negate = "!=" in term
        key, _, want = term.partition("!=" if negate else "=")
        want = want.lstrip("=")
        cur: Any = obj
        for part in key.strip().split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        have = "" if cur is None else str(cur)
        if (have == want) == negate:
            return False
    return True


def _labels_match(obj: Mapping[str, Any], selector: str | None) -> bool:
    """`labelSelector` equality terms: `key`, `key=value`, `key!=value` (no set syntax)."""
    if not selector:
        return True
    meta = obj.get("metadata")
    labels = (meta.get("labels") if isinstance(meta, Mapping) else None) or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, _, want = term.partition("!=")
            if labels.get(key) == want:
                return False
        elif "=" in term:
            key, _, want = term.partition("=")
            if labels.get(key) != want.lstrip("="):
                return False
        elif term not in labels:
            return False
    return True


class FakeApiServer:
    def __init__(self) -> None:
        self.rv = 1
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {
            key: {} for key in RESOURCES
        }
        self.history: list[Event] = []
        self.oldest_rv = 1  # events with rv > oldest_rv are retained
        self.tokens: dict[str, TokenIdentity] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path_qs) for assertions
        self.watch_count = 0
        self.fail_next: list[int] = []  # status codes to return on the next list/watch calls
        self.next_ip = 100
        self.missing: set[str] = set()  # plurals answered 404, as when a CRD is not installed
        self._watchers: set[_Watcher] = set()
        self.closing = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.closing = True
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- test-side mutation ------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace `obj` (by kind/namespace/name); records ADDED or MODIFIED."""
        obj = copy.deepcopy(dict(obj))
        resource = KIND_TO_RESOURCE[obj["kind"]]
        namespaced = RESOURCES[resource][1]
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "default") if namespaced else ""
        if namespaced:
            meta["namespace"] = ns
        key = (ns, meta["name"])
        prev = self.objects[resource].get(key)
        meta.setdefault("uid", prev["metadata"]["uid"] if prev else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        if prev is not None and "generation" in prev["metadata"]:
            meta.setdefault("generation", prev["metadata"]["generation"])
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(self._next_rv())
        obj["apiVersion"] = resource[0]
        self.objects[resource][key] = obj
        self._emit(Event(self.rv, "MODIFIED" if prev else "ADDED", resource, obj, prev))
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        resource = KIND_TO_RESOURCE[kind]
        if RESOURCES[resource][1] and not namespace:
            namespace = "default"
        obj = self.objects[resource].pop((namespace, name), None)
        if obj is None:
            return None
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(Event(self.rv, "DELETED", resource, obj, obj))
        return obj

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        resource = KIND_TO_RESOURCE[kind]
        if RESOURCES[resource][1] and not namespace:
            namespace = "default"
        o = self.objects[resource].get((namespace, name))
        return copy.deepcopy(o) if o is not None else None

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: older resourceVersions now get 410."""
        self.history.clear()
        self.oldest_rv = self.rv

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no final chunk)."""
        for w in list(self._watchers):
            w.abort()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resourceVersion to watchers that asked for them."""
        for w in list(self._watchers):
            if w.bookmarks:
                w.queue.put_nowait(("BOOKMARK", self.rv))

    def _emit(self, ev: Event) -> None:
        self.history.append(ev)
        for w in list(self._watchers):
            if w.resource == ev.resource:
                w.queue.put_nowait(ev)

    # -- HTTP --------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif parts and parts[0] == "apis" and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return web.json_response(_status(404, "NotFound", "no such path"), status=404)
        if gv == "authentication.k8s.io/v1" and rest == ["tokenreviews"]:
            if request.method != "POST":
                return web.json_response(_status(405, "MethodNotAllowed", "POST only"), 405)
            return await self._token_review(request)
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if gv == "v1" and ns and len(rest) >= 3 and rest[0] == "pods" and rest[2] == "proxy":
            return await self._pod_proxy(request, ns, rest[1], "/".join(rest[3:]))
        if not rest or (gv, rest[0]) not in RESOURCES:
            return web.json_response(_status(404, "NotFound", f"unknown resource {rest}"), 404)
        resource = (gv, rest[0])
        if rest[0] in self.missing:
            msg = f"the server could not find the requested resource ({rest[0]})"
            return web.json_response(_status(404, "NotFound", msg), status=404)
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if name is None:
            if request.method == "GET":
                if self.fail_next:
                    code = self.fail_next.pop(0)
                    return web.json_response(_status(code, "InternalError", "injected"), code)
                if request.query.get("watch") in ("1", "true", "True"):
                    return await self._watch(request, resource, ns)
                return self._list(request, resource, ns)
            if request.method == "POST":
                body = await request.json()
                return self._create(resource, ns, body)
            return web.json_response(_status(405, "MethodNotAllowed", "bad method"), status=405)
        return await self._item(request, resource, ns or "", name, sub)

    async def _pod_proxy(
        self, request: web.Request, ns: str, name_port: str, path: str
    ) -> web.StreamResponse:
        """As the API server proxies to a pod: to its IP and the named port, the body
        streamed back as it comes (which is what makes `follow` streams work through it)."""
        if request.method != "GET":
            return web.json_response(_status(405, "MethodNotAllowed", "GET only"), status=405)
        name, _, port_s = name_port.partition(":")
        pod = self.objects[("v1", "pods")].get((ns, name))
        if pod is None:
            return web.json_response(
                _status(404, "NotFound", f'pods "{name}" not found'), status=404
            )
        ip = str((pod.get("status") or {}).get("podIP") or "")
        if not ip.startswith("127.") or not port_s.isdigit():
            msg = f"pod {ns}/{name}: no loopback podIP or port to proxy to"
            return web.json_response(_status(503, "ServiceUnavailable", msg), status=503)
        try:
            r, w = await asyncio.open_connection(ip, int(port_s))
        except OSError as exc:
            msg = f"error trying to reach service: {exc}"
            return web.json_response(_status(503, "ServiceUnavailable", msg), status=503)
        try:
            query = request.query_string
            target = "/" + path + (f"?{query}" if query else "")
            w.write(f"GET {target} HTTP/1.1\r\nhost: {ip}\r\nconnection: close\r\n\r\n".encode())
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            ctype = "text/plain"
            for line in head.decode("latin-1").split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-type":
                    ctype = v.strip()
            resp = web.StreamResponse(status=status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            while chunk := await r.read(65536):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            w.close()

    def _list(
        self, request: web.Request, resource: tuple[str, str], ns: str | None
    ) -> web.Response:
        fsel = request.query.get("fieldSelector")
        lsel = request.query.get("labelSelector")
        items = [
            copy.deepcopy(o)
            for (ons, _), o in sorted(self.objects[resource].items())
            if (ns is None or ons == ns) and _field_matches(o, fsel) and _labels_match(o, lsel)
        ]
        for it in items:  # list items carry no kind/apiVersion, as the real server does
            it.pop("kind", None)
            it.pop("apiVersion", None)
        kind = RESOURCES[resource][0]
        return web.json_response(
            {
                "kind": f"{kind}List",
                "apiVersion": resource[0],
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, resource: tuple[str, str], ns: str | None
    ) -> web.StreamResponse:
        self.watch_count += 1
        fsel = request.query.get("fieldSelector")
        lsel = request.query.get("labelSelector")
        rv_param = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = request.query.get("timeoutSeconds")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        # Registered before the first await, so drop_watches()/stop() can never miss a watch.
        watcher = _Watcher(resource, bookmarks, request)
        self._watchers.add(watcher)
        if self.closing:
            watcher.abort()

        def in_scope(o: Mapping[str, Any] | None) -> bool:
            if o is None:
                return False
            if ns is not None and o["metadata"].get("namespace") != ns:
                return False
            return _field_matches(o, fsel) and _labels_match(o, lsel)

        async def send(typ: str, obj: Mapping[str, Any]) -> None:
            line = json.dumps({"type": typ, "object": obj}) + "\n"
            await resp.write(line.encode())

        try:
            await resp.prepare(request)
            if rv_param in ("", "0"):
                start = self.rv
                for _key, o in sorted(self.objects[resource].items()):
                    if in_scope(o):
                        await send("ADDED", o)
            else:
                start = int(rv_param)
                if start < self.oldest_rv:
                    await send(
                        "ERROR",
                        _status(
                            410,
                            "Expired",
                            f"too old resource version: {start} ({self.oldest_rv})",
                        ),
                    )
                    await resp.write_eof()
                    return resp
                for ev in [e for e in self.history if e.rv > start and e.resource == resource]:
                    await self._send_event(send, ev, in_scope)
                    start = ev.rv
            deadline = (
                asyncio.get_running_loop().time() + float(timeout) if timeout is not None else None
            )
            while True:
                wait = None
                if deadline is not None:
                    wait = deadline - asyncio.get_running_loop().time()
                    if wait <= 0:
                        break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    break
                if item is _ABORT:
                    # Drop the TCP connection without the terminating chunk: a mid-stream cut.
                    transport = request.transport
                    if transport is not None:
                        transport.abort()
                    return resp
                if isinstance(item, tuple):
                    await send(
                        "BOOKMARK",
                        {
                            "kind": RESOURCES[resource][0],
                            "apiVersion": resource[0],
                            "metadata": {"resourceVersion": str(item[1])},
                        },
                    )
                    continue
                assert isinstance(item, Event)
                if item.rv <= start:
                    continue
                await self._send_event(send, item, in_scope)
            await resp.write_eof()
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        finally:
            self._watchers.discard(watcher)

    @staticmethod
    async def _send_event(send: Any, ev: Event, in_scope: Any) -> None:
        now, before = in_scope(ev.obj), in_scope(ev.prev)
        if ev.type == "DELETED":
            if before or now:
                await send("DELETED", ev.obj)
        elif now and not before:
            await send("ADDED", ev.obj)
        elif now:
            await send("MODIFIED", ev.obj)
        elif before:  # left the selector: the watcher sees it go away
            await send("DELETED", ev.obj)

    def _create(self, resource: tuple[str, str], ns: str | None, body: Any) -> web.Response:
        kind, namespaced = RESOURCES[resource]
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            return web.json_response(_status(400, "BadRequest", "metadata required"), status=400)
        body["kind"] = kind
        if namespaced:
            body["metadata"]["namespace"] = ns or body["metadata"].get("namespace", "default")
        key = (
            body["metadata"].get("namespace", "") if namespaced else "",
            body["metadata"]["name"],
        )
        if key in self.objects[resource]:
            msg = f'{resource[1]} "{key[1]}" already exists'
            return web.json_response(_status(409, "AlreadyExists", msg), status=409)
        if kind == "Service":  # the real server allocates the cluster IP
            spec = body.setdefault("spec", {})
            if not spec.get("clusterIP"):
                self.next_ip += 1
                spec["clusterIP"] = f"10.96.{self.next_ip // 250}.{self.next_ip % 250 + 1}"
        return web.json_response(self.put(body), status=201)

    async def _item(
        self, request: web.Request, resource: tuple[str, str], ns: str, name: str, sub: str | None
    ) -> web.Response:
        kind, namespaced = RESOURCES[resource]
        key = (ns if namespaced else "", name)
        cur = self.objects[resource].get(key)
        if request.method != "PUT" and cur is None:
            msg = f'{resource[1]} "{name}" not found'
            return web.json_response(_status(404, "NotFound", msg), status=404)
        if request.method == "GET":
            return web.json_response(copy.deepcopy(cur))
        if request.method == "DELETE":
            return web.json_response(self.delete(kind, name, key[0]))
        body = await request.json()
        if request.method == "PUT":
            if cur is None:
                return self._create(resource, ns, body)
            want_rv = body.get("metadata", {}).get("resourceVersion")
            if want_rv and want_rv != cur["metadata"]["resourceVersion"]:
                return web.json_response(_status(409, "Conflict", "object modified"), status=409)
            new = copy.deepcopy(body)
            new["kind"] = kind
            new["metadata"].pop("resourceVersion", None)
            if sub == "status":  # only status changes through the subresource
                new = {**copy.deepcopy(cur), "status": body.get("status")}
            elif "status" in cur:
                new["status"] = cur["status"]
            return web.json_response(self._replace(cur, new))
        if request.method == "PATCH":
            ctype = request.headers.get("Content-Type", "")
            builtin = resource[0] in ("v1", "apps/v1", "discovery.k8s.io/v1")
            strategic = "strategic-merge-patch" in ctype
            # Custom resources take no strategic merge patch, as on a real server.
            if "merge-patch" not in ctype or (strategic and not builtin):
                return web.json_response(_status(415, "UnsupportedMediaType", ctype), status=415)
            if sub == "status":
                body = {"status": body.get("status")}
            else:
                body = {k: v for k, v in body.items() if k != "status"}
            new = _merge_patch(cur, body)
            return web.json_response(self._replace(cur, new))
        return web.json_response(_status(405, "MethodNotAllowed", "bad method"), status=405)

    def _replace(self, cur: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        meta["uid"] = cur["metadata"]["uid"]
        meta.pop("resourceVersion", None)
        gen = cur["metadata"].get("generation", 1)
        if new.get("spec") != cur.get("spec"):
            gen += 1
        meta["generation"] = gen
        return self.put(new)

    async def _token_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        spec = body.get("spec", {})
        ident = self.tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        status: dict[str, Any]
        if ident is None or (wanted and not set(wanted) & set(ident.audiences)):
            status = {"authenticated": False, "error": "invalid bearer token"}
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": ident.username,
                    "uid": ident.uid,
                    "groups": list(ident.groups),
                    "extra": {k: list(v) for k, v in ident.extra.items()},
                },
                "audiences": list(set(wanted) & set(ident.audiences)) if wanted else [],
            }
        return web.json_response(
            {
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": status,
            },
            status=201,
        )


_ABORT = object()


class _Watcher:
    def __init__(self, resource: tuple[str, str], bookmarks: bool, request: web.Request) -> None:
        self.resource = resource
        self.bookmarks = bookmarks
        self.request = request
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def abort(self) -> None:
        self.queue.put_nowait(_ABORT)
