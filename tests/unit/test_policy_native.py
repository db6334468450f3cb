"""The native EgressPolicy dialect: hosts, wildcards, CIDRs, ports, HTTP, gRPC, actions."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressproxy.policy.decision import (
    Action,
    Backend,
    ConnectionFacts,
    Decision,
    Destination,
    Detected,
    ParentRef,
    RequestFacts,
    RouteProtocol,
    RouteRef,
)
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import load_policy, load_policy_text
from egressproxy.policy.model import GrpcMatch, MatchKind, Model, Rule, ValueMatch
from egressproxy.settings import Settings
from tests.unit.test_policy_linkerd import DENY_NET, grpc_route, http_route

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
EXTERNAL = ipaddress.ip_address("198.51.100.7")


def index_of(name: str) -> PolicyIndex:
    return compile_policy(load_policy(EXAMPLES / name), Settings())


def tls(index: PolicyIndex, sni: str, port: int = 443, address: str = "198.51.100.7") -> Decision:
    destination = Destination(ipaddress.ip_address(address), port)
    return index.decide_connection(ConnectionFacts(destination, Detected.TLS, sni))


def tcp(index: PolicyIndex, address: str, port: int) -> Decision:
    destination = Destination(ipaddress.ip_address(address), port)
    return index.decide_connection(ConnectionFacts(destination, Detected.OPAQUE, None))


def http(
    index: PolicyIndex,
    host: str,
    path: str,
    method: str = "GET",
    port: int = 80,
    headers: tuple[tuple[str, str], ...] = (),
    query: str = "",
    grpc: bool = False,
) -> Decision:
    facts = RequestFacts(Destination(EXTERNAL, port), host, method, path, query, headers, grpc)
    return index.decide_request(facts)


def rule(name: str, policy: str = "standalone") -> RouteRef:
    return RouteRef("egressproxy.io", "EgressRule", "", f"{policy}.{name}")


def test_allowlist() -> None:
    index = index_of("native-1-allowlist.yaml")
    github = tls(index, "api.github.com")
    assert (github.action, github.protocol, github.route) == (
        Action.PASS,
        RouteProtocol.TLS,
        rule("github"),
    )
    assert github.parent == ParentRef("egressproxy.io", "EgressPolicy", "", "standalone", "443")
    assert tls(index, "github.com").action == Action.PASS
    assert tls(index, "github.com", port=8443).action == Action.DENY
    denied = tls(index, "gitlab.com")
    assert (denied.action, denied.route) == (
        Action.DENY,
        RouteRef("", "default", "", "tls-egress-deny"),
    )
    assert http(index, "httpbin.org", "/get").route == rule("httpbin-get")
    assert http(index, "httpbin.org", "/get", method="POST").action == Action.DENY
    assert http(index, "httpbin.org", "/ip").action == Action.DENY
    assert http(index, "deb.debian.org", "/debian/", port=80).route == rule("package-mirror")
    assert tls(index, "security.debian.org", port=443).route == rule("package-mirror")
    assert tcp(index, "203.0.113.9", 5432).route == rule("database")
    assert tcp(index, "192.0.2.9", 5432).action == Action.DENY
    assert index.port_protocol(Destination(EXTERNAL, 443)) is None


def test_grpc_rule() -> None:
    index = index_of("native-1-allowlist.yaml")

    def call(path: str) -> Decision:
        facts = RequestFacts(
            Destination(EXTERNAL, 50051),
            "grpc.example.com",
            "POST",
            path,
            "",
            (("content-type", "application/grpc"),),
            grpc=True,
        )
        return index.decide_request(facts)

    assert call("/helloworld.Greeter/SayHello").route == rule("greeter")
    assert call("/helloworld.Greeter/Other").route == RouteRef(
        "", "default", "", "grpc-egress-deny"
    )


EVERY_CONNECTION_BESIDE_GRPC = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: deny
  rules:
  - name: greeter
    hosts: [grpc.example.com]
    ports: [9000]
    grpc:
    - service: helloworld.Greeter
  - name: everything
    ports: [9000]
"""


def test_a_rule_for_every_connection_takes_the_requests_grpc_rules_leave() -> None:
    """A rule without hosts, http or grpc matches every connection on its ports, HTTP and
    gRPC requests included, also where a gRPC rule makes the port's requests gRPC's."""
    index = compile_policy(load_policy_text(EVERY_CONNECTION_BESIDE_GRPC, "p.yaml"), Settings())
    plain = http(index, "example.org", "/", port=9000)
    assert (plain.action, plain.route) == (Action.PASS, rule("everything"))
    call = RequestFacts(
        Destination(EXTERNAL, 9000), "example.org", "POST", "/a.B/C", "", (), grpc=True
    )
    assert index.decide_request(call).route == rule("everything")
    greeter = call._replace(hostname="grpc.example.com", path="/helloworld.Greeter/Hi")
    assert index.decide_request(greeter).route == rule("greeter")


def test_between_equal_rules_the_one_written_first_wins() -> None:
    """Not the name: z-first is written before a-second and matches the same requests."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: allow
  rules:
  - {name: z-first, hosts: [x.example], action: allow}
  - {name: a-second, hosts: [x.example], action: deny}
"""
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())
    assert http(index, "x.example", "/").route == rule("z-first")
    assert tls(index, "x.example").route == rule("z-first")


def test_audit_deny_rule_and_networks() -> None:
    index = index_of("native-2-observe.yaml")
    tracker = tls(index, "tracker.example.net")
    assert (tracker.action, tracker.audit, tracker.verify_destination) == (Action.DENY, True, "log")
    assert tls(index, "example.org").action == Action.PASS
    assert tcp(index, "198.51.100.1", 22).audit is True
    assert tcp(index, "169.254.169.254", 80).parent is None


