"""Taking a lab down: everything recorded in its state file, and anything a crash kept out of
it (found by the lab's name prefix), in the reverse order of `up`, as a node deletes pods.
Idempotent; every step runs even when an earlier one failed, and each failure is reported."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from meshctl.lab import cni, container
from meshctl.lab.names import LabPaths
from meshctl.lab.state import LabState, ProcRecord
from meshctl.lab.system import (
    cgroup_kill_all,
    cgroup_remove_tree,
    netns_del,
    netns_exists,
    netns_list,
    stop_process,
)


def teardown(p: LabPaths, say: Callable[[str], None]) -> list[str]:
    """Remove everything of the lab at `p`; the problems met, one line each."""
    st = LabState.load(p.state_file)
    problems: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            problems.append(f"{what}: {exc}")

    def stop(records: list[ProcRecord]) -> None:
        for r in records:
            say(f"stopping {r.kind} {r.name} (pid {r.pid})")
            step(f"stop {r.kind} {r.name}",
                 lambda r=r: stop_process(r.pid, r.start_time, group=True))  # type: ignore[misc]  # fmt: skip

    # as a node deletes pods: containers stop, then the runtime runs the CNI chain's DEL
    # (ambientmesh-cni first: ztunnel, still running, unenrols the pod), then the node goes
    if st is not None:
        stop([r for r in st.procs if r.kind == "pod"])
        step("kill leftover pod processes", lambda: cgroup_kill_all(p.lab_cgroup / "pods"))
        for rec in reversed(st.cni):
            node_ns = p.node_netns(rec.node)
            if not (netns_exists(node_ns) and netns_exists(rec.netns)):
                continue
            say(f"CNI DEL {rec.pod}")
            for conf, res in reversed(list(zip(rec.configs, rec.results + [{}] * 2,
                                               strict=False))):  # fmt: skip
                step(
                    f"CNI DEL {rec.pod} {conf.get('type')}",
                    lambda c=conf, r=res, rec=rec, n=node_ns: cni.invoke(  # type: ignore[misc]
                        "DEL", cni.del_config(c, r), node_netns=n,
                        container_id=rec.container_id, pod_netns=rec.netns,
                        cni_path=rec.cni_path, cni_args=rec.args,
                    ),
                )  # fmt: skip
        stop([r for r in st.procs if r.kind != "pod"])
    step("kill leftover processes", lambda: cgroup_kill_all(p.lab_cgroup))
    step("containers", lambda: container.remove_all(st.info if st else {}, p.prefix))
    names = set(netns_list(p.prefix)) | set(st.netns if st else [])
    # pods first, then nodes, then the underlay: links die with their namespace
    order = sorted(names, key=lambda n: (0 if "-pod-" in n else 1 if "-node-" in n else 2, n))
    for n in order:
        if netns_exists(n):
            say(f"removing netns {n}")
        step(f"netns {n}", lambda n=n: netns_del(n))  # type: ignore[misc]
    if p.lab_pins.exists():
        say(f"removing BPF pins {p.lab_pins}")
        step("bpf detach", lambda: _detach_programs(p, st))
        step("bpf pins", lambda: _rm_pins(p.lab_pins))
    if p.lab_cgroup.exists():
        say(f"removing cgroups {p.lab_cgroup}")
        step("cgroups", lambda: cgroup_remove_tree(p.lab_cgroup))
    step("state dir", lambda: _remove_settled(p.state_dir))
    if not problems:
        step("state file", lambda: p.state_file.unlink(missing_ok=True))
    # the shared parents (/sys/fs/bpf/ambientmesh, the cgroup, /run/ambientmesh) go with
    # the last lab: rmdir removes only an empty directory, so another lab's stay
    for parent in (p.lab_pins.parent, p.lab_cgroup.parent, p.state_file.parent,
                   p.state_dir.parent):  # fmt: skip
        with contextlib.suppress(OSError):
            parent.rmdir()
    return problems


def _remove_settled(d: Path, tries: int = 5, pause: float = 0.2) -> None:
    """rmtree, again while something still puts files there: a `lab up` killed mid-way can
    leave a child in flight (a CNI plugin writing its result) that writes after the first pass
    and would keep the state root from going."""
    for _ in range(tries):
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            return
        time.sleep(pause)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held off while the lab comes down: an impatient second signal must
    not leave half a lab behind (every step has its own timeout instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda n, _f: got.append(n)) for sig in _DEFERRED}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got:
            raise KeyboardInterrupt


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _detach_programs(p: LabPaths, st: LabState | None) -> None:
    """Detach every node's programs from ztunnel's and the pods' cgroups before the cgroups
    go. Removing a cgroup detaches too, but the kernel frees a removed cgroup (and with it
    the programs and their maps) only once the last socket accounted to it is gone, which a
    connection lingering in FIN_WAIT can delay by a minute; detaching frees them now."""
    from bpf.loader import NODE_PROGRAMS, POD_PROGRAMS, BpfRedirector, BpfUnavailable

    if not p.lab_pins.is_dir():
        return
    pods = list(st.pods.values()) if st is not None else []
    for node_pins in sorted(d for d in p.lab_pins.iterdir() if d.is_dir()):
        node = node_pins.name
        r = BpfRedirector(pin_root=str(node_pins), ztunnel_cgroup=str(p.ztunnel_cgroup(node)))
        try:
            r.open_pinned()
        except BpfUnavailable:
            continue  # nothing loaded for this node
        for cg, names in [
            (str(p.ztunnel_cgroup(node)), NODE_PROGRAMS),
            *[(str(i["cgroup"]), POD_PROGRAMS) for i in pods if i.get("node") == node],
        ]:  # fmt: skip
            if os.path.isdir(cg):
                r.detach(cg, names)
        r.close()


def _rm_pins(path: Path) -> None:
    for d, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(d, f))
        for sub in dirs:
            os.rmdir(os.path.join(d, sub))
    os.rmdir(path)
