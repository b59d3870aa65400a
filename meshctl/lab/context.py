"""What every part of a lab works on: its paths, where it reports, and its state file.

The parts of a lab (topology, processes, ztunnels, the CNI chain, teardown) are separate
objects; this is the one thing they share, so none of them needs the `Lab` itself. The state
is loaded lazily (a command such as `meshctl lab status` finds a lab that is up) and forgotten
when the lab comes down.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from meshctl.lab import manifest
from meshctl.lab.names import LabPaths
from meshctl.lab.state import LabState
from meshctl.lab.system import LabError


class LabContext:
    def __init__(self, paths: LabPaths, out: Callable[[str], None], *, mesh: bool) -> None:
        self.paths = paths
        self.out = out
        self.mesh = mesh
        self._state: LabState | None = None

    @property
    def state(self) -> LabState:
        if self._state is None:
            st = LabState.load(self.paths.state_file)
            if st is None:
                raise LabError(f"lab {self.paths.lab!r} is not up (no {self.paths.state_file})")
            self._state = st
        return self._state

    def snapshot(self) -> Snapshot:
        """The config the lab's ztunnels run on, as they read it."""
        return parse_objects(manifest.load([self.paths.config_file]))

    def begin(self, state: LabState) -> None:
        """A fresh state for `up`, saved before anything it will name exists."""
        self._state = state
        state.save()

    def forget(self) -> None:
        self._state = None

    @property
    def capture(self) -> str:
        """How enrolled pods' traffic reaches ztunnel: "enrol" (ztunnel's enrolment socket:
        BPF in the pod's cgroup, listeners in the pod's netns) or "node" (netfilter REDIRECT
        in the node's netns to ztunnel's node-level listeners), or "none" (no mesh)."""
        return str(self.state.info.get("capture", "none"))