@pytest.mark.parametrize(("written", "mode"), [("off", "off"), ("false", "off"), ("log", "log")])
def test_verify_destination_off_may_be_written_unquoted(written: str, mode: str) -> None:
    """YAML 1.1 reads an unquoted `off`, as the README writes it, as false: refused with
    "expected a string", the documented spelling could not be used."""
    text = f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: standalone}}
spec:
  default: deny
  verifyDestination: enforce
  rules:
  - {{name: pinned, hosts: [x.example], action: allow, verifyDestination: {written}}}
"""
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())
    assert tls(index, "x.example").verify_destination == mode
    spec_level = text.replace("enforce", written).replace(", verifyDestination: " + written, "")
    index = compile_policy(load_policy_text(spec_level, "p.yaml"), Settings())
    assert tls(index, "x.example").verify_destination == mode


def test_verify_destination_on_is_refused() -> None:
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: deny
  verifyDestination: on
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    assert str(caught.value) == (
        "p.yaml:6: EgressPolicy standalone.spec.verifyDestination: expected a string, got a"
        " boolean (YAML reads yes, no, on, off, true and false unquoted as one: quote it)"
    )


def test_a_rule_address_its_network_never_takes_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`default: allow` and a deny of the LAN: the LAN is inside the default
    --cluster-networks, so its traffic is no egress and the deny held for nothing,
    silently."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: host}
spec:
  default: allow
  rules:
  - {name: no-lan, cidrs: [192.168.1.0/24, 10.20.0.0/16], action: deny}
  - {name: some-lan, cidrs: [192.168.1.0/24, 198.51.100.0/24], action: deny}
  - {name: everything, cidrs: [0.0.0.0/0], action: deny}
"""
    with caplog.at_level(logging.WARNING):
        compile_policy(load_policy_text(text, "p.yaml"), Settings())
    assert caplog.messages == [
        "p.yaml:7: EgressRule host.no-lan: 192.168.1.0/24, 10.20.0.0/16 are outside every address"
        " EgressPolicy host takes (everything outside --cluster-networks 10.0.0.0/8,"
        " 100.64.0.0/10, 172.16.0.0/12, 192.168.0.0/16, fd00::/8): the rule matches no"
        " traffic there",
        "p.yaml:8: EgressRule host.some-lan: 192.168.1.0/24 is outside every address"
        " EgressPolicy host takes (everything outside --cluster-networks 10.0.0.0/8, 100.64.0.0/10,"
        " 172.16.0.0/12, 192.168.0.0/16, fd00::/8): the rule matches no traffic there",
    ]
    caplog.clear()
    taken = text.replace("  default: allow\n", "  default: allow\n  networks: [192.168.0.0/16]\n")
    with caplog.at_level(logging.WARNING):
        compile_policy(load_policy_text(taken, "p.yaml"), Settings())
    assert [message.split(" takes ")[0] for message in caplog.messages] == [
        "p.yaml:8: EgressRule host.no-lan: 10.20.0.0/16 is outside every address EgressPolicy host",
        "p.yaml:9: EgressRule host.some-lan: 198.51.100.0/24 is outside every address"
        " EgressPolicy host",
    ]
    assert all(
        message.endswith(" takes (its networks): the rule matches no traffic there")
        for message in caplog.messages
    )
    caplog.clear()
    excepted = text.replace(
        "  default: allow\n",
        "  default: allow\n  networks: [{cidr: 0.0.0.0/0, except: [192.168.0.0/16]}]\n",
    ).replace(", 10.20.0.0/16", "")
    with caplog.at_level(logging.WARNING):
        compile_policy(load_policy_text(excepted, "p.yaml"), Settings())
    assert [message.split(":")[2] for message in caplog.messages] == [
        " EgressRule host.no-lan",
        " EgressRule host.some-lan",
    ]


def test_a_warning_names_ten_blocks_at_most(caplog: pytest.LogCaptureFixture) -> None:
    lan = ", ".join(f"192.168.{third}.0/24" for third in range(12))
    text = (
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: host}\n"
        f"spec:\n  default: allow\n  rules:\n  - {{cidrs: [{lan}], action: deny}}\n"
    )
    with caplog.at_level(logging.WARNING):
        compile_policy(load_policy_text(text, "p.yaml"), Settings())
    [warning] = caplog.messages
    assert ", 192.168.9.0/24 and 2 more are outside every address EgressPolicy host" in warning


def test_route_and_deny_actions() -> None:
    index = index_of("native-3-redirect.yaml")
    legacy = http(index, "legacy.example.com", "/anything")
    assert (legacy.action, legacy.backend) == (
        Action.ROUTE,
        Backend("internal-egress.egress-test.svc.cluster.local", 80),
    )
    assert http(index, "example.com", "/admin/users").action == Action.DENY
    assert http(index, "example.com", "/administrator").action == Action.PASS
    assert http(index, "example.com", "/debug", headers=(("x-debug", "1"),)).action == Action.DENY
    assert http(index, "example.com", "/debug").action == Action.PASS
    assert tls(index, "legacy.example.com").action == Action.PASS


def test_a_deny_rule_on_a_method_catches_it_in_any_case() -> None:
    """Unlike Linkerd's exact match: some servers take `delete` for DELETE, so a native
    deny rule must not let it by."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: no-delete}
spec:
  default: allow
  rules:
  - name: no-delete
    http: [{methods: [DELETE]}]
    action: deny
"""
    index = compile_policy(load_policy_text(text, "native.yaml"), Settings())
    for method in ("DELETE", "delete", "Delete"):
        assert http(index, "example.com", "/", method=method).action == Action.DENY, method
    assert http(index, "example.com", "/").action == Action.PASS


