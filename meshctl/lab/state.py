"""The lab's record of what it created, written as it goes.

Each object is recorded *before* (processes: right after) it is created, and the file is
rewritten atomically every time, so a lab that crashes half-way still leaves an accurate list
for `lab down` to work from. Removing something that was recorded but never created is a no-op.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class ProcRecord:
    kind: str  # "pod" | "ztunnel" | "ca"
    name: str  # pod key, or node name
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled PID from ours
    log: str = ""


@dataclass(slots=True)
class CniRecord:
    pod: str  # namespace/name
    node: str
    container_id: str
    netns: str
    configs: list[dict[str, Any]]  # as passed to ADD, in order; DEL runs them reversed
    results: list[dict[str, Any]] = field(default_factory=list)
    cni_path: str = "/usr/lib/cni"
    args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS (K8S_POD_*, AMBIENT_CGROUP)


@dataclass(slots=True)
class LabState:
    name: str
    path: Path
    netns: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    cni: list[CniRecord] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "name": self.name,
            "netns": self.netns,
            "cgroups": self.cgroups,
            "cni": [asdict(c) for c in self.cni],
            "procs": [asdict(p) for p in self.procs],
            "nodes": self.nodes,
            "pods": self.pods,
            "info": self.info,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> LabState | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"lab state {path}: unreadable ({exc}); remove it by hand") from exc
        return cls(
            name=data["name"],
            path=path,
            netns=list(data.get("netns", [])),
            cgroups=list(data.get("cgroups", [])),
            cni=[CniRecord(**c) for c in data.get("cni", [])],
            procs=[ProcRecord(**p) for p in data.get("procs", [])],
            nodes=dict(data.get("nodes", {})),
            pods=dict(data.get("pods", {})),
            info=dict(data.get("info", {})),
        )

    def add_netns(self, name: str) -> None:
        if name not in self.netns:
            self.netns.append(name)
            self.save()

    def add_cgroup(self, path: str) -> None:
        if path not in self.cgroups:
            self.cgroups.append(path)
            self.save()

    def add_proc(self, rec: ProcRecord) -> None:
        self.procs.append(rec)
        self.save()

    def drop_proc(self, pid: int) -> None:
        self.procs = [p for p in self.procs if p.pid != pid]
        self.save()
