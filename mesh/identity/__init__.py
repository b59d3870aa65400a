"""Workload identity, shared by both proxies: SPIFFE ids, SVIDs, the certificate manager and
the CA client (as istio/ztunnel keeps identity/{manager,caclient})."""
