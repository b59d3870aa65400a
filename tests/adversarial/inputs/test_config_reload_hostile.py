"""Hostile config files reloaded while a real ztunnel serves (the plain "bad field" case is in
tests/integration/ztunnel/test_main.py): each is logged naming the object and field, the last
good snapshot keeps serving, live reload still applies the next good edit, and fds return to
their baseline. Before, a file nested past PyYAML's recursion or a `kind: List` containing
itself raised RecursionError, which no reload path caught."""

from __future__ import annotations

import os

import pytest

from tests.adversarial.inputs.inputkit import CONFIG, Ztunnel, eventually, ztunnel

HOSTILE = [
    ("deep", "[" * 5000, "nests too deeply"),
    ("list-loop", "&a {kind: List, items: [*a]}\n", "List: items Lists nest deeper"),
    ("not-utf8", "\udcff", "can't decode"),
    ("binary", "\x00\x01\x02", "special characters are not allowed"),
    ("tab-indent", "kind: Pod\n\tmetadata: x\n", "found character '\\t'"),
    ("scalar", "just a string\n", "document 0: must be a mapping"),
    ("bad-port", CONFIG + "---\nkind: Service\napiVersion: v1\nmetadata: {name: s, namespace: "
     "shop}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 1e999}]}\n",
     "Service shop/s: spec.ports[0].port"),
    ("dup-ip", CONFIG.replace("10.244.1.6", "10.244.1.5"), "status.podIP"),
]  # fmt: skip


@pytest.fixture(scope="module")
def zt(tmp_path_factory: pytest.TempPathFactory) -> object:
    with ztunnel(tmp_path_factory.mktemp("reload")) as z:
        yield z


def write(z: Ztunnel, text: str) -> None:
    tmp = z.config.with_suffix(".tmp")
    tmp.write_bytes(text.encode("utf-8", "surrogateescape"))
    os.replace(tmp, z.config)


@pytest.mark.parametrize(("text", "logged"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_file_keeps_last_good_and_reload_alive(zt: Ztunnel, text: str, logged: str) -> None:
    good = zt.dump()
    base = zt.fds()
    mark = len(zt.log_text())
    write(zt, text)
    assert eventually(lambda: "config rejected" in zt.log_text()[mark:]), zt.log_text()[mark:]
    new_log = zt.log_text()[mark:]
    assert logged in new_log, new_log
    assert "Traceback" not in new_log
    assert zt.proc.poll() is None
    assert zt.dump()["version"] == good["version"]
    zt.good()  # the enrolment API still answers
    # The next good edit applies: live reload survived.
    marker = f"10.244.1.{10 + good['version'] % 200}"
    write(zt, CONFIG.replace("10.244.1.6", marker))
    assert eventually(lambda: marker in str(zt.dump()))
    assert eventually(lambda: zt.fds() <= base), (zt.fds(), base)
