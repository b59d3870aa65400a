"""The mesh CA: root, SVID issuance from CSRs, the CA service, and the SVID manager."""
