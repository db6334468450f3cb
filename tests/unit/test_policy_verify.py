"""Destination verification set per network and per route: a route's mode wins for the
traffic it matches; the network's covers the rest."""

from __future__ import annotations

import ipaddress

import pytest

from egressproxy.policy.decision import ConnectionFacts, Destination, Detected
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import load_policy_text
from egressproxy.settings import Settings

EXTERNAL = ipaddress.ip_address("198.51.100.7")

LINKERD = """
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: all-egress-traffic
  annotations:
    egressproxy.io/verify-destination: log
spec:
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: strict
  namespace: egress-test
  annotations:
    egressproxy.io/verify-destination: enforce
spec:
  hostnames: [httpbin.org]
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
  rules: [{}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: plain
  namespace: egress-test
spec:
  hostnames: [github.com]
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
  rules: [{}]
"""

NATIVE = """
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: deny
  rules:
  - name: checked
    hosts: [httpbin.org]
    verifyDestination: enforce
  - name: trusted
    hosts: [github.com]
"""


def compiled(text: str) -> PolicyIndex:
    return compile_policy(load_policy_text(text, "policy.yaml"), Settings())


def mode(index: PolicyIndex, sni: str) -> str | None:
    facts = ConnectionFacts(Destination(EXTERNAL, 443), Detected.TLS, sni)
    return index.decide_connection(facts).verify_destination


def test_a_route_annotation_overrides_its_network() -> None:
    index = compiled(LINKERD)
    assert mode(index, "httpbin.org") == "enforce"
    assert mode(index, "github.com") == "log"
    assert mode(index, "example.test") == "log"


def test_a_native_rule_sets_its_own_mode() -> None:
    index = compiled(NATIVE)
    assert mode(index, "httpbin.org") == "enforce"
    assert mode(index, "github.com") is None


def test_audit_belongs_to_a_network_not_a_route() -> None:
    broken = LINKERD.replace(
        "    egressproxy.io/verify-destination: enforce\n",
        '    egressproxy.io/audit: "true"\n',
    )
    with pytest.raises(PolicyError) as raised:
        compiled(broken)
    assert str(raised.value) == (
        "policy.yaml:18: TLSRoute egress-test/strict: annotation egressproxy.io/audit "
        "applies to an EgressNetwork, not a route"
    )


def test_a_bad_mode_on_a_rule_is_an_error_with_its_line() -> None:
    with pytest.raises(PolicyError) as raised:
        compiled(NATIVE.replace("verifyDestination: enforce", "verifyDestination: always"))
    assert "policy.yaml:" in str(raised.value) and "verifyDestination" in str(raised.value)
