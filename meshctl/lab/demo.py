"""`meshctl lab demo`: the mesh in one command, judged by its own telemetry.

Brings up deploy/examples/demo.yaml, runs the in-pod client for each flow, and reports per
flow what happened (the client's own view: answered or refused) and how (ztunnel's metrics and
access log: mutual TLS or not, denied by policy). Exit status 0 only when every flow matched
its expectation, so the demo doubles as a smoke test. The lab goes away on success, failure,
Ctrl-C and SIGTERM alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshctl.lab import observe
from meshctl.lab.lab import Lab
from meshctl.lab.system import LabError, patience


@dataclass(frozen=True, slots=True)
class Flow:
    source: str  # namespace/pod
    service: str  # namespace/name
    port: int
    allowed: bool
    mtls: bool
    why: str


FLOWS = (
    Flow("shop/web", "shop/server", 80, True, True, "ambient to ambient, across nodes"),
    Flow("shop/batch", "shop/server", 80, False, True, "DENY policy no-batch-to-server"),
    Flow("legacy/curl", "shop/server", 80, True, False, "from outside the mesh (PERMISSIVE)"),
)


@dataclass(slots=True)
class Outcome:
    flow: Flow
    answered: int
    attempts: int
    mtls_conns: float
    access: list[dict[str, Any]]
    client_output: str

    @property
    def allowed(self) -> bool:
        return self.answered == self.attempts

    @property
    def denied(self) -> bool:
        return self.answered == 0

    @property
    def mtls(self) -> bool:
        return self.mtls_conns > 0 or any(r.get("mtls") for r in self.access)

    @property
    def as_expected(self) -> bool:
        verdict_ok = self.allowed if self.flow.allowed else self.denied
        return verdict_ok and self.mtls == self.flow.mtls


def wait_for_app(lab: Lab, pod: str, timeout: float = 15.0) -> None:
    """The server's log says when it listens; flows before that would prove nothing."""
    rec = next((r for r in lab.state.procs if r.kind == "pod" and r.name == pod), None)
    deadline = time.monotonic() + patience(timeout)
    while rec is not None and time.monotonic() < deadline:
        try:
            if "listening" in Path(rec.log).read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise LabError(f"pod {pod} did not start listening within {timeout:.0f}s")


def drive(lab: Lab, flow: Flow, *, count: int = 3) -> Outcome:
    snap = lab.snapshot()
    ns, name = flow.service.split("/", 1)
    svc = snap.service(ns, name)
    if svc is None or not svc.cluster_ip:
        raise LabError(f"service {flow.service} is not in the lab")
    src_ns, src_pod = flow.source.split("/", 1)
    src = snap.pod(src_ns, src_pod)
    if src is None or src.ip is None:
        raise LabError(f"pod {flow.source} is not in the lab")
    nodes = list(lab.state.nodes)
    metrics_before = {n: _mtls(lab, n, src.service_account, src_ns) for n in nodes}
    logs_before = {n: len(lab.ztunnel_access_log(n)) for n in nodes}
    res = lab.exec_in_pod(
        src_ns,
        src_pod,
        ["python", "-m", "mesh.apps.client", f"http://{svc.cluster_ip}:{flow.port}/demo",
         "--count", str(count), "--timeout", str(patience(3)), "--new-connection"],
    )  # fmt: skip
    answered = 0
    for line in res.stdout.splitlines():
        try:
            answered += bool(json.loads(line).get("ok"))
        except ValueError:
            continue
    time.sleep(0.3)  # access-log lines are written when connections close
    mtls = sum(_mtls(lab, n, src.service_account, src_ns) - metrics_before[n] for n in nodes)
    access: list[dict[str, Any]] = []
    for n in nodes:
        access += [dict(r) for r in observe.records_from(
            lab.ztunnel_access_log(n)[logs_before[n]:], src.ip)]  # fmt: skip
    return Outcome(flow, answered, count, mtls, access, res.stdout + res.stderr)


def _mtls(lab: Lab, node: str, sa: str, ns: str) -> float:
    try:
        samples = observe.parse_metrics(lab.ztunnel_metrics(node))
    except (OSError, LabError):
        return 0.0
    return observe.connections(
        samples, source_principal_suffix=f"/ns/{ns}/sa/{sa}", security="mutual_tls"
    )


def summarize(records: list[dict[str, Any]]) -> list[str]:
    """One line per (reporter, verdict, mtls, peer identity, policy) from the access log."""
    groups: dict[tuple[str, str, bool, str, str], int] = {}
    for r in records:
        k = (
            str(r.get("reporter")),
            str(r.get("verdict")),
            bool(r.get("mtls")),
            str(r.get("src.identity") or "-"),
            str(r.get("policy") or "-"),
        )
        groups[k] = groups.get(k, 0) + 1
    return [
        f"ztunnel access log ({rep}): {n}x {verdict}, {'mTLS' if mtls else 'plaintext'}, "
        f"source identity {ident}" + (f", policy {pol}" if pol != "-" else "")
        for (rep, verdict, mtls, ident, pol), n in sorted(groups.items())
    ]


