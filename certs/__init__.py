"""The mesh CA: root, SVID issuance from CSRs, the CA service (the client is mesh.identity)."""
