"""Test doubles shared by several suites: real servers standing in for what a test machine
lacks (a Kubernetes API server, misbehaving backends)."""
