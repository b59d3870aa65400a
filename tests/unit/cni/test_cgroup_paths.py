"""Finding a pod's cgroup from a container's path, as the kubelet's runtimes lay them out,
and by UID in a cgroup tree when a private cgroup namespace hides the real path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni.plugin import pod_level
from ztunnel.inpod.discover import find_pod_cgroup

UID = "0badc0de-1234-4000-8000-000000001234"


@pytest.mark.parametrize(
    ("container", "pod"),
    [
        (f"/sys/fs/cgroup/kubepods/besteffort/pod{UID}/0123abcd",
         f"/sys/fs/cgroup/kubepods/besteffort/pod{UID}"),
        ("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
         + UID.replace("-", "_") + ".slice/cri-containerd-0123.scope",
         "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
         + UID.replace("-", "_") + ".slice"),
        ("/sys/fs/cgroup/unified/lab/pods/shop/web", "/sys/fs/cgroup/unified/lab/pods/shop/web"),
    ],
)  # fmt: skip
def test_container_path_cut_back_to_the_pod(container: str, pod: str) -> None:
    assert pod_level(container) == pod


def test_pod_cgroup_found_by_uid_in_either_driver_layout(tmp_path: Path) -> None:
    fs = tmp_path / "kubepods" / "burstable" / f"pod{UID}" / "ctr"
    fs.mkdir(parents=True)
    assert find_pod_cgroup(UID, str(tmp_path)) == str(fs.parent)
    sd = tmp_path / "sd" / "kubepods.slice" / f"kubepods-pod{UID.replace('-', '_')}.slice"
    sd.mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    assert find_pod_cgroup(UID, str(tmp_path / "sd")) == str(sd)
    assert find_pod_cgroup(UID, str(other)) is None
    assert find_pod_cgroup("", str(tmp_path)) is None
