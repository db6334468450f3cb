"""The native EgressPolicy dialect: hosts, wildcards, CIDRs, ports, HTTP, gRPC, actions."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

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
from egressproxy.settings import Settings

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
) -> Decision:
    facts = RequestFacts(Destination(EXTERNAL, port), host, method, path, "", headers, grpc=False)
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
    assert github.parent == ParentRef("egressproxy.io", "EgressPolicy", "", "standalone", "443", "")
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
    ],
)
def test_bad_route_targets_are_errors_with_lines(target: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(route_rule_to(target), "n.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        f"n.yaml:7: EgressPolicy p.spec.rules[0].to: {target!r} is not HOST:PORT "
        "(IPv6: [ADDRESS]:PORT)"
    ]


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
    ],
)
def test_names_that_can_never_match_are_errors(rule: str, problem: str) -> None:
    """An IP in hosts (SNI never carries one, and cidrs match addresses), a non-ASCII name
    (SNI and Host carry its xn-- form), a header name that is not a token, or a gRPC name
    no `/service/method` path can carry would silently never match."""
    assert native_rule_problems(rule) == [f"n.yaml:7: EgressPolicy p.spec.rules[0].{problem}"]
