"""Shared floor of ztunnel and waypoint: config snapshot, HBONE, TLS, identity, telemetry, ports.

It imports nothing of ours above it (tests/unit/test_layout.py)."""
