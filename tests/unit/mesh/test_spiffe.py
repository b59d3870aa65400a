import pytest

from mesh.identity.spiffe import SpiffeId, node_id, workload_id


def test_workload_roundtrip() -> None:
    s = SpiffeId.parse(workload_id("cluster.local", "default", "web"))
    assert s.is_workload and s.namespace == "default" and s.service_account == "web"
    assert not SpiffeId.parse(node_id("cluster.local", "n1")).is_workload


@pytest.mark.parametrize(
    "uri",
    [
        "http://a/b",
        "spiffe://a",
        "spiffe://a/",
        "spiffe://A:1/x",
        "spiffe://u@a/x",
        "spiffe://a/x?q",
        "spiffe://a/x#f",
        "spiffe://a//x",
        "spiffe://a/./x",
        "spiffe://a/../x",
    ],
)
def test_rejects(uri: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(uri)
