"""The per-node ambient proxy."""
