"""The namespace-scoped L7 proxy."""
