"""`meshctl install --render --image REF`: every component runs the image the user built and
loaded; and the checked-in manifests name the tag `meshctl image build` gives its image, so
`kubectl apply -f deploy/ambientmesh.yaml` after loading it finds it on the node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshctl import image
from meshctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[3]


def _images(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            out.append(c["image"])
            args = c.get("args", [])
            if "--image" in args:  # the controller stamps it into the waypoints it makes
                out.append(args[args.index("--image") + 1])
    return out


def _render(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", "install", "--render", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip


def test_install_image_puts_the_ref_in_every_container_and_the_controller() -> None:
    ref = "localhost:5000/team/ambientmesh:0.1.0-0123456789ab"
    res = _render("--image", ref)
    assert res.returncode == 0, res.stderr
    found = _images(list(yaml.safe_load_all(res.stdout)))
    assert len(found) >= 5  # ztunnel, install-cni, ca, controller and its --image
    assert set(found) == {ref}


def test_the_checked_in_manifests_name_the_version_tag_image_build_produces() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "ambientmesh.yaml").read_text()))
    built = image.image_refs(image.source_info())
    assert set(_images(docs)) == {built[0]}


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("ghcr.io/ambientmesh/ambientmesh", "no tag"),
        ("ghcr.io/ambientmesh/ambientmesh@sha256:" + "0" * 64, "not a digest"),
        ("Upper/Case:1", "not a repository name"),
        ("ambientmesh:bad tag", "not a tag"),
        ("ambientmesh:", "not a tag"),
    ],
)
def test_a_bad_image_ref_is_refused_before_anything_renders(ref: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        image.parse_ref(ref)
    res = _render("--image", ref)
    assert res.returncode == 2 and why in res.stderr and res.stdout == ""


def test_a_registry_with_a_port_is_a_repository_not_a_tag() -> None:
    assert image.parse_ref("localhost:5000/ambientmesh:1.2") == (
        "localhost:5000/ambientmesh",
        "1.2",
    )
