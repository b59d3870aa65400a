"""FileSource live reload against real files: good updates publish, bad ones are refused."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from mesh.config.parse import ConfigErrors
from mesh.config.source import ConfigStore, FileSource


def svc(name: str, ip: str) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
    )


def write(path: Path, text: str) -> None:
    # Write-then-rename, as editors and ConfigMap updates do; the inode changes.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_reload_and_keep_last_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "mesh.yaml"
    write(f, svc("a", "10.96.0.1"))
    store = ConfigStore()
    source = FileSource([tmp_path], store, poll_interval=0.02)
    first = source.load_initial()
    assert [s.name for s in first.services] == ["a"]

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run())
        updates = store.subscribe()
        write(f, svc("b", "10.96.0.2"))
        snap = await asyncio.wait_for(anext(updates), 5)
        assert [s.name for s in snap.services] == ["b"] and snap.version > first.version
        assert store.current is snap

        with caplog.at_level(logging.ERROR, logger="mesh.config"):
            write(f, svc("c", "10.96.0.300") + "---\n" + svc("d", "10.96.0.2") * 1)
            (tmp_path / "other.yaml").write_text(svc("e", "10.96.0.2"))
            for _ in range(250):
                await asyncio.sleep(0.02)
                if len(caplog.records) >= 2:
                    break
        msgs = [r.getMessage() for r in caplog.records]
        assert any(
            "Service default/c: spec.clusterIP '10.96.0.300' is not an IPv4 address" in m
            for m in msgs
        ), msgs
        assert any("10.96.0.2:80 is also Service default/d's" in m for m in msgs), msgs
        assert store.current is snap

        write(f, "kind: [broken\n")
        (tmp_path / "other.yaml").unlink()
        await asyncio.sleep(0.2)
        assert store.current is snap
        write(f, svc("z", "10.96.0.9"))
        snap2 = await asyncio.wait_for(anext(updates), 5)
        assert [s.name for s in snap2.services] == ["z"] and snap2.version > snap.version
        task.cancel()


def test_first_load_failure_raises(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(svc("a", "nope"))
    with pytest.raises(ConfigErrors, match=r"Service default/a: spec\.clusterIP"):
        FileSource([tmp_path], ConfigStore()).load_initial()
