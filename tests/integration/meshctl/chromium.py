"""A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

Chromium listens for DevTools on a loopback port it picks itself (`--remote-debugging-port=0`,
announced in the profile's DevToolsActivePort file); the page target is driven over its
websocket. Every name lookup outside loopback is made to fail (`--host-resolver-rules`) and
background services are off, so the browser reaches nothing but the page under test. The
browser is started in a session of its own, stopped by its PID (its helpers by that session's
group, which only it and its children are in), and its profile directory removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--metrics-recording-only",
    "--mute-audio",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str:
    """The browser, or a skip (a failure in CI, where it must run)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed in CI: scripts/setup.sh installs Debian's chromium")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


class CDPError(Exception):
    pass


class Page:
    """One page target's DevTools session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.console: list[str] = []
        self.reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self.pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", "")) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])
        for future in self.pending.values():
            if not future.done():
                future.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call] = future
        await self.ws.send_str(json.dumps({"id": call, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 60)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def eval(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise CDPError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60.0) -> Any:
        """Poll `expression` until it is truthy (generous: the machine is shared)."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"{expression!r} still {value!r} after {timeout_s:.0f} s; console: {self.console}"
        )

    async def type(self, text: str) -> None:
        """Real key presses into the focused element, one character at a time."""
        for char in text:
            await self.send("Input.dispatchKeyEvent", type="keyDown", text=char, key=char)
            await self.send("Input.dispatchKeyEvent", type="keyUp", key=char)

    async def clear_focused(self) -> None:
        await self.send("Input.dispatchKeyEvent", type="keyDown", key="a", code="KeyA",
                        modifiers=2, commands=["selectAll"])  # fmt: skip
        await self.send("Input.dispatchKeyEvent", type="keyUp", key="a", code="KeyA", modifiers=2)
        await self.send(
            "Input.dispatchKeyEvent", type="keyDown", key="Backspace", code="Backspace",
            windowsVirtualKeyCode=8,
        )  # fmt: skip
        await self.send("Input.dispatchKeyEvent", type="keyUp", key="Backspace", code="Backspace")


async def _active_port(profile: Path, proc: asyncio.subprocess.Process) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise CDPError(f"chromium exited with {proc.returncode} before DevTools was up")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.1)
    raise CDPError("chromium did not open its DevTools port within 90 s")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    # Renderer and zygote helpers left in the browser's own process group, if any.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def chromium_page() -> AsyncIterator[Page]:
    """A blank page in a fresh headless Chromium, torn down completely afterwards."""
    binary = chromium_binary()
    profile = Path(tempfile.mkdtemp(prefix="h16ui-chromium-"))
    proc = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = await _active_port(profile, proc)
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/json/list"
            deadline = time.monotonic() + 60
            pages: list[dict[str, Any]] = []
            while not pages and time.monotonic() < deadline:
                async with http.get(url) as response:
                    pages = [t for t in await response.json() if t.get("type") == "page"]
                if not pages:
                    await asyncio.sleep(0.2)
            if not pages:
                raise CDPError("chromium shows no page target")
            async with http.ws_connect(
                pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
            ) as ws:
                page = Page(ws)
                page.reader = asyncio.create_task(page._read())
                try:
                    await page.send("Runtime.enable")
                    await page.send("Page.enable")
                    yield page
                finally:
                    await ws.close()
                    page.reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await page.reader
    finally:
        await _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
