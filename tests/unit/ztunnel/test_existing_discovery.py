"""Discovery of pre-existing pods, the parts that need no privileges: the kubelet's two cgroup
naming schemes, and reading a netns's local addresses from fib_trie."""

from __future__ import annotations

from pathlib import Path

from ztunnel.existing import find_pod_cgroup, local_ipv4

UID = "6f1c2b9e-0d3a-4c55-9a51-2f7e1c0b7d11"

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.7
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.7
        /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
"""


def test_cgroupfs_and_systemd_layouts(tmp_path: Path) -> None:
    cgroupfs = tmp_path / "a" / "kubepods" / "burstable" / f"pod{UID}"
    (cgroupfs / "0123abcd").mkdir(parents=True)
    (tmp_path / "a" / "kubepods" / "besteffort" / "podother").mkdir(parents=True)
    assert find_pod_cgroup(tmp_path / "a", UID) == cgroupfs
    systemd = (
        tmp_path / "b" / "kubepods.slice" / "kubepods-besteffort.slice"
        / f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
    )  # fmt: skip
    (systemd / "cri-containerd-0123.scope").mkdir(parents=True)
    assert find_pod_cgroup(tmp_path / "b", UID) == systemd
    # guaranteed pods sit directly under kubepods
    guaranteed = tmp_path / "c" / "kubepods" / f"pod{UID}"
    guaranteed.mkdir(parents=True)
    assert find_pod_cgroup(tmp_path / "c", UID) == guaranteed
    assert find_pod_cgroup(tmp_path / "a", "another-uid") is None
    assert find_pod_cgroup(tmp_path / "a", "") is None  # no uid: never "pod" alone
    assert find_pod_cgroup(tmp_path / "missing", UID) is None


def test_local_addresses_from_fib_trie(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "fib_trie").write_text(FIB_TRIE)
    assert local_ipv4(tmp_path) == {"10.244.1.7", "127.0.0.1"}
    assert local_ipv4(tmp_path / "nope") == set()
