"""`meshctl lab`: a cluster on one machine, made of real network namespaces and cgroups.

Nodes are network namespaces joined by an underlay bridge; pods are network namespaces plus
cgroups, wired by the CNI reference plugins exactly as a container runtime would wire them;
each node runs its own ztunnel. Everything the lab creates is recorded in a state file as it is
created, so `lab down` can remove it even after a crash.
"""
