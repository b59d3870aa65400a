"""Fixtures for lab end-to-end tests: a uniquely named lab whose roots (state, cgroups, BPF
pins) live in per-test directories, torn down and checked empty whatever the test did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.lab.lab import Lab
from tests.e2e.lab.labkit import MANIFEST, LabFactory, leftovers, remove_roots, seen, unique_paths


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[LabFactory]:
    made: list[Lab] = []

    def make(*, mesh: bool, capture: str = "auto", manifest: str = MANIFEST) -> Lab:
        paths = unique_paths()
        f = tmp_path / f"{paths.lab}.yaml"
        f.write_text(manifest)
        lab = Lab(paths, mesh=mesh, capture=capture, out=lambda _m: None)
        made.append(lab)
        lab.up(f)
        return lab

    yield make
    for lab in made:
        was = seen(lab)
        problems = lab.down(quiet=True)
        left = leftovers(lab.paths, [], was)
        remove_roots(lab.paths)
        assert not problems, problems
        assert not left, f"lab down left: {left}"