def test_a_grpc_deny_rule_catches_any_method() -> None:
    """Unlike Linkerd's GRPCRoute (POST only), so a deny is not dodged with a GET."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: no-admin}
spec:
  default: allow
  rules:
  - name: no-admin
    ports: [50051]
    grpc: [{service: pkg.Admin}]
    action: deny
"""
    index = compile_policy(load_policy_text(text, "native.yaml"), Settings())
    for method in ("POST", "GET"):
        call = http(index, "grpc.example.com", "/pkg.Admin/Drop", method=method, port=50051)
        assert call.action == Action.DENY, method


def test_native_errors_are_reported_with_lines() -> None:
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: maybe
  rules:
  - hosts: ["bad host"]
    ports: [70000]
    action: route
  - http:
    - path: nope
      pathPrefix: /x
    colour: red
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        "n.yaml:5: EgressPolicy p.spec.default: 'maybe' is not one of allow, deny",
        "n.yaml:7: EgressPolicy p.spec.rules[0].hosts: 'bad host' is not a valid hostname",
        "n.yaml:7: EgressPolicy p.spec.rules[0]: action route needs to: HOST:PORT",
        "n.yaml:8: EgressPolicy p.spec.rules[0].ports[0]: port 70000 is outside 1-65535",
        "n.yaml:11: EgressPolicy p.spec.rules[1].http[0]: "
        "give only one of path, pathPrefix, pathRegex",
        "n.yaml:11: EgressPolicy p.spec.rules[1].http[0].path: 'nope' must start with '/'",
        "n.yaml:13: EgressPolicy p.spec.rules[1]: unknown field 'colour'",
    ]


def test_a_policy_without_a_default_is_refused() -> None:
    """spec.default is required (README): a policy that leaves it out says nothing of the
    requests its rules miss, and taking either answer for it would pass or deny them all
    unasked."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  rules: [{hosts: [a.example]}]
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        "n.yaml:5: EgressPolicy p.spec: missing required field 'default' (allow or deny)"
    ]


def route_rule_to(target: str) -> str:
    return f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p}}
spec:
  default: allow
  rules:
  - {{name: x, action: route, to: "{target}"}}
"""


@pytest.mark.parametrize(
    ("target", "backend"),
    [
        ("a.example:80", Backend("a.example", 80)),
        ("A.Example.:8080", Backend("a.example", 8080)),
        ("192.0.2.1:80", Backend("192.0.2.1", 80)),
        ("[2001:db8::1]:443", Backend("2001:db8::1", 443)),
        ("a.example:65535", Backend("a.example", 65535)),
    ],
)
def test_route_targets(target: str, backend: Backend) -> None:
    index = compile_policy(load_policy_text(route_rule_to(target), "n.yaml"), Settings())
    assert http(index, "example.com", "/").backend == backend


@pytest.mark.parametrize(
    "target",
    [
        "a.example:²",  # str.isdigit() took it, int() raised: a traceback
        "a.example:" + "1" * 5000,  # int() refuses this many digits: a traceback
        "a.example:٣",  # a Unicode digit became port 3
        "2001:db8::1:443",  # IPv6 without brackets: which part is the port?
        "[a.example]:80",
        "[192.0.2.1]:80",
        "[[::1]]:80",
        "a.example",
        "a.example:0",
        "a.example:65536",  # one past the last port: a backend no connection reaches
    ],
)
def test_bad_route_targets_are_errors_with_lines(target: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(route_rule_to(target), "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        f"n.yaml:7: EgressPolicy p.spec.rules[0].to: {target!r} is not HOST:PORT "
        "(IPv6: [ADDRESS]:PORT)"
    ]


def test_a_wildcard_route_target_is_refused_as_one() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(route_rule_to("*.a.example:443"), "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        "n.yaml:7: EgressPolicy p.spec.rules[0].to: '*.a.example' is not a valid hostname "
        "(no wildcard here: name one host)"
    ]


def test_an_ipv4_mapped_cidr_matches_the_ipv4_addresses_it_names() -> None:
    """Destinations are matched as IPv4 when IPv4-mapped (a dual-stack socket's view), so a
    rule written `::ffff:198.51.100.0/120` matched no connection at all."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  networks: ["::ffff:198.51.100.0/120"]
  rules:
  - {name: mapped, cidrs: ["::ffff:198.51.100.7"], action: allow}
"""
    index = compile_policy(load_policy_text(text, "n.yaml"), Settings())
    assert tcp(index, "198.51.100.7", 5432).action == Action.PASS
    assert tcp(index, "::ffff:198.51.100.7", 5432).action == Action.PASS
    assert tcp(index, "198.51.100.8", 5432).action == Action.DENY


def test_empty_lists_and_an_empty_name_are_errors() -> None:
    """`hosts: []` meant any host, as if omitted: on an allow rule it allowed everything."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  rules:
  - hosts: []
  - ports: []
  - cidrs: []
  - http: []
  - grpc: []
  - http: [{methods: []}]
  - name: ""
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    empty = "empty list: list at least one or omit it"
    assert [str(problem) for problem in caught.value.problems] == [
        f"n.yaml:7: EgressPolicy p.spec.rules[0].hosts: {empty}",
        f"n.yaml:8: EgressPolicy p.spec.rules[1].ports: {empty}",
        f"n.yaml:9: EgressPolicy p.spec.rules[2].cidrs: {empty}",
        f"n.yaml:10: EgressPolicy p.spec.rules[3].http: {empty}",
        f"n.yaml:11: EgressPolicy p.spec.rules[4].grpc: {empty}",
        f"n.yaml:12: EgressPolicy p.spec.rules[5].http[0].methods: {empty}",
        "n.yaml:13: EgressPolicy p.spec.rules[6].name: must not be empty",
    ]


def test_networks_empty_or_with_stray_exceptions_are_errors() -> None:
    """`networks: []` made a policy covering no address: its `default: deny` and its rules
    applied to nothing and all traffic passed untouched. Exceptions are checked as an
    EgressNetwork's are: inside their cidr, and not covering all of it."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  networks: []
---
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: q}
spec:
  default: deny
  networks:
  - {cidr: 203.0.113.0/24, except: [198.51.100.7]}
  - {cidr: 192.0.2.0/24, except: [192.0.2.0/24]}
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        "n.yaml:6: EgressPolicy p.spec.networks: empty list: list at least one or omit it",
        "n.yaml:14: EgressPolicy q.spec.networks[0].except: 198.51.100.7/32 is not inside "
        "cidr 203.0.113.0/24",
        "n.yaml:15: EgressPolicy q.spec.networks[1].except: 192.0.2.0/24 covers all of cidr "
        "192.0.2.0/24: the entry covers nothing",
    ]


