"""`meshctl observe ui` on a real lab, in a real headless Chromium: the page the CLI serves
shows the services the lab's pods called and the edge a policy denied, from the ztunnels'
own flow streams (not a recording), and a typed filter narrows the table."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from meshctl.lab.demo import wait_for_app
from meshctl.lab.processes import REPO_ROOT
from tests.e2e.lab.labkit import LabFactory
from tests.e2e.lab.test_lab_mesh import client, vip
from tests.integration.meshctl.chromium import chromium_binary, chromium_page

pytestmark = pytest.mark.timeout(300)

ROWS = "Array.from(document.querySelectorAll('#flows tr'))"
VISIBLE = f"{ROWS}.filter(r => !r.hidden)"
MAP_TEXT = "Array.from(document.querySelectorAll('#map svg text')).map(t => t.textContent)"


async def test_observe_ui_shows_a_real_labs_flows_in_chromium(lab_factory: LabFactory) -> None:
    chromium_binary()  # skips (outside CI) or fails (in CI) without Chromium
    lab = lab_factory(mesh=True, capture="node")
    wait_for_app(lab, "mesh/server")
    server = vip(lab, "mesh", "server")
    assert all(o["ok"] for o in client(lab, "mesh/web", f"http://{server}/", count=2))
    assert not any(o["ok"] for o in client(lab, "mesh/batch", f"http://{server}/", count=2))
    await asyncio.sleep(0.5)  # flows are recorded when the connections have closed
    p = lab.paths
    ui = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl", "observe", "ui", "--lab", p.lab,
        "--state-root", str(p.state_root), "--listen", "127.0.0.1:0",
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert ui.stdout is not None
        line = (await asyncio.wait_for(ui.stdout.readline(), 60)).decode()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        async with chromium_page() as page:
            await page.send("Page.navigate", url=m.group(0))
            texts = await page.wait_for(
                f"(() => {{ const t = {MAP_TEXT}; return t.includes('server.mesh') && t; }})()"
            )
            assert "mesh/web" in texts and "mesh/batch" in texts, texts
            denied = await page.wait_for(
                "(() => { const d = Array.from(document.querySelectorAll('#map g.edge-denied'))"
                ".map(g => g.textContent); return d.length && d; })()"
            )
            assert any("DENIED by mesh/no-batch" in d for d in denied), denied
            total = await page.eval(f"{ROWS}.length")
            assert total >= 4
            await page.eval("document.getElementById('filter').focus()")
            await page.type("verdict:denied")
            await page.wait_for(f"{VISIBLE}.length > 0 && {VISIBLE}.length < {total}")
            verdicts = await page.eval(f"{VISIBLE}.map(r => r.dataset.verdict)")
            assert set(verdicts) == {"DENIED"}, verdicts
    finally:
        ui.terminate()  # by PID: the process this test started
        try:
            await asyncio.wait_for(ui.wait(), 20)
        except TimeoutError:
            ui.kill()
            await ui.wait()
