"""Inbound plaintext (:15006): traffic to a local pod that did not come through the mesh.

NetworkPolicy and CiliumNetworkPolicy apply first (with the peer unauthenticated, so a CNP
rule requiring mTLS never admits it); then PeerAuthentication decides: STRICT refuses it
(reset, logged, counted with the DENY flag); PERMISSIVE applies L4 AuthorizationPolicy with no
principal (so a policy naming principals or namespaces cannot match it) and delivers it, from
inside the pod's netns when it is enrolled.
"""

from __future__ import annotations

import asyncio
import logging

from mesh.authz import AuthzRequest, authorize
from mesh.config.model import MtlsMode
from mesh.metrics import ConnectionLabels
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting
from ztunnel.proxy.node import DialRefused, LiveInbound, Redirected, splice

log = logging.getLogger("ztunnel.plaintext")

__all__ = ["InboundPlaintext"]


class InboundPlaintext(Redirected):
    role = "plaintext"

    async def handle(self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int) -> None:
        node = self.node
        snap = node.snapshot()
        pod = snap.pod_by_ip(dst_ip)
        local = pod is not None and (
            pod.key == self.pod_key if self.pod_key is not None else pod.node == node.name
        )
        if pod is None or not local:
            log.info("plaintext %s -> %s:%s: not a pod served here", src_ip, dst_ip, dst_port)
            ep.abort()
            return
        mode = snap.mtls_mode(pod, dst_port)
        # Not over mTLS: a CiliumNetworkPolicy rule with `authentication: required` never
        # admits it. Decided before the dial, like the HBONE path.
        netpol = node.ingress_denied(
            snap, src_ip, dst_ip, dst_port, authenticated=False, via_waypoint=False
        )
        decision = authorize(
            snap.policies_for(pod), AuthzRequest(None, None, src_ip, dst_port), l7=False
        )
        allowed = mode is not MtlsMode.STRICT and netpol is None and decision.allowed
        acct = Accounting(
            node.metrics,
            ConnectionLabels.build(
                reporter="destination",
                source=snap.pod_by_ip(src_ip),
                destination=pod,
                response_flags="-" if allowed else "DENY",
                trust_domain=snap.trust_domain,
            ),
            reporter="destination",
            src=src_ip,
            dst=f"{dst_ip}:{dst_port}",
            src_identity=None,
            dst_identity=snap.identity(pod),
            service=None,
            mtls=False,
            policy=netpol.policy if netpol is not None else decision.policy,
            flows=node.flows, source=snap.pod_by_ip(src_ip), destination=pod,
        )  # fmt: skip
        if not allowed:
            if mode is MtlsMode.STRICT:
                why = "PeerAuthentication STRICT"
            elif netpol is not None:
                why = f"{netpol.policy}: {netpol.reason}"
            else:
                why = decision.reason
            log.info("plaintext %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, why)
            ep.abort()
            acct.refused("deny", "DENY")
            return
        netns = self.netns if self.netns is not None else node.netns_of(pod.key)
        try:
            app = await node.connect_tcp(dst_ip, dst_port, netns)
        except DialRefused as exc:
            log.info("plaintext %s -> %s:%s: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            acct.refused("error", exc.flag)
            return
        except (OSError, TimeoutError) as exc:
            log.info("plaintext %s -> %s:%s: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            acct.refused("error", "UF")
            return
        except asyncio.CancelledError:
            ep.abort()
            acct.refused("error", "DC")
            raise
        live = LiveInbound(src_ip, dst_ip, dst_port, False, False, ep, app)
        with node.serving_inbound(live):
            await splice(ep, app, acct)
