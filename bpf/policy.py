"""Egress NetworkPolicy / CiliumNetworkPolicy compiled for the connect4 program's maps.

Why compile through `mesh.netpolicy.decide` instead of translating rules one by one: the kernel
and ztunnel must never disagree about what a policy means (except blocks, `world`, selectors,
`authentication: required`, L7 rules that admit at L4). So for each enrolled pod that a policy
isolates for egress, every address prefix that can matter is listed (the rules' CIDRs and
excepts, and the /32 of every pod, node and Service VIP, which selectors and `world` speak
about) and the verdict for each is asked of `decide()` at one representative address that no
more specific listed prefix covers. The LPM trie then answers for any address exactly as
`decide()` would. Entries that equal their nearest kept ancestor are left out.

Ports: `decide()` only compares a rule's port numbers for equality, so one table per port that
the pod's egress rules name, plus table 0 for every other port (decided at one unnamed port).
The program looks up the port's table and falls back to table 0.

Service VIPs (the app connects to a ClusterIP; NetworkPolicy speaks about pod IPs): like
Cilium's socket-LB, which translates the VIP to a backend at connect() and applies policy to
that backend, the VIP is never matched by CIDRs or `world`; VIP:port is allowed when the policy
allows at least one of the service's ready endpoints on its target port. ztunnel then picks the
endpoint (re-checked there: `ztunnel.inpod.policy`). Such VIPs go in their own tables.

Updates are atomic: everything is written under a new generation, then the generation switch
is one map write (see redirect.bpf.c); the previous generation is deleted on the next update.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bpf import syscall
from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot, selector_matches
from mesh.netpolicy import Direction, decide

_POD_KEY = struct.Struct("<IIQ")  # struct pol_pod_key
_POD_VAL = struct.Struct("<II")  # struct pol_pod_val
_CIDR_KEY = struct.Struct("<IIQI4s")  # struct pol_cidr_key
_VIPS_KEY = struct.Struct("<I4s")  # struct vip_key
_VIP_KEY = struct.Struct("<I4sQII")  # struct pol_vip_key
_U32 = struct.Struct("<I")
_CIDR_FIXED_BITS = 128  # gen, netns and port precede the address in the trie key

Net = ipaddress.IPv4Network


class PolicyMapError(OSError):
    """The maps could not take the new policy (full, or gone): the previous one stays active."""


def policy_id(name: str) -> int:
    """A policy's id in the maps and events: a hash of "Kind ns/name", never 0. Stable across
    ztunnel restarts, so a drop recorded while ztunnel was down still names its policy."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") or 1


def isolating_policy(snap: Snapshot, pod: Pod) -> str | None:
    """The policy `decide()` names when it denies this pod's egress; None if none isolates it."""
    for np in snap.network_policies:
        if (
            np.namespace == pod.namespace
            and "Egress" in np.policy_types
            and selector_matches(np.pod_selector, pod.labels)
        ):
            return f"NetworkPolicy {np.key}"
    for cnp in snap.cilium_policies:
        if (
            cnp.egress is not None
            and cnp.namespace == pod.namespace
            and selector_matches(cnp.endpoint_selector, pod.labels)
        ):
            return f"CiliumNetworkPolicy {cnp.key}"
    return None


@dataclass(frozen=True, slots=True)
class PodEgress:
    """One isolated pod's compiled egress: values are the allowing policy's id, 0 = denied."""

    deny_policy: str
    cidrs: Mapping[tuple[int, Net], int] = field(default_factory=dict)  # (port|0, prefix)
    vips: Mapping[tuple[str, int], int] = field(default_factory=dict)  # (vip, port)


def _v4(text: str | None) -> Net | None:
    if not text:
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net if isinstance(net, Net) else None


def _rule_ports_and_cidrs(snap: Snapshot, pod: Pod) -> tuple[set[int], set[Net]]:
    ports: set[int] = set()
    nets: set[Net] = set()
    for np in snap.network_policies:
        if np.namespace != pod.namespace or "Egress" not in np.policy_types:
            continue
        if not selector_matches(np.pod_selector, pod.labels):
            continue
        for rule in np.egress:
            ports.update(p.port for p in rule.ports if p.port is not None)
            for peer in rule.peers:
                for c in (peer.ip_block, *peer.ip_block_except):
                    if (n := _v4(c)) is not None:
                        nets.add(n)
    for cnp in snap.cilium_policies:
        if cnp.egress is None or cnp.namespace != pod.namespace:
            continue
        if not selector_matches(cnp.endpoint_selector, pod.labels):
            continue
        for crule in cnp.egress:
            for pr in crule.to_ports:
                ports.update(pr.ports)
            nets.update(n for c in crule.cidrs if (n := _v4(c)) is not None)
    return ports, nets


def _representative(net: Net, starts: list[int], spans: list[tuple[int, int]]) -> str | None:
    """An address of `net` outside every listed prefix more specific than it, or None when
    they cover it all (`starts`/`spans`: the listed prefixes' ranges, sorted by start)."""
    lo, hi = int(net.network_address), int(net.broadcast_address)
    cand = lo
    i = bisect.bisect_left(starts, lo)
    while i < len(spans) and cand <= hi:
        s, e = spans[i]
        i += 1
        if s > hi:
            break
        if e > hi or (s, e) == (lo, hi):
            continue  # not inside `net`
        if s > cand:
            break  # a gap at cand
        cand = max(cand, e + 1)
    return str(ipaddress.IPv4Address(cand)) if cand <= hi else None