def test_lists_without_a_value_are_errors() -> None:
    """`hosts:` with its items commented out (or a template that rendered none) is null,
    which read as omitted: an allow rule for some hosts allowed every host. So with any
    field of a match."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  rules:
  - hosts:
    ports: [443]
  - ports: ~
  - cidrs: null
  - http:
  - grpc:
  - http: [{methods: }]
  - http: [{pathPrefix: , headers: }]
  - grpc: [{service: }]
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    null = "no value: give one or omit it"
    assert [str(problem) for problem in caught.value.problems] == [
        f"n.yaml:7: EgressPolicy p.spec.rules[0].hosts: {null}",
        f"n.yaml:9: EgressPolicy p.spec.rules[1].ports: {null}",
        f"n.yaml:10: EgressPolicy p.spec.rules[2].cidrs: {null}",
        f"n.yaml:11: EgressPolicy p.spec.rules[3].http: {null}",
        f"n.yaml:12: EgressPolicy p.spec.rules[4].grpc: {null}",
        f"n.yaml:13: EgressPolicy p.spec.rules[5].http[0].methods: {null}",
        f"n.yaml:14: EgressPolicy p.spec.rules[6].http[0].pathPrefix: {null}",
        f"n.yaml:14: EgressPolicy p.spec.rules[6].http[0].headers: {null}",
        f"n.yaml:15: EgressPolicy p.spec.rules[7].grpc[0].service: {null}",
    ]


def test_a_deny_for_cidrs_written_first_holds_against_an_http_rule_for_every_path() -> None:
    """Both rules name no host and match every request: the one written first wins. The
    `http` rule used to win every HTTP request, cloud metadata's included."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: deny
  rules:
  - {name: no-metadata, cidrs: [169.254.169.254/32], action: deny}
  - {name: web, http: [{pathPrefix: /}]}
  - {name: api, http: [{pathPrefix: /api}]}
"""
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())

    def get(address: str, path: str) -> Decision:
        destination = Destination(ipaddress.ip_address(address), 80)
        return index.decide_request(RequestFacts(destination, None, "GET", path, "", (), False))

    metadata = get("169.254.169.254", "/latest/meta-data")
    assert (metadata.action, metadata.protocol, metadata.route) == (
        Action.DENY,
        RouteProtocol.HTTP,
        rule("no-metadata"),
    )
    assert get("198.51.100.7", "/latest").route == rule("web")
    assert get("169.254.169.254", "/api/x").route == rule("api")  # a longer prefix is first
    assert tcp(index, "169.254.169.254", 80).route == rule("no-metadata")


def test_the_content_type_a_client_chooses_dodges_no_deny() -> None:
    """A gRPC server may serve a call sent without `content-type: application/grpc`, and
    an HTTP server serves a request that claims to be a call: a `grpc` deny holds against a
    request without the content-type when its path is a call's, and an `http` deny holds
    against a call when a `grpc` allow of the same host level also matches it."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: allow
  rules:
  - {name: no-fail, ports: [80], grpc: [{service: test.Echo, method: Fail}], action: deny}
  - {name: api, hosts: [api.test], ports: [80], http: [{pathPrefix: /}]}
  - {name: no-admin, hosts: [api.test], ports: [80], http: [{pathPrefix: /admin}], action: deny}
  - {name: api-grpc, hosts: [api.test], ports: [80], grpc: [{}]}
"""
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())

    def decided(hostname: str, path: str, grpc: bool) -> tuple[Action, str]:
        destination = Destination(ipaddress.ip_address("198.51.100.7"), 80)
        facts = RequestFacts(destination, hostname, "POST", path, "", (), grpc)
        outcome = index.decide_request(facts)
        return outcome.action, outcome.route.name if outcome.route else ""

    for grpc in (True, False):
        assert decided("other.test", "/test.Echo/Fail", grpc) == (Action.DENY, "standalone.no-fail")
        assert decided("other.test", "/test.Echo/Ok", grpc)[0] == Action.PASS
        assert decided("api.test", "/admin/users", grpc) == (Action.DENY, "standalone.no-admin")
        assert decided("api.test", "/admin", grpc) == (Action.DENY, "standalone.no-admin")
    assert decided("api.test", "/pkg.Svc/Get", True) == (Action.PASS, "standalone.api-grpc")
    assert decided("api.test", "/pkg.Svc/Get", False) == (Action.PASS, "standalone.api")
    for grpc in (True, False):  # more segments, as linkerd2-proxy splits a call's path
        assert decided("other.test", "/test.Echo/Fail/x", grpc) == (
            Action.DENY,
            "standalone.no-fail",
        )


def test_a_grpc_call_meets_the_rules_for_its_host_on_a_port_of_grpc_rules() -> None:
    """A gRPC call is an HTTP request too: a deny for its host, by `hosts` alone or with
    `http` matches, holds against a `grpc` allow for any host. It used to meet the `grpc`
    rules alone, so the allow let gRPC to evil.test through."""
    text = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: deny
  rules:
  - {name: greeter, ports: [80], grpc: [{service: pkg.Greeter}]}
  - {name: evil, hosts: [evil.test], action: deny}
  - {name: no-admin, hosts: [admin.test], http: [{pathPrefix: /pkg.Greeter/Reset}], action: deny}
  - {name: friends, hosts: [friend.test], ports: [80], grpc: [{service: pkg.Friend}]}
"""
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())

    def call(hostname: str, path: str) -> Decision:
        destination = Destination(ipaddress.ip_address("198.51.100.7"), 80)
        return index.decide_request(RequestFacts(destination, hostname, "POST", path, "", (), True))

    decided = {
        (hostname, path): (outcome.action, outcome.protocol, outcome.route.name)
        for hostname, path in [
            ("evil.test", "/pkg.Greeter/Hello"),
            ("admin.test", "/pkg.Greeter/Reset"),
            ("admin.test", "/pkg.Greeter/Hello"),
            ("friend.test", "/pkg.Greeter/Hello"),
            ("friend.test", "/pkg.Friend/Hello"),
            ("other.test", "/pkg.Greeter/Hello"),
        ]
        if (outcome := call(hostname, path)).route is not None
    }
    assert decided == {
        ("evil.test", "/pkg.Greeter/Hello"): (Action.DENY, RouteProtocol.GRPC, "standalone.evil"),
        ("admin.test", "/pkg.Greeter/Reset"): (
            Action.DENY,
            RouteProtocol.GRPC,
            "standalone.no-admin",
        ),
        ("admin.test", "/pkg.Greeter/Hello"): (
            Action.PASS,
            RouteProtocol.GRPC,
            "standalone.greeter",
        ),
        ("friend.test", "/pkg.Greeter/Hello"): (  # no rule of its host matches: any host's
            Action.PASS,
            RouteProtocol.GRPC,
            "standalone.greeter",
        ),
        ("friend.test", "/pkg.Friend/Hello"): (
            Action.PASS,
            RouteProtocol.GRPC,
            "standalone.friends",
        ),
        ("other.test", "/pkg.Greeter/Hello"): (
            Action.PASS,
            RouteProtocol.GRPC,
            "standalone.greeter",
        ),
    }


