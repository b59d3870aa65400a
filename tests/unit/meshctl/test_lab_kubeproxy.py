"""kube-proxy-style rules: one DNAT per endpoint, random choice with the right odds."""

from __future__ import annotations

import re

from meshctl.lab.kubeproxy import ServiceRule, nat_table


def test_equal_odds_across_endpoints_and_last_one_unconditional() -> None:
    eps = (("10.244.1.2", 8080), ("10.244.2.2", 8080), ("10.244.2.3", 9090))
    text = nat_table([ServiceRule("a/s:80", "10.96.0.10", 80, eps)], "10.244.1.0/24")
    probs = [float(x) for x in re.findall(r"--probability (\S+)", text)]
    dnats = re.findall(r"DNAT --to-destination (\S+)", text)
    assert dnats == ["10.244.1.2:8080", "10.244.2.2:8080", "10.244.2.3:9090"]
    # overall odds: each endpoint 1/3
    p1 = probs[0]
    p2 = (1 - probs[0]) * probs[1]
    p3 = (1 - probs[0]) * (1 - probs[1])
    assert abs(p1 - 1 / 3) < 1e-6 and abs(p2 - 1 / 3) < 1e-6 and abs(p3 - 1 / 3) < 1e-6
    assert "-d 10.96.0.10/32 -p tcp -m tcp --dport 80" in text
    assert text.startswith("*nat\n") and text.endswith("COMMIT\n")


def test_service_without_endpoints_gets_no_dnat_and_hairpin_is_scoped_to_node() -> None:
    text = nat_table([ServiceRule("a/s:80", "10.96.0.11", 80, ())], "10.244.3.0/24")
    assert "-j DNAT" not in text and "10.96.0.11" not in text
    assert "-s 10.244.3.0/24 -d 10.244.3.0/24 -m conntrack --ctstate DNAT" in text


def test_chain_names_fit_iptables_limit_and_differ_per_service() -> None:
    rules = [
        ServiceRule("a/s:80", "10.96.0.10", 80, (("10.244.1.2", 80),)),
        ServiceRule("a/s:81", "10.96.0.10", 81, (("10.244.1.2", 80),)),
    ]
    chains = re.findall(r"^:(\S+)", nat_table(rules, "10.244.1.0/24"), re.M)
    assert len(chains) == len(set(chains))
    assert all(len(c) <= 28 for c in chains)