def compile_egress(snap: Snapshot, pod: Pod) -> PodEgress | None:
    """The pod's egress tables, or None when no policy isolates it (then the program only
    redirects). Pure: the snapshot in, the tables out."""
    deny = isolating_policy(snap, pod)
    if deny is None:
        return None
    rule_ports, nets = _rule_ports_and_cidrs(snap, pod)
    nets.add(Net("0.0.0.0/0"))
    for p in snap.pods:
        if (n := _v4(p.ip)) is not None:
            nets.add(n)
    for node in snap.nodes:
        if (n := _v4(node.address)) is not None:
            nets.add(n)
    for svc in snap.services:
        if (n := _v4(svc.cluster_ip)) is not None:
            nets.add(n)
    order = sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen))
    spans = [(int(n.network_address), int(n.broadcast_address)) for n in order]
    starts = [s for s, _ in spans]
    other_port = next(p for p in range(1, 65536) if p not in rule_ports)
    meshed = snap.is_ambient(pod)

    def verdict(ip: str, port: int) -> int:
        dst = snap.pod_by_ip(ip)
        auth = meshed and dst is not None and snap.is_ambient(dst)  # it will go over HBONE
        d = decide(snap, pod, ip, port, Direction.EGRESS, authenticated=auth)
        return policy_id(d.policy or "") if d.allowed else 0

    cidrs: dict[tuple[int, Net], int] = {}
    for key_port, port in [(0, other_port), *((p, p) for p in sorted(rule_ports))]:
        kept: dict[Net, int] = {}
        for net in sorted(nets, key=lambda n: n.prefixlen):
            rep = _representative(net, starts, spans)
            if rep is None:
                continue
            v = verdict(rep, port)
            parent = next(
                (kept[s] for k in range(net.prefixlen - 1, -1, -1)
                 if (s := net.supernet(new_prefix=k)) in kept),
                None,
            )  # fmt: skip
            if v != parent:
                kept[net] = v
        cidrs.update(((key_port, n), v) for n, v in kept.items())
    vips: dict[tuple[str, int], int] = {}
    for svc in snap.services:
        if _v4(svc.cluster_ip) is None:
            continue
        assert svc.cluster_ip is not None
        for sp in svc.ports:
            if sp.protocol.upper() != "TCP":
                continue
            allow = 0
            for ep in snap.endpoints(svc, sp.port):
                if ep.pod.ip and (allow := verdict(ep.pod.ip, ep.port)):
                    break
            vips[(svc.cluster_ip, sp.port)] = allow
    return PodEgress(deny, cidrs, vips)


class PolicyMaps:
    """Writes compiled policies into the maps pinned under `pin_root` (ztunnel's side)."""

    NAMES = ("pol_gen", "pol_pod", "pol_cidr", "pol_vips", "pol_vip")

    def __init__(self, pin_root: str) -> None:
        self.fds: dict[str, int] = {}
        try:
            for n in self.NAMES:
                self.fds[n] = syscall.obj_get(os.path.join(pin_root, n))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def generation(self) -> int:
        raw = syscall.map_lookup(self.fds["pol_gen"], _U32.pack(0), 4)
        return _U32.unpack(raw)[0] if raw else 0

    def _entries(
        self, gen: int, pods: Mapping[int, PodEgress], vips: Iterable[str]
    ) -> Iterable[tuple[str, bytes, bytes]]:
        for v in vips:
            yield "pol_vips", _VIPS_KEY.pack(gen, ipaddress.IPv4Address(v).packed), _U32.pack(1)
        for netns, eg in pods.items():
            yield (
                "pol_pod",
                _POD_KEY.pack(gen, 0, netns),
                _POD_VAL.pack(policy_id(eg.deny_policy), 0),
            )
            for (port, net), allow in eg.cidrs.items():
                key = _CIDR_KEY.pack(
                    _CIDR_FIXED_BITS + net.prefixlen, gen, netns, port, net.network_address.packed
                )
                yield "pol_cidr", key, _U32.pack(allow)
            for (vip, port), allow in eg.vips.items():
                key = _VIP_KEY.pack(gen, ipaddress.IPv4Address(vip).packed, netns, port, 0)
                yield "pol_vip", key, _U32.pack(allow)

    def apply(self, pods: Mapping[int, PodEgress], vips: Iterable[str]) -> int:
        """Install the policy of every isolated pod (by netns cookie) as one step; returns the
        new generation. On failure the maps keep answering with the previous generation."""
        old = self.generation()
        gen = (old + 1) & 0xFFFFFFFF or 1
        try:
            for name, key, value in self._entries(gen, pods, sorted(set(vips))):
                syscall.map_update(self.fds[name], key, value)
        except OSError as exc:
            self._delete_except({old})
            raise PolicyMapError(exc.errno, f"policy maps refused generation {gen}: {exc}") from exc
        syscall.map_update(self.fds["pol_gen"], _U32.pack(0), _U32.pack(gen))
        self._delete_except({gen, old})
        return gen

    def _delete_except(self, keep: set[int]) -> None:
        """Delete every entry of a generation not in `keep` (a connect that read the previous
        generation an instant ago may still be looking it up: that one is kept)."""
        for name, size, off in (
            ("pol_pod", _POD_KEY.size, 0),
            ("pol_cidr", _CIDR_KEY.size, 4),
            ("pol_vips", _VIPS_KEY.size, 0),
            ("pol_vip", _VIP_KEY.size, 0),
        ):
            fd = self.fds[name]
            for key in syscall.map_keys(fd, size):
                if _U32.unpack_from(key, off)[0] not in keep:
                    syscall.map_delete(fd, key)
