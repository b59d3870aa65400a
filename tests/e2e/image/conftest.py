"""The image, built once per test session with `meshctl image build`: from the cached Debian
layer when an earlier run on this machine left one (seconds), else from scratch (mmdebstrap:
about two minutes on a fresh machine, which CI is). Needs mmdebstrap and an OCI runtime;
scripts/setup.sh installs them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from meshctl import image
from meshctl.lab import container as ctr

NEEDS = ("mmdebstrap", "runc")


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> image.BuildResult:
    missing = [t for t in NEEDS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh installs them)")
    out = tmp_path_factory.mktemp("image") / "ambientmesh.oci.tar"
    return image.build_image(out, log=lambda _m: None)


@pytest.fixture(scope="session")
def unpacked_image(
    built_image: image.BuildResult, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ctr.UnpackedImage]:
    d = tmp_path_factory.mktemp("unpacked")
    d.chmod(0o755)  # the unprivileged components must reach the rootfs
    yield ctr.unpack(built_image.archive, d)
    shutil.rmtree(d, ignore_errors=True)