def native_rule_problems(rule: str) -> list[str]:
    text = f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p}}
spec:
  default: deny
  rules:
  - {rule}
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "n.yaml")
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (
            "hosts: [203.0.113.5]",
            "hosts: '203.0.113.5' is an IP address, not a hostname: match addresses with cidrs",
        ),
        (
            'hosts: ["2001:db8::5"]',
            "hosts: '2001:db8::5' is an IP address, not a hostname: match addresses with cidrs",
        ),
        (
            'hosts: ["bücher.example"]',
            "hosts: 'bücher.example' is not a valid hostname (an internationalised name: "
            "write its IDNA form 'xn--bcher-kva.example')",
        ),
        (
            'hosts: ["*.Bücher.example"]',
            "hosts: '*.Bücher.example' is not a valid hostname (an internationalised name: "
            "write its IDNA form '*.xn--bcher-kva.example')",
        ),
        (
            "http: [{headers: {x team: blue}}]",
            "http[0].headers: 'x team' is not a header name "
            "(letters, digits and !#$%&'*+-.^_`|~ only)",
        ),
        (
            'http: [{headers: {"x-team:": blue}}]',
            "http[0].headers: 'x-team:' is not a header name "
            "(letters, digits and !#$%&'*+-.^_`|~ only)",
        ),
        (
            'grpc: [{service: "pkg.Greeter/SayHello"}]',
            "grpc[0].service: 'pkg.Greeter/SayHello' is not a protobuf service name (pkg.Service)",
        ),
        (
            'grpc: [{service: pkg.Greeter, method: "Say Hello"}]',
            "grpc[0].method: 'Say Hello' is not a method name",
        ),
        (
            "grpc: [{service: .pkg.Admin}]",
            "grpc[0].service: '.pkg.Admin' matches no call a gRPC client makes: its path"
            " names the service without the leading dot (write 'pkg.Admin')",
        ),
    ],
    ids=[
        "ipv4-host",
        "ipv6-host",
        "idn-host",
        "idn-wildcard",
        "header-space",
        "header-colon",
        "grpc-slash",
        "grpc-space",
        "grpc-leading-dot",
    ],
)
def test_names_that_can_never_match_are_errors(rule: str, problem: str) -> None:
    """An IP in hosts (SNI never carries one, and cidrs match addresses), a non-ASCII name
    (SNI and Host carry its xn-- form), a header name that is not a token, or a gRPC name
    no `/service/method` path can carry would silently never match."""
    assert native_rule_problems(rule) == [f"n.yaml:7: EgressPolicy p.spec.rules[0].{problem}"]


HEADER_AND_QUERY_MATCHES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  rules:
  - name: api
    http:
    - pathPrefix: /api
      headers: {X-Team: blue}
      headersRegex: {User-Agent: "curl/[0-9.]+"}
      query: {v: "1"}
      queryRegex: {page: "[0-9]+"}
  - name: greeter
    ports: [50051]
    grpc:
    - service: pkg.Greeter
      headers: {X-Tenant: blue}
      headersRegex: {x-trace: "[0-9a-f]{8}"}
