"""Finding the filesystems the redirect needs from mountinfo, as the kernel writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpf import doctor, mounts

HYBRID = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /sys rw,nosuid shared:2 - sysfs sys rw
24 23 0:22 / /sys/fs/cgroup rw shared:3 - tmpfs tmpfs rw,mode=755
25 24 0:23 / /sys/fs/cgroup/unified rw shared:4 - cgroup2 cgroup2 rw
26 24 0:24 / /sys/fs/cgroup/cpu rw shared:5 - cgroup cgroup rw,cpu
27 22 0:25 / /mnt/with\\040space rw shared:6 - tmpfs tmpfs rw
"""


def _table(tmp_path: Path, text: str) -> list[mounts.Mount]:
    f = tmp_path / "mountinfo"
    f.write_text(text)
    return mounts.mounts(str(f))


def test_path_lives_on_the_deepest_mount_above_it(tmp_path: Path) -> None:
    t = _table(tmp_path, HYBRID)
    # /sys/fs/bpf is a plain sysfs directory until bpffs is mounted on it
    assert mounts.covering("/sys/fs/bpf/ambientmesh/lab", t) == mounts.Mount("/sys", "sysfs")
    assert mounts.covering("/sys/fs/cgroup/unified/x", t) == mounts.Mount(
        "/sys/fs/cgroup/unified", "cgroup2"
    )
    # a sibling whose name merely starts with a mount point's is not under it
    assert mounts.covering("/sys/fs/cgroup/unifiedx", t) == mounts.Mount("/sys/fs/cgroup", "tmpfs")
    assert mounts.covering("/mnt/with space/a", t) == mounts.Mount("/mnt/with space", "tmpfs")


def test_a_later_mount_on_the_same_point_hides_the_earlier(tmp_path: Path) -> None:
    t = _table(tmp_path, HYBRID + "30 23 0:40 / /sys/fs/bpf rw - bpf bpf rw\n"
                                  "31 23 0:41 / /sys/fs/bpf rw - tmpfs tmpfs rw\n")  # fmt: skip
    assert mounts.covering("/sys/fs/bpf/x", t) == mounts.Mount("/sys/fs/bpf", "tmpfs")


@pytest.mark.parametrize(
    ("extra", "want"),
    [("", "/sys/fs/cgroup/unified"),
     ("40 23 0:50 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "/sys/fs/cgroup")],
)  # fmt: skip
def test_cgroup2_root_follows_the_host_layout(tmp_path: Path, extra: str, want: str) -> None:
    assert mounts.cgroup2_root(_table(tmp_path, HYBRID + extra)) == want


def test_no_cgroup2_is_none(tmp_path: Path) -> None:
    text = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line) + "\n"
    assert mounts.cgroup2_root(_table(tmp_path, text)) is None


def test_garbage_lines_in_mountinfo_are_skipped(tmp_path: Path) -> None:
    t = _table(tmp_path, "nonsense\n1 2 3\n" + HYBRID)
    assert mounts.Mount("/sys", "sysfs") in t


def _headers(src: Path, version: str) -> Path:
    hdr = src / f"linux-headers-{version}-amd64"
    hdr.mkdir(parents=True)
    (hdr / "Makefile").write_text("")
    (src / f"linux-headers-{version}-common").mkdir()
    return hdr


@pytest.mark.skipif(mounts.os.uname().machine != "x86_64", reason="Debian amd64 header names")
def test_link_headers_picks_the_newest_and_replaces_a_dangling_link(tmp_path: Path) -> None:
    src, mods = tmp_path / "src", tmp_path / "modules"
    _headers(src, "6.1.0-9")
    newest = _headers(src, "6.1.0-57")  # 57 > 9 numerically, not as text
    (mods / "6.9.9-cloud").mkdir(parents=True)
    (mods / "6.9.9-cloud" / "build").symlink_to(tmp_path / "gone")  # an older package's
    done = doctor.link_headers("6.9.9-cloud", str(mods), str(src))
    assert done and str(newest) in done[0]
    assert (mods / "6.9.9-cloud" / "build").resolve() == newest
    assert (mods / "6.9.9-cloud" / "source").resolve() == src / "linux-headers-6.1.0-57-common"
    assert doctor.link_headers("6.9.9-cloud", str(mods), str(src)) == []  # now nothing to do


def test_link_headers_without_headers_does_nothing(tmp_path: Path) -> None:
    assert doctor.link_headers("6.9.9-cloud", str(tmp_path / "m"), str(tmp_path / "s")) == []
    assert not (tmp_path / "m").exists()