def report(outcomes: list[Outcome]) -> str:
    rows = [("SOURCE", "DESTINATION", "VERDICT", "MTLS", "EXPECTED", "WHY")]
    for o in outcomes:
        verdict = "allowed" if o.allowed else "denied" if o.denied else "partial"
        rows.append(
            (
                o.flow.source,
                f"{o.flow.service}:{o.flow.port}",
                verdict,
                "mutual_tls" if o.mtls else "plaintext",
                "yes" if o.as_expected else "NO",
                o.flow.why,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


FAIL_CLOSED = Flow(
    "shop/web", "shop/server", 80, False, False, "node's ztunnel down: fails closed, no bypass"
)


def fail_closed(lab: Lab) -> bool:
    """Stop the source pod's node's ztunnel, drive a flow, bring ztunnel back: the flow must
    fail (never bypass the mesh in plaintext). With the BPF capture the kernel refuses the
    connect itself and records it; the new ztunnel reads that record and shows it as a
    DROPPED flow (`ztunnel unavailable`). True when the flow failed closed."""
    node = str(lab.state.pods[FAIL_CLOSED.source]["node"])
    print(f"\nfail closed: stopping {node}'s ztunnel, then {FAIL_CLOSED.source} calls again")
    lab.stop_ztunnel(node)
    try:
        o = drive(lab, FAIL_CLOSED, count=2)
    finally:
        lab.restart_ztunnel(node)
    ok = o.denied and not o.mtls
    first = (o.client_output.strip().splitlines() or [""])[0][:200]
    print(f"  {FAIL_CLOSED.source} -> {FAIL_CLOSED.service}:{FAIL_CLOSED.port}: "
          f"{'refused' if o.denied else 'ANSWERED'} while ztunnel was down ({first})")  # fmt: skip
    if lab.capture != "enrol":
        print("  (netfilter capture: no connect() hook in the pod records the refusal)")
        return ok
    argv = ["--from-pod", FAIL_CLOSED.source, "--verdict", "DROPPED", "--last", "2"]
    deadline = time.monotonic() + patience(15)
    while True:  # the new ztunnel drains the kernel's record within a second or two
        shown = show_lab_flows_quietly(lab, argv)
        if shown or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    from meshctl.observe.cli import show_lab_flows

    show_lab_flows(lab.paths.lab, lab.paths.state_root, argv)
    if not any(f.reason == "ztunnel unavailable" for f in shown):
        print("  the kernel's record of the refusal did not come back as a DROPPED flow")
        return False
    return ok


def show_lab_flows_quietly(lab: Lab, argv: list[str]) -> list[Any]:
    from meshctl.observe.cli import show_lab_flows

    return show_lab_flows(lab.paths.lab, lab.paths.state_root, argv, out=lambda _m: None)


def show_flows(lab: Lab) -> None:
    """End with the flows the demo drove, as `meshctl observe` shows them, denial included."""
    from meshctl.observe.cli import show_lab_flows

    ns = sorted({f.source.split("/")[0] for f in FLOWS} | {f.service.split("/")[0] for f in FLOWS})
    print("\nflows the demo drove, from every ztunnel's flow ring:")
    argv = [a for n in ns for a in ("--namespace", n)] + ["--last", "24"]
    shown = show_lab_flows(lab.paths.lab, lab.paths.state_root, argv)
    if not any(f.verdict == "DENIED" for f in shown):
        show_lab_flows(lab.paths.lab, lab.paths.state_root, ["--verdict", "DENIED", "--last", "4"])


def run_demo(lab: Lab, manifest: Path, *, keep: bool = False) -> int:
    outcomes: list[Outcome] = []
    try:
        if lab.exists():
            print(f"removing what a previous run of lab {lab.paths.lab} left")
            lab.down(quiet=True)
        lab.up(manifest)
        wait_for_app(lab, "shop/server")
        print("\ndriving traffic (3 requests per flow, from inside the source pod)")
        for flow in FLOWS:
            o = drive(lab, flow)
            outcomes.append(o)
            verdict = "allowed" if o.allowed else "denied" if o.denied else "partial"
            print(f"  {flow.source} -> {flow.service}:{flow.port}: {verdict}, "
                  f"{'mutual TLS' if o.mtls else 'plaintext'}")  # fmt: skip
            for line in summarize(o.access):
                print(f"    {line}")
        print()
        print(report(outcomes))
        print()
        for node in lab.state.nodes:
            try:
                print(observe.ktls_line(node, observe.parse_metrics(lab.ztunnel_metrics(node))))
            except (OSError, LabError) as exc:
                print(f"kTLS on {node}: unknown ({exc})")
        denied = [o for o in outcomes if not o.flow.allowed]
        for o in denied:
            print(f"\ndenied flow {o.flow.source} -> {o.flow.service}: the client saw")
            for line in o.client_output.splitlines()[:3]:
                print(f"    {line}")
        bad = [o for o in outcomes if not o.as_expected]
        from meshctl.lab.waypoint_demo import run_all as run_waypoint_splits

        if not run_waypoint_splits(lab):  # HTTPRoute splits through waypoints, if any
            print("\na weighted split through a waypoint did not match its weights")
            return 1
        if not fail_closed(lab):
            print("\nwith its node's ztunnel down, a pod's call did not fail closed as expected")
            return 1
        show_flows(lab)
        if bad:
            print(f"\n{len(bad)} flow(s) did not behave as expected:")
            for o in bad:
                first = (o.client_output.strip().splitlines() or [""])[0][:300]
                print(f"  {o.flow.source} -> {o.flow.service}: {first}")
            return 1
        print("\nall flows as expected")
        return 0
    except LabError as exc:
        print(f"meshctl lab demo: {exc}")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if keep and lab.exists():
            print(
                f"\nlab {lab.paths.lab} left up (--keep); meshctl lab down --name {lab.paths.lab}"
            )
        else:
            print(f"\ntearing down lab {lab.paths.lab}")
            lab.down(quiet=True)