"""


def native_rule(model: Model, name: str) -> Rule:
    (found,) = [route.rules[0] for route in model.routes if route.ref.name == f"p.{name}"]
    return found


def test_an_empty_header_or_query_regex_matches_an_empty_value_only() -> None:
    """A regular expression matches the whole value: `""` takes a header or parameter sent
    empty. Read as false, it was dropped, and the rule matched without it."""
    text = HEADER_AND_QUERY_MATCHES.replace('"curl/[0-9.]+"', '""').replace('"[0-9]+"', '""')
    index = compile_policy(load_policy_text(text, "n.yaml"), Settings())
    sent = (("x-team", "blue"), ("user-agent", ""))
    assert http(index, "h.example", "/api", headers=sent, query="v=1&page=").action == Action.PASS
    assert http(index, "h.example", "/api", headers=sent, query="v=1&page=2").action == Action.DENY
    other = (("x-team", "blue"), ("user-agent", "curl/8"))
    assert http(index, "h.example", "/api", headers=other, query="v=1&page=").action == Action.DENY


def test_header_and_query_matches_compile_to_the_gateway_api_ones() -> None:
    """The same ValueMatch objects as an HTTPRoute's and a GRPCRoute's matches: one matcher
    decides both dialects."""
    native = load_policy_text(HEADER_AND_QUERY_MATCHES, "n.yaml")
    gateway = load_policy_text(
        "---".join(
            [
                DENY_NET,
                http_route(
                    "api",
                    "  - matches:\n    - path: {value: /api}\n      headers:\n"
                    "      - {name: X-Team, value: blue}\n"
                    "      - {type: RegularExpression, name: User-Agent, value: 'curl/[0-9.]+'}\n"
                    "      queryParams:\n      - {name: v, value: '1'}\n"
                    "      - {type: RegularExpression, name: page, value: '[0-9]+'}\n",
                ),
                grpc_route(
                    "greeter",
                    "  - matches:\n    - method: {service: pkg.Greeter}\n      headers:\n"
                    "      - {name: X-Tenant, value: blue}\n"
                    "      - {type: RegularExpression, name: x-trace, value: '[0-9a-f]{8}'}\n",
                ),
            ]
        ),
        "g.yaml",
    )
    gateway_rules = {route.ref.name: route.rules[0] for route in gateway.routes}
    (api,) = native_rule(native, "api").http_matches
    (http_route_match,) = gateway_rules["api"].http_matches
    assert (api.headers, api.query) == (http_route_match.headers, http_route_match.query)
    assert len(api.headers) == len(api.query) == 2
    (greeter,) = native_rule(native, "greeter").grpc_matches
    (grpc_route_match,) = gateway_rules["greeter"].grpc_matches
    assert greeter.headers == grpc_route_match.headers
    assert len(greeter.headers) == 2


def test_header_and_query_matches_decide_requests_and_grpc_calls() -> None:
    """Exact values and regular expressions that match a whole value, any of a repeated
    parameter's; header names in any case in the policy."""
    index = compile_policy(load_policy_text(HEADER_AND_QUERY_MATCHES, "n.yaml"), Settings())
    good = (("x-team", "blue"), ("user-agent", "curl/8.5.0"))

    def api(headers: tuple[tuple[str, str], ...], query: str) -> RouteRef | None:
        return http(index, "example.com", "/api/x", headers=headers, query=query).route

    assert api(good, "v=1&page=12") == rule("api", "p")
    assert api(good, "page=x&v=1&page=3") == rule("api", "p")
    denied = RouteRef("", "default", "", "http-egress-deny")
    assert api(good, "v=1&page=12a") == denied  # a regular expression matches the whole value
    assert api(good, "v=12&page=1") == denied
    assert api(good, "v=1") == denied
    assert api((("x-team", "blue"), ("user-agent", "Mozilla curl/8.5.0")), "v=1&page=1") == denied
    assert api((("user-agent", "curl/8.5.0"),), "v=1&page=1") == denied

    def greeter(*headers: tuple[str, str]) -> RouteRef | None:
        path = "/pkg.Greeter/Hello"
        return http(index, "g.example", path, "POST", 50051, headers, grpc=True).route

    assert greeter(("x-tenant", "blue"), ("x-trace", "0123abcd")) == rule("greeter", "p")
    denied = RouteRef("", "default", "", "grpc-egress-deny")
    assert greeter(("x-tenant", "blue"), ("x-trace", "0123abcd0")) == denied
    assert greeter(("x-trace", "0123abcd")) == denied


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (
            'http: [{headersRegex: {x-a: "("}}]',
            "http[0].headersRegex.x-a: invalid regular expression '(': missing ): (",
        ),
        (
            'http: [{queryRegex: {page: "[0-9"}}]',
            "http[0].queryRegex.page: invalid regular expression '[0-9': missing ]: [0-9",
        ),
        (
            'grpc: [{headersRegex: {x-a: "a{2,1}"}}]',
            "grpc[0].headersRegex.x-a: invalid regular expression 'a{2,1}': "
            "invalid repetition size: {2,1}",
        ),
        (
            "http: [{headersRegex: {x team: a}}]",
            "http[0].headersRegex: 'x team' is not a header name "
            "(letters, digits and !#$%&'*+-.^_`|~ only)",
        ),
        (
            'grpc: [{headers: {"": a}}]',
            "grpc[0].headers: '' is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)",
        ),
        ('http: [{query: {"": a}}]', "http[0].query: a parameter name must not be empty"),
        (
            "http: [{queryRegex: {page: 1}}]",
            "http[0].queryRegex.page: expected a string, got int 1",
        ),
        ("grpc: [{headers: [x-a]}]", "grpc[0].headers: expected a mapping, got a list"),
        ("grpc: [{headers: {x-a: b}, query: {v: b}}]", "grpc[0]: unknown field 'query'"),
        ("http: [{headers: {}}]", "http[0].headers: empty mapping: give at least one or omit it"),
    ],
    ids=[
        "header-regex",
        "query-regex",
        "grpc-header-regex",
        "header-regex-name",
        "grpc-header-empty-name",
        "query-empty-name",
        "query-regex-value-type",
        "grpc-headers-type",
        "grpc-query",
        "empty-headers",
    ],
)
def test_bad_header_and_query_matches_are_errors_with_lines(rule: str, problem: str) -> None:
    assert native_rule_problems(rule) == [f"n.yaml:7: EgressPolicy p.spec.rules[0].{problem}"]


