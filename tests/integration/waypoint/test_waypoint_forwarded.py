"""`Forwarded` (RFC 7239) through a real waypoint started with `--forwarded` (the Waypoint's
`forwarded=True`): the backend sees the caller's address as HBONE vouched for it, the
waypoint's name and the scheme, after whatever the caller claimed."""

from __future__ import annotations

from tests.integration.waypoint.waypointkit import NS, Mesh


async def test_forwarded_is_appended_only_when_configured(mesh: Mesh) -> None:
    r = await mesh.get("/f", headers=[("forwarded", "for=192.0.2.1")])
    assert r.json()["headers"]["forwarded"] == "for=192.0.2.1"  # off: passed on untouched
    mesh.waypoint.handler.forwarded_by = f"_waypoint.{NS}"  # what forwarded=True sets
    r = await mesh.get("/f")
    assert r.json()["headers"]["forwarded"] == f"for=127.0.0.1;by=_waypoint.{NS};proto=http"
    r = await mesh.get("/f", headers=[("forwarded", 'for="[2001:db8::1]";proto=https')])
    assert r.json()["headers"]["forwarded"] == (
        f'for="[2001:db8::1]";proto=https, for=127.0.0.1;by=_waypoint.{NS};proto=http'
    )
