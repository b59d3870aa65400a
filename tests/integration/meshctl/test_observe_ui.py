"""`meshctl observe ui` in a real headless Chromium, fed the demo's recorded flows.

The page must show the demo's services and the denied edge on the map, take new flows live
(map and table), narrow the table as a filter is typed, and show a pod named with markup as
that text, never as an element.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from meshctl.observe import ui as ui_module
from meshctl.observe.ui import serve_ui
from tests.fakes.recorded_flows import DENY_POLICY, HOSTILE_POD, demo_flows
from tests.integration.meshctl.chromium import chromium_binary, chromium_page

pytestmark = pytest.mark.timeout(300)


class Recording:
    """A flow source that plays the first flows, then waits for `more` before the rest: the
    page is checked before and after, so "live" is tested, not just the first load."""

    def __init__(self, flows: list[dict[str, Any]], first: int) -> None:
        self.flows, self.first = flows, first
        self.more = asyncio.Event()

    async def __call__(self) -> AsyncIterator[Mapping[str, Any]]:
        for flow in self.flows[: self.first]:
            yield flow
        await self.more.wait()
        for flow in self.flows[self.first :]:
            yield flow
        await asyncio.Event().wait()  # a follow stream: stays open


@contextlib.asynccontextmanager
async def ui(source: Callable[[], AsyncIterator[Mapping[str, Any]]]) -> AsyncIterator[int]:
    ports: list[int] = []
    ready = asyncio.Event()
    task = asyncio.create_task(
        serve_ui(
            source, "127.0.0.1", 0, ready=ready, on_listening=lambda _h, p: ports.append(p),
            map_interval_s=0.2,
        )
    )  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield ports[0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


ROWS = "document.querySelectorAll('#flows tr').length"
VISIBLE = "Array.from(document.querySelectorAll('#flows tr')).filter(r => !r.hidden)"
MAP_TEXT = "Array.from(document.querySelectorAll('#map svg text')).map(t => t.textContent)"


async def test_live_map_and_filterable_table_in_chromium() -> None:
    chromium_binary()
    flows = demo_flows()
    # The bookinfo flows come later: the first map has no reviews.bookinfo yet.
    early = [f for f in flows if f["source"]["namespace"] != "bookinfo"]
    late = [f for f in flows if f["source"]["namespace"] == "bookinfo"]
    source = Recording(early + late, len(early))
    async with ui(source) as port, chromium_page() as page:
        await page.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
        await page.wait_for(f"{ROWS} === {len(early)}")
        texts = await page.wait_for(
            f"(() => {{ const t = {MAP_TEXT}; return t.includes('server.shop') && t; }})()"
        )
        for name in ("server.shop", "shop/web", "shop/batch", "legacy/curl"):
            assert name in texts
        assert "reviews.bookinfo" not in texts

        denied = await page.eval(
            "Array.from(document.querySelectorAll('#map g.edge-denied'))"
            ".map(g => [g.textContent, g.querySelector('path').getAttribute('stroke'),"
            " g.querySelector('path').getAttribute('stroke-dasharray')])"
        )
        assert len(denied) == 1
        label, stroke, dashes = denied[0]
        assert f"DENIED by {DENY_POLICY}" in label and stroke == "#cc0000" and dashes

        # Live: the rest of the flows arrive, and the table and the map take them in.
        source.more.set()
        await page.wait_for(f"{ROWS} === {len(flows)}")
        await page.wait_for(f"{MAP_TEXT}.includes('reviews.bookinfo')")

        # The hostile pod's name is a cell's text, and no element came of it.
        cells = await page.eval(
            "Array.from(document.querySelectorAll('#flows td')).map(td => td.textContent)"
        )
        assert f"shop/{HOSTILE_POD}" in cells
        assert f"shop/{HOSTILE_POD}" in await page.eval(MAP_TEXT)
        assert await page.eval("document.querySelectorAll('img, #map a, script:not([src])')"
                               ".length") == 0  # fmt: skip
        assert await page.eval("typeof window.__xss") == "undefined"

        # Typing a filter narrows the table; clearing it brings every row back.
        await page.eval("document.getElementById('filter').focus()")
        await page.type("verdict:denied")
        await page.wait_for(f"{VISIBLE}.length === 2")
        verdicts = await page.eval(f"{VISIBLE}.map(r => r.dataset.verdict)")
        assert verdicts == ["DENIED", "DENIED"]
        assert await page.eval("document.getElementById('shown').textContent") == (
            f"showing 2 of {len(flows)} flows"
        )
        await page.clear_focused()
        await page.type("legacy")
        await page.wait_for(f"{VISIBLE}.length === 4")
        sources = await page.eval(f"{VISIBLE}.map(r => r.cells[1].textContent)")
        assert set(sources) == {"legacy/curl"}
        await page.clear_focused()
        await page.wait_for(f"{VISIBLE}.length === {len(flows)}")
        await page.type("ns:bookinfo status:503")
        await page.wait_for(f"{VISIBLE}.length === 1")

        assert not [c for c in page.console if "Content Security Policy" in c], page.console


async def test_the_page_runs_offline_from_its_own_server_only() -> None:
    """Everything the page loads comes from the UI server itself (no CDN, no fonts)."""
    chromium_binary()
    async with ui(Recording(demo_flows(), 5)) as port, chromium_page() as page:
        await page.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
        await page.wait_for(f"{ROWS} === 5")
        urls = await page.eval(
            "performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
        )
        assert urls and all(u.startswith(f"http://127.0.0.1:{port}/") for u in urls), urls
        assert json.loads(json.dumps(urls))


HOSTILE_SVG = b"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     width="200pt" height="100pt" viewBox="0 0 200 100" onload="window.__xss='onload'">
<script>window.__xss = 'script';</script>
<style>text { fill: red }</style>
<g class="node" onclick="window.__xss='click'" style="fill:url(javascript:1)">
<a xlink:href="javascript:window.__xss='link'" href="javascript:window.__xss='link'">
<text x="10" y="20">linked</text></a>
<text x="10" y="40">server.shop</text>
<foreignObject width="100" height="50"><img xmlns="http://www.w3.org/1999/xhtml" src="x"
  onerror="window.__xss='foreign'"/></foreignObject>
<animate attributeName="href" values="javascript:window.__xss='animate'"/>
<image href="x" onerror="window.__xss='image'"/>
</g>
</svg>"""


async def test_the_map_svg_is_rebuilt_from_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: even an SVG full of script (not what graphviz makes of escaped labels)
    enters the page as drawing elements only, and nothing in it runs."""
    chromium_binary()
    monkeypatch.setattr(ui_module, "render_map", lambda _flows, _fmt: HOSTILE_SVG)
    async with ui(Recording(demo_flows(), 3)) as port, chromium_page() as page:
        await page.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
        await page.wait_for(f"{MAP_TEXT}.includes('server.shop')")
        await page.eval("document.querySelector('#map g').dispatchEvent(new MouseEvent('click'))")
        await asyncio.sleep(0.5)
        assert await page.eval("typeof window.__xss") == "undefined"
        kinds = await page.eval(
            "Array.from(document.querySelectorAll('#map *')).map(e => e.localName)"
        )
        assert set(kinds) <= {"svg", "g", "text"}, kinds
        attributes = await page.eval(
            "Array.from(document.querySelectorAll('#map *'))"
            ".flatMap(e => Array.from(e.attributes).map(a => a.name))"
        )
        assert not [a for a in attributes if a.startswith("on") or "href" in a or a == "style"]
        assert "linked" not in await page.eval(MAP_TEXT)  # a refused element goes whole