NAMES = ["X-Team", "x-team", "v", "V"]
"""Names of the policy's match and of the request's pairs: headers compare them in any case,
query parameters exactly."""
VALUES = st.one_of(
    st.sampled_from(["", "a", "abc", "ABC", "X", "1", "01", "42", "blue"]),
    st.text("abcXY01-", max_size=4),
)
"""Few enough that a request's values often meet the policy's value or pattern."""
PATTERNS = st.sampled_from(["a.*", "[a-c]+", "X|Y", "0?1", r"\d\d", "(?i)abc", "blue"])
"""Not empty, nor the policy's values: Gateway API refuses an empty match value."""


@settings(max_examples=200, deadline=None)
@given(
    family=st.sampled_from(["grpc", "headers", "query"]),
    regex=st.booleans(),
    name=st.sampled_from(NAMES),
    value=VALUES.filter(bool),
    pattern=PATTERNS,
    sent=st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=4),
)
def test_a_native_value_match_decides_as_the_gateway_api_one(
    family: str, regex: bool, name: str, value: str, pattern: str, sent: list[tuple[str, str]]
) -> None:
    """A header or query parameter match written as native decides every request as the
    same match written in an HTTPRoute (or, for headers, a GRPCRoute) does."""
    wanted = pattern if regex else value
    key = ("query" if family == "query" else "headers") + ("Regex" if regex else "")
    pairs = f"{{{key}: {{{json.dumps(name)}: {json.dumps(wanted)}}}}}"
    native = f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p}}
spec:
  default: deny
  rules:
  - name: r
    ports: [80, 50051]
    {"grpc" if family == "grpc" else "http"}: [{pairs}]
"""
    kind = "RegularExpression" if regex else "Exact"
    match = f"{{type: {kind}, name: {json.dumps(name)}, value: {json.dumps(wanted)}}}"
    field = "queryParams" if family == "query" else "headers"
    rules = f"  - matches:\n    - {field}: [{match}]\n"
    grpc = family == "grpc"
    gateway = f"{DENY_NET}---{grpc_route('r', rules) if grpc else http_route('r', rules)}"
    headers = tuple((sent_name.lower(), sent_value) for sent_name, sent_value in sent)
    decided = [
        http(
            compile_policy(load_policy_text(text, "p.yaml"), Settings()),
            "example.com",
            "/pkg.Svc/Call" if grpc else "/",
            "POST" if grpc else "GET",
            50051 if grpc else 80,
            () if family == "query" else headers,
            urlencode(sent) if family == "query" else "",
            grpc,
        ).action
        for text in (native, gateway)
    ]
    assert decided[0] == decided[1]


GRPC_REGEX_MATCHES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  rules:
  - name: both
    ports: [50051]
    grpc: [{serviceRegex: 'pkg\\.(Greeter|Farewell)', methodRegex: "Say.*"}]
  - name: service-regex
    ports: [50051]
    grpc: [{serviceRegex: 'pkg\\.Admin.*', method: Drop}]
  - name: method-regex
    ports: [50051]
    grpc: [{service: pkg.Store, methodRegex: "Get|List"}]
  - name: service-only
    ports: [50051]
    grpc: [{serviceRegex: 'metrics\\..*', headers: {x-tenant: blue}}]
"""


def test_grpc_regex_matches_compile_to_one_regex_match_of_both_parts() -> None:
    """serviceRegex and methodRegex make one GrpcMatch of regular expressions; an exact part
    beside a regular expression becomes the escaped one."""
    native = load_policy_text(GRPC_REGEX_MATCHES, "n.yaml")
    expected = {
        "both": (r"pkg\.(Greeter|Farewell)", "Say.*", ()),
        "service-regex": (r"pkg\.Admin.*", "Drop", ()),
        "method-regex": (r"pkg\.Store", "Get|List", ()),
        "service-only": (
            r"metrics\..*",
            None,
            (ValueMatch("x-tenant", MatchKind.EXACT, "blue"),),
        ),
    }
    for name, (service, method, headers) in expected.items():
        (native_match,) = native_rule(native, name).grpc_matches
        assert native_match == GrpcMatch(
            service=service, method=method, kind=MatchKind.REGEX, headers=headers, any_method=True
        ), name


def test_grpc_regex_matches_decide_whole_names() -> None:
    """A regular expression matches the whole service or method name, as Gateway API's."""
    index = compile_policy(load_policy_text(GRPC_REGEX_MATCHES, "n.yaml"), Settings())

    def route(path: str, *headers: tuple[str, str]) -> str | None:
        decided = http(index, "g.example", path, "POST", 50051, headers, grpc=True).route
        return decided.name if decided is not None else None

    assert route("/pkg.Greeter/SayHello") == "p.both"
    assert route("/pkg.Farewell/Say") == "p.both"
    assert route("/pkg.Greeter/Hello") == "grpc-egress-deny"
    assert route("/pkg.GreeterX/SayHello") == "grpc-egress-deny"  # the whole service
    assert route("/xpkg.Greeter/SayHello") == "grpc-egress-deny"
    assert route("/pkg.AdminV2/Drop") == "p.service-regex"
    assert route("/pkg.AdminV2/DropAll") == "grpc-egress-deny"  # the exact method stays exact
    assert route("/pkg.Store/List") == "p.method-regex"
    assert route("/pkgXStore/List") == "grpc-egress-deny"  # the exact service's dot is a dot
    assert route("/pkg.Store/Listing") == "grpc-egress-deny"
    assert route("/metrics.v1.Export/Any", ("x-tenant", "blue")) == "p.service-only"
    assert route("/metrics.v1.Export/Any") == "grpc-egress-deny"


def test_grpc_precedence_puts_exact_matches_before_regular_expressions() -> None:
    """Gateway API precedence between gRPC matches holds for native rules whatever their
    order: more parts given first, then exact before regular expression."""
    policy = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: allow
  rules:
  - {name: any-service, ports: [50051], grpc: [{serviceRegex: 'pkg\\..*'}], action: deny}
  - name: any-call
    ports: [50051]
    grpc: [{serviceRegex: 'pkg\\..*', methodRegex: ".*"}]
    action: allow
  - name: hello
    ports: [50051]
    grpc: [{service: pkg.Greeter, method: SayHello}]
    action: deny
