"""Live configuration: a store holding the current Snapshot, and a file source feeding it.

Consumers (ztunnel, waypoint, the CA service) read `store.current` on the hot path (one
attribute load) and `async for snap in store.subscribe()` to react to changes. A bad update is
logged in full and the last good snapshot stays: a typo in a manifest must never take the data
path down (DESIGN.md §6).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from mesh.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN
from mesh.config.parse import ConfigErrors, load_snapshot
from mesh.config.snapshot import Snapshot

log = logging.getLogger("mesh.config")

__all__ = ["ConfigStore", "FileSource"]


class ConfigStore:
    """The current snapshot, swapped whole. Versions strictly increase.

    Subscribers get the newest snapshot only (intermediate ones may be skipped when they fall
    behind): each subscriber holds one pending slot, so a slow consumer costs no memory."""

    def __init__(self, initial: Snapshot | None = None) -> None:
        self._current = initial if initial is not None else Snapshot()
        self._waiters: set[asyncio.Event] = set()

    @property
    def current(self) -> Snapshot:
        return self._current

    def publish(self, snap: Snapshot) -> Snapshot:
        """Install `snap` with the next version number and wake subscribers."""
        snap = snap.with_version(self._current.version + 1)
        self._current = snap
        for ev in self._waiters:
            ev.set()
        return snap

    async def subscribe(self) -> AsyncIterator[Snapshot]:
        """Yield each newer snapshot as it is published (the current one is not repeated)."""
        ev = asyncio.Event()
        self._waiters.add(ev)
        seen = self._current.version
        try:
            while True:
                await ev.wait()
                ev.clear()
                snap = self._current
                if snap.version > seen:
                    seen = snap.version
                    yield snap
        finally:
            self._waiters.discard(ev)


_Stamp = tuple[tuple[str, int, int, int], ...]


def _stamp(paths: Sequence[Path]) -> _Stamp:
    """(path, mtime_ns, size, inode) of every YAML file: a cheap change detector that also
    catches atomic renames (the inode changes) and Kubernetes ConfigMap symlink swaps."""
    out: list[tuple[str, int, int, int]] = []
    for p in paths:
        files = (
            sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml")) if p.is_dir() else [p]
        )
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                out.append((str(f), -1, -1, -1))
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class FileSource:
    """Polls files/directories and publishes a new snapshot when they change."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        store: ConfigStore,
        *,
        poll_interval: float = 0.5,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.store = store
        self.poll_interval = poll_interval
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self._stamp: _Stamp | None = None

    def _load(self) -> Snapshot:
        return load_snapshot(
            self.paths, trust_domain=self.trust_domain, root_namespace=self.root_namespace
        )

    def load_initial(self) -> Snapshot:
        """First load; `ConfigErrors` propagates: a node must not start on broken config."""
        self._stamp = _stamp(self.paths)
        return self.store.publish(self._load())

    def _reload_if_changed(self) -> Snapshot | None:
        """Stat and parse (thread-safe: touches no loop state); None when nothing to publish."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            return self._load()
        except ConfigErrors as exc:
            for err in exc.errors:
                log.error(
                    "config rejected, keeping version %d: %s", self.store.current.version, err
                )
            return None
        except Exception:  # a parser bug must not end live reload (run() would die with it)
            log.exception("config reload failed, keeping version %d", self.store.current.version)
            return None

    def _publish(self, snap: Snapshot) -> None:
        published = self.store.publish(snap)
        where = ", ".join(map(str, self.paths))
        log.info("config version %d loaded from %s", published.version, where)

    def poll_once(self) -> bool:
        """Reload if anything changed; True when a new snapshot was published."""
        snap = self._reload_if_changed()
        if snap is None:
            return False
        self._publish(snap)
        return True

    async def run(self) -> None:
        """Poll forever (cancel to stop). Calls `load_initial` first if nobody did."""
        if self._stamp is None:
            self.load_initial()
        while True:
            await asyncio.sleep(self.poll_interval)
            # Parsing is CPU work that would stall the loop on big manifests: do it in a
            # thread, but publish here, since waking subscribers must happen on the loop.
            snap = await asyncio.to_thread(self._reload_if_changed)
            if snap is not None:
                self._publish(snap)
