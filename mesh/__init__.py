"""Shared code of ztunnel and waypoint: config snapshot, HBONE, TLS, metrics."""