"""
    index = compile_policy(load_policy_text(policy, "n.yaml"), Settings())

    def route(path: str) -> str | None:
        decided = http(index, "g.example", path, "POST", 50051, grpc=True).route
        return decided.name if decided is not None else None

    assert route("/pkg.Greeter/SayHello") == "p.hello"
    assert route("/pkg.Greeter/SayBye") == "p.any-call"


def test_an_empty_path_regex_is_an_error() -> None:
    """A whole-path match of nothing matches no path (each begins with '/'): the rule
    would never apply, so it is refused as the empty gRPC patterns are."""
    assert native_rule_problems("http: [{pathRegex: ''}]") == [
        "n.yaml:7: EgressPolicy p.spec.rules[0].http[0].pathRegex:"
        " empty: no path matches it; omit it to match any"
    ]


@pytest.mark.parametrize(
    ("rule", "line", "problem"),
    [
        (
            "grpc: [{service: pkg.A, serviceRegex: 'pkg\\..*'}]",
            7,
            "grpc[0]: give only one of service, serviceRegex",
        ),
        (
            "grpc:\n    - service: pkg.A\n      method: Get\n      methodRegex: Get.*",
            8,
            "grpc[0]: give only one of method, methodRegex",
        ),
        (
            "grpc:\n    - service: pkg.A\n      methodRegex: 'Get('",
            9,
            "grpc[0].methodRegex: invalid regular expression 'Get(': missing ): Get(",
        ),
        (
            "grpc: [{serviceRegex: '[a-'}]",
            7,
            "grpc[0].serviceRegex: invalid regular expression '[a-': missing ]: [a-",
        ),
        (
            "grpc: [{serviceRegex: '', method: Get}]",
            7,
            "grpc[0].serviceRegex: empty: omit it to match any",
        ),
        ("grpc: [{methodRegex: 3}]", 7, "grpc[0].methodRegex: expected a string, got int 3"),
    ],
    ids=["both-service", "both-method", "bad-method-regex", "bad-service-regex", "empty", "type"],
)
def test_bad_grpc_regex_matches_are_errors_with_lines(rule: str, line: int, problem: str) -> None:
    assert native_rule_problems(rule) == [f"n.yaml:{line}: EgressPolicy p.spec.rules[0].{problem}"]


GRPC_NAMES = {
    "service": ["pkg.Svc", "pkg.Other"],
    "method": ["Call", "Get", "GetAll"],
}
"""Exact parts: a dot in them must stay a dot."""
GRPC_CALLED = {
    "service": [
        *GRPC_NAMES["service"],
        *("pkg.svc", ".pkg.Svc", "other.Svc", "pkgXSvc", "XpkgXSvc", "Svc"),
    ],
    "method": [*GRPC_NAMES["method"], "call", "X"],
}
"""The parts of the calls: often met by the patterns and exact parts, sometimes nearly."""
GRPC_PATTERNS = {
    "service": [r"pkg\..*", r"pkg\.(Svc|Other)", "[a-z]+.Svc", ".*", "pkg.Svc", "(?i)PKG\\.svc"],
    "method": ["Call|Get.*", "[A-Z][a-z]+", "Get", "G.t(All)?", ".*", "(?i)call"],
}
"""Not empty: Gateway API refuses an empty value, and native rules too."""


GRPC_SHAPES = [
    ("regex", None),
    (None, "regex"),
    ("regex", "regex"),
    ("regex", "exact"),
    ("exact", "regex"),
]
"""How (service, method) are given: at least one a regular expression."""


@settings(max_examples=300, deadline=None)
@given(
    shape=st.sampled_from(GRPC_SHAPES),
    values=st.fixed_dictionaries(
        {
            kind: st.fixed_dictionaries({key: st.sampled_from(pool[key]) for key in pool})
            for kind, pool in (("exact", GRPC_NAMES), ("regex", GRPC_PATTERNS))
        }
    ),
    calls=st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(GRPC_CALLED["service"]), st.sampled_from(GRPC_CALLED["method"])
            ).map(lambda call: f"/{call[0]}/{call[1]}"),
            st.sampled_from(["/", "/pkg.Svc", "/pkg.Svc/", "/pkg.Svc/Call/x", "//Call"]),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_a_native_grpc_regex_match_decides_whole_names_of_calls(
    shape: tuple[str | None, str | None], values: dict[str, dict[str, str]], calls: list[str]
) -> None:
    """serviceRegex / methodRegex (beside each other, an exact part or nothing) allow a call
    when each given part matches the call's whole service or method name (the first two
    segments of its path, as linkerd2-proxy reads them), and nothing that is no call."""
    given_parts = {
        key: (kind, values[kind][key])
        for key, kind in zip(("service", "method"), shape, strict=True)
        if kind is not None
    }
    native_keys = ", ".join(
        f"{key}{'Regex' if kind == 'regex' else ''}: {json.dumps(value)}"
        for key, (kind, value) in given_parts.items()
    )
    native = f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p}}
spec:
  default: deny
  rules:
  - {{name: r, ports: [50051], grpc: [{{{native_keys}}}]}}
"""
    index = compile_policy(load_policy_text(native, "p.yaml"), Settings())
    for path in calls:
        parts = re.sub("/+", "/", path).split("/")  # `//Call` is read as `/Call`
        names = dict(zip(("service", "method"), parts[1:3], strict=False))
        is_call = len(parts) >= 3 and not parts[0]
        allowed = is_call and all(
            re.fullmatch(value, names[key]) if kind == "regex" else value == names[key]
            for key, (kind, value) in given_parts.items()
        )
        decided = http(index, "example.com", path, "POST", 50051, grpc=True).action
        assert decided == (Action.PASS if allowed else Action.DENY), path
