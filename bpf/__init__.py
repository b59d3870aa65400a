"""eBPF programs that steer enrolled pods' TCP connections into ztunnel, and their loader."""
