"""The compiled index: host tables, CIDR table, mixed dialects, and decide() on arbitrary input."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressproxy.policy.decision import (
    Action,
    ConnectionFacts,
    Destination,
    Detected,
    RequestFacts,
)
from egressproxy.policy.index import (
    DEFAULT_HTTP_MATCH,
    MAX_MEMOISED_DECISIONS,
    MAX_MEMOISED_LEVELS,
    MAX_MEMOISED_REQUEST_TEXT,
    AddressSpans,
    CidrTable,
    CompiledNetwork,
    CompiledRule,
    HostTable,
    HttpRules,
    PolicyIndex,
    RequestDecider,
    best_http_rule,
    compile_policy,
    names_another_port,
    normalized_path,
)
from egressproxy.policy.loader import load_policy_text
from egressproxy.policy.model import CidrRange, Network, NetworkId, Origin, TrafficPolicy
from egressproxy.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


def test_host_table_levels_most_specific_first() -> None:
    table: HostTable[str] = HostTable()
    table.add(["*.example.com"], "wild")
    table.add(["*.a.example.com"], "deeper")
    table.add(["b.a.example.com"], "exact")
    table.add([], "any")
    assert list(table.levels("b.a.example.com")) == [["exact"], ["deeper"], ["wild"], ["any"]]
    assert list(table.levels("x.a.example.com")) == [["deeper"], ["wild"], ["any"]]
    assert list(table.levels("a.example.com")) == [["wild"], ["any"]]
    assert list(table.levels("example.com")) == [["any"]]
    assert list(table.levels(None)) == [["any"]]


def test_host_table_remembers_levels_within_bounds_and_forgets_them_on_add() -> None:
    table: HostTable[str] = HostTable()
    table.add(["*.example.com"], "wild")
    first = table.levels("a.example.com")
    assert table.levels("a.example.com") is first, "asked again, answered from memory"
    table.add(["a.example.com"], "exact")
    assert list(table.levels("a.example.com")) == [["exact"], ["wild"]], "an add is seen"
    for number in range(MAX_MEMOISED_LEVELS + 10):
        assert list(table.levels(f"h{number}.example.com")) == [["wild"]]
    assert len(table._levels) <= MAX_MEMOISED_LEVELS


def network(name: str, order: int = 0) -> CompiledNetwork:
    return CompiledNetwork(
        Network(
            id=NetworkId("g", "K", "ns", name),
            ranges=None,
            traffic_policy=TrafficPolicy.ALLOW,
            namespace_scoped=False,
            audit=False,
            verify_destination=None,
            created=None,
            order=order,
            origin=Origin("f", 1),
        ),
        audit=False,
    )


def cidr(text: str, *excepts: str) -> CidrRange:
    return CidrRange(ipaddress.ip_network(text), tuple(map(ipaddress.ip_network, excepts)))


def test_cidr_table_v4_and_v6() -> None:
    v4, v6 = network("v4"), network("v6")
    table = CidrTable([(cidr("198.51.100.0/24"), v4), (cidr("2001:db8::/32"), v6)])
    assert table.lookup(ipaddress.ip_address("198.51.100.255")) is v4
    assert table.lookup(ipaddress.ip_address("2001:db8::1")) is v6
    assert table.lookup(ipaddress.ip_address("::ffff:198.51.100.1")) is None
    assert table.lookup(ipaddress.ip_address("192.0.2.1")) is None


def test_the_network_with_fewest_addresses_wins_as_linkerd_counts_them() -> None:
    """Linkerd's Network::block_size: a cidr's hosts (an IPv4 block above /31 without its
    network and broadcast addresses) less its exceptions', not its prefix length."""
    carved, slash18 = network("carved"), network("slash18", order=1)
    table = CidrTable(
        [
            (cidr("198.51.0.0/16", "198.51.0.0/17", "198.51.128.0/18", "198.51.192.0/19"), carved),
            (cidr("198.51.192.0/18"), slash18),
        ]
    )
    assert table.lookup(ipaddress.ip_address("198.51.224.5")) is carved, "8,196 < 16,382"
    assert table.lookup(ipaddress.ip_address("198.51.200.5")) is slash18, "carved excepts it"
    older_30, newer_31 = network("older-30"), network("newer-31", order=1)
    table = CidrTable([(cidr("192.0.2.0/30"), older_30), (cidr("192.0.2.0/31"), newer_31)])
    assert table.lookup(ipaddress.ip_address("192.0.2.1")) is older_30, "2 and 2: the older"
    assert table.lookup(ipaddress.ip_address("192.0.2.2")) is older_30


V4_BLOCKS = st.builds(
    lambda address, length: ipaddress.ip_network((address & ~((1 << (32 - length)) - 1), length)),
    st.integers(0xC0000200, 0xC00002FF),
    st.integers(24, 32),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(V4_BLOCKS, st.lists(V4_BLOCKS, max_size=2)), min_size=1, max_size=8),
    st.integers(0xC0000200, 0xC00002FF),
)
def test_cidr_table_picks_what_a_scan_of_every_entry_picks(
    blocks: list[tuple[ipaddress.IPv4Network, list[ipaddress.IPv4Network]]], address: int
) -> None:
    """Whatever the prefixes and exceptions: the smallest covering entry as Linkerd counts
    it, then the older network, exactly as comparing every entry finds it."""
    entries = [
        (CidrRange(block, tuple(e for e in excepts if e.subnet_of(block) and e != block)), net)
        for order, (block, excepts) in enumerate(blocks)
        for net in [network(f"n{order}", order)]
    ]
    target = ipaddress.ip_address(address)

    def size(entry: CidrRange) -> int:
        def hosts(block: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
            return block.num_addresses - (2 if block.prefixlen < 31 else 0)

        return hosts(entry.cidr) - sum(hosts(excepted) for excepted in entry.excepts)

    covering = [(size(c), n.network.order, n) for c, n in entries if c.covers(target)]
    expected = min(covering, key=lambda found: found[:2])[2] if covering else None
    assert CidrTable(entries).lookup(target) is expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(V4_BLOCKS, st.lists(V4_BLOCKS, max_size=3)), max_size=6),
    V4_BLOCKS,
)
def test_address_spans_meet_a_block_as_a_scan_of_its_addresses_finds(
    blocks: list[tuple[ipaddress.IPv4Network, list[ipaddress.IPv4Network]]],
    block: ipaddress.IPv4Network,
) -> None:
    """Overlapping entries, nested and overlapping exceptions: the spans say a block meets
    them exactly when one of its addresses is in an entry and in none of its exceptions."""
    ranges = [
        CidrRange(entry, tuple(e for e in excepts if e.subnet_of(entry) and e != entry))
        for entry, excepts in blocks
    ]
    expected = any(entry.covers(address) for address in block for entry in ranges)
    assert AddressSpans(ranges).meets(block) is expected


def test_default_network_excludes_cluster_networks_per_family() -> None:
    text = (EXAMPLES / "linkerd-2-deny.yaml").read_text()
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings(namespace="egress-test"))
    for address, egress in [("2001:db8::5", True), ("fd00::5", False), ("100.64.0.1", False)]:
        destination = Destination(ipaddress.ip_address(address), 22)
        decision = index.decide_connection(ConnectionFacts(destination, Detected.OPAQUE, None))
        assert (decision.parent is not None) is egress


def test_linkerd_and_osm_in_one_file() -> None:
    linkerd_text = (EXAMPLES / "linkerd-3-httproute.yaml").read_text()
    osm_text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text()
    model = load_policy_text(linkerd_text + "\n---\n" + osm_text, "mixed.yaml")
    assert {n.id.kind for n in model.networks} == {"EgressNetwork", "MeshConfig"}
    facts = RequestFacts(
        Destination(ipaddress.ip_address("203.0.113.1"), 80),
        "httpbin.org",
        "GET",
        "/get",
        "",
        (),
        grpc=False,
    )
    linkerd_client = compile_policy(model, Settings(namespace="egress-test"))
    decision = linkerd_client.decide_request(facts)
    assert decision.parent is not None and decision.parent.kind == "EgressNetwork"
    osm_client = compile_policy(model, Settings(namespace="curl", service_account="curl"))
    decision = osm_client.decide_request(facts)
    assert decision.parent is not None and decision.parent.kind == "MeshConfig"
    assert decision.action == Action.PASS


INDEXES = [
    compile_policy(load_policy_text(path.read_text(), str(path)), Settings(namespace="egress-test"))
    for path in sorted(EXAMPLES.glob("*.yaml"))
]
HOSTNAMES = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", "example", "com", "httpbin", "org", "*", ""]), max_size=6).map(
        ".".join
    ),
)
ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def wire(max_size: int) -> st.SearchStrategy[str]:
    """Request text as the HTTP layers make it: any bytes, one character per byte."""
    return st.binary(max_size=max_size).map(lambda raw: raw.decode("latin-1"))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(INDEXES),
    ADDRESSES,
    st.integers(1, 65535),
    HOSTNAMES,
    wire(30),
    wire(20),
    st.lists(st.tuples(st.text(max_size=8), wire(8)), max_size=3),
    st.booleans(),
    st.sampled_from(list(Detected)),
    st.one_of(st.none(), wire(20)),
)
def test_decide_never_raises(
    index: PolicyIndex,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    hostname: str | None,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    grpc: bool,
    detected: Detected,
    authority: str | None,
) -> None:
    compiled = index
    destination = Destination(address, port)
    connection = compiled.decide_connection(ConnectionFacts(destination, detected, hostname))
    facts = RequestFacts(destination, hostname, "GET", path, query, tuple(headers), grpc, authority)
    request = compiled.decide_request(facts)
    for decision in (connection, request):
        assert (decision.parent is None) == (decision.route is None)
        assert (decision.action == Action.ROUTE) == (decision.backend is not None)
    compiled.port_protocol(destination)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(INDEXES),
    ADDRESSES,
    st.integers(1, 65535),
    HOSTNAMES,
    st.sampled_from(list(Detected)),
)
def test_a_remembered_connection_decision_is_the_one_made_anew(
    index: PolicyIndex,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    hostname: str | None,
    detected: Detected,
) -> None:
    """decide_connection answers repeated facts from memory: with the answers to facts
    that differ in one field remembered first, each is still its own."""
    destination = Destination(address, port)
    facts = ConnectionFacts(destination, detected, hostname)
    for other in (
        ConnectionFacts(destination, detected, None if hostname else "httpbin.org"),
        ConnectionFacts(destination, Detected.OPAQUE if detected is Detected.TLS else Detected.TLS,
                        hostname),
        ConnectionFacts(Destination(address, port % 65535 + 1), detected, hostname),
    ):  # fmt: skip
        index.decide_connection(other)
    remembered = index.decide_connection(facts)
    assert index.decide_connection(ConnectionFacts(destination, detected, hostname)) is remembered
    index.connection_decisions.clear()
    assert index.decide_connection(facts) == remembered


def test_connection_decisions_are_remembered_within_bounds() -> None:
    index = INDEXES[0]
    destination = Destination(ipaddress.ip_address("203.0.113.9"), 443)
    for number in range(MAX_MEMOISED_DECISIONS + 10):
        index.decide_connection(ConnectionFacts(destination, Detected.TLS, f"h{number}.example"))
    assert 0 < len(index.connection_decisions) <= MAX_MEMOISED_DECISIONS


MEMO_INDEXES = [
    compile_policy(load_policy_text((EXAMPLES / name).read_text(), name), settings)
    for name, settings in [
        ("native-1-allowlist.yaml", Settings()),  # methods, paths, a GRPC port
        ("linkerd-3-httproute.yaml", Settings()),
        ("osm-3-egress-policy.yaml", Settings(namespace="curl", service_account="curl")),
        ("osm-5-egress-routegroup.yaml", Settings(namespace="curl", service_account="curl")),
    ]
]
"""Policies whose decisions read each fact of a request's memo key."""
REQUEST_HOSTNAMES = st.sampled_from([None, "httpbin.org", "grpc.example.com"])
REQUEST_PATHS = st.sampled_from(
    ["/get", "/get/x", "/a;b", "/%2e%2e/get", "/helloworld.Greeter/SayHello"]
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(MEMO_INDEXES),
    st.sampled_from([ipaddress.ip_address("203.0.113.9"), ipaddress.ip_address("10.0.0.1")]),
    st.sampled_from([80, 50051]),
    REQUEST_HOSTNAMES,
    st.sampled_from(["GET", "POST"]),
    REQUEST_PATHS,
    st.lists(st.tuples(wire(6), st.lists(st.tuples(st.sampled_from(["x-a", "host"]), wire(6)),
                                        max_size=2).map(tuple)), min_size=1, max_size=3),
    st.booleans(),
    st.sampled_from([None, "httpbin.org", "httpbin.org:8080"]),
)  # fmt: skip
def test_a_remembered_request_decision_is_the_one_made_anew(
    index: PolicyIndex,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    hostname: str | None,
    method: str,
    path: str,
    variants: list[tuple[str, tuple[tuple[str, str], ...]]],
    grpc: bool,
    authority: str | None,
) -> None:
    """decide_request answers from memory by the facts a policy without header or query
    matches reads. With requests that differ from this one in one of those facts decided
    first, and whatever its query and headers, each gets the answer it gets decided anew."""
    destination = Destination(address, port)
    facts = RequestFacts(destination, hostname, method, path, "", (), grpc, authority)
    siblings = [
        facts._replace(destination=Destination(address, 80 if port != 80 else 50051)),
        facts._replace(hostname=None if hostname else "httpbin.org"),
        facts._replace(method="POST" if method == "GET" else "GET"),
        facts._replace(path="/get" if path != "/get" else "/post"),
        facts._replace(grpc=not grpc),
        facts._replace(authority=None if authority else "httpbin.org:8080"),
    ]
    for other in siblings:
        index.decide_request(other)
    for query, headers in variants:
        for asked in (facts, *siblings):
            asked = asked._replace(query=query, headers=headers)
            assert index.decide_request(asked) == index.decide_uncached_request(asked)


def test_a_policy_that_matches_a_query_or_header_decides_every_request_anew() -> None:
    policy = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{namespace: linkerd-egress, name: debug}}
spec:
  parentRefs: [{{name: all, kind: EgressNetwork, group: policy.linkerd.io, port: 80}}]
  rules:
  - matches: [{match}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {{namespace: linkerd-egress, name: all}}
spec: {{trafficPolicy: Deny}}
"""
    destination = Destination(ipaddress.ip_address("203.0.113.9"), 80)
    for match, allowed, denied in [
        ("{queryParams: [{name: debug, value: '1'}]}", ("debug=1", ()), ("debug=0", ())),
        ("{headers: [{name: x-debug, value: '1'}]}", ("", (("x-debug", "1"),)), ("", ())),
    ]:
        index = compile_policy(load_policy_text(policy.format(match=match), "p.yaml"), Settings())
        assert index.request_decisions is None
        assert index.reads_query == match.startswith("{queryParams")
        for (query, headers), action in [(allowed, Action.PASS), (denied, Action.DENY)] * 2:
            facts = RequestFacts(destination, "a.example", "GET", "/", query, headers, False)
            assert index.decide_request(facts).action == action, (match, query, headers)


def test_request_decisions_are_remembered_within_bounds() -> None:
    index = INDEXES[0]
    memo = index.request_decisions
    assert memo is not None
    destination = Destination(ipaddress.ip_address("203.0.113.9"), 80)
    for number in range(MAX_MEMOISED_DECISIONS + 10):
        facts = RequestFacts(destination, "a.example", "GET", f"/{number}", "", (), False)
        index.decide_request(facts)
    assert 0 < len(memo) <= MAX_MEMOISED_DECISIONS
    memo.clear()
    long_path = "/" + "a" * MAX_MEMOISED_REQUEST_TEXT
    index.decide_request(RequestFacts(destination, "a.example", "GET", long_path, "", (), False))
    assert not memo


PATH_RULES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: paths
spec:
  default: {default}
  rules:
  - hosts: [app.example.com]
    http:
    - pathPrefix: {prefix}
    action: {action}
"""


def path_action(default: str, prefix: str, action: str, path: str) -> Action:
    text = PATH_RULES.format(default=default, prefix=prefix, action=action)
    index = compile_policy(load_policy_text(text, "paths.yaml"), Settings())
    destination = Destination(ipaddress.ip_address("203.0.113.7"), 80)
    facts = RequestFacts(destination, "app.example.com", "GET", path, "", (), grpc=False)
    return index.decide_request(facts).action


def test_a_path_is_matched_as_a_server_resolves_it() -> None:
    """nginx serves /admin for each of these; none may get past a deny on /admin, nor
    into an allow on /public."""
    for path in ("/%61dmin", "//admin", "/./admin", "/x/../admin", "/admin%2Fx", "/%2e%2e/admin"):
        assert path_action("allow", "/admin", "deny", path) is Action.DENY, path
    for path in ("/public/../admin", "/public/%2e%2e/admin", "/public%2F..%2Fadmin"):
        assert path_action("deny", "/public", "allow", path) is Action.DENY, path
    assert path_action("deny", "/public", "allow", "/public/./a//b") is Action.PASS


def test_a_path_some_servers_read_otherwise_is_denied_if_either_reading_is() -> None:
    """Tomcat, Jetty and Spring drop `;parameters` from each segment, IIS reads `\\` as
    `/`: each of these is /admin to one of them."""
    for path in ("/admin;x", "/admin;x/secret", "/a/..;/admin", "/admin%3Bx", "/x\\..\\admin"):
        assert path_action("allow", "/admin", "deny", path) is Action.DENY, path
    for path in ("/public/..;/admin", "/public\\..\\admin", "/public/%2e%2e;/admin"):
        assert path_action("deny", "/public", "allow", path) is Action.DENY, path
    assert path_action("deny", "/public", "allow", "/public/a;v=1") is Action.PASS
    # no further than as written: a parameter does not open a rule the path misses
    assert path_action("deny", "/public", "allow", "/public;v=1/a") is Action.DENY
    assert path_action("allow", "/admin", "deny", "/ad;x/min") is Action.PASS


def test_a_path_with_dot_segments_is_denied_if_its_segments_as_written_are() -> None:
    """Express and Linkerd match a path before resolving its dot segments: to them
    `/admin/../public` is under /admin. It is denied where /admin is, and does not get into
    an allow on /public that only its resolved form matches."""
    for path in ("/admin/../public", "/admin/%2e%2e/public", "/admin//./x", "/admin/."):
        assert path_action("allow", "/admin", "deny", path) is Action.DENY, path
    for path in ("/admin/../public", "/x/./../public/a", "/%2e/public"):
        assert path_action("deny", "/public", "allow", path) is Action.DENY, path
    for path in ("/public/../public/a", "/public/./a", "/public/a/.."):
        assert path_action("deny", "/public", "allow", path) is Action.PASS, path


TWO_PATH_RULES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: paths
spec:
  default: {default}
  rules:
  - name: public
    http:
    - pathPrefix: /public
    action: allow
  - name: admin
    http:
    - pathPrefix: /admin
    action: deny
"""
PATH_INDEXES = {
    default: compile_policy(
        load_policy_text(TWO_PATH_RULES.format(default=default), "paths.yaml"), Settings()
    )
    for default in ("allow", "deny")
}


PATH_SEGMENTS = st.sampled_from(
    [
        "public",
        "admin",
        "a",
        "..",
        ".",
        "",
        "..;",
        "public;x",
        "admin;v=1",
        "%3Bx",
        "%2e%2e",
        "a\\..\\admin",
    ]
)


DECIDER_PATHS = st.one_of(
    REQUEST_PATHS,
    wire(24),
    st.lists(
        st.sampled_from(
            ["", "get", "a", ".", "..", "%2e", "%2F", ";x", "b\\c", "helloworld.Greeter"]
        ),
        max_size=4,
    ).map(lambda segments: "/" + "/".join(segments)),
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(INDEXES + MEMO_INDEXES + list(PATH_INDEXES.values())),
    st.builds(
        RequestFacts,
        st.builds(
            Destination,
            st.sampled_from([ipaddress.ip_address("203.0.113.9"), ipaddress.ip_address("10.0.0.1")])
            | ADDRESSES,
            st.sampled_from([80, 443, 8080, 50051]),
        ),
        REQUEST_HOSTNAMES | st.just("app.example.com"),
        st.sampled_from(["GET", "POST", "get"]),
        DECIDER_PATHS,
        wire(12),
        st.lists(
            st.tuples(st.sampled_from(["x-a", "host", "content-type"]), wire(6)), max_size=2
        ).map(tuple),
        st.booleans(),
        st.sampled_from([None, "httpbin.org", "httpbin.org:8080"]),
    ),
)
def test_a_connection_s_decider_decides_each_request_as_decide_request_does(
    index: PolicyIndex, facts: RequestFacts
) -> None:
    """Its shortcut (a port of HTTP rules alone, a path read one way) and the memo it
    shares with decide_request give the answer decide_uncached_request gives, the first
    time and from memory."""
    decider = RequestDecider(index, facts.destination)
    expected = index.decide_uncached_request(facts)
    for _ in range(2):
        assert decider.decide(*facts[1:]) == expected
        assert index.decide_request(facts) == expected


@pytest.mark.parametrize("default", sorted(PATH_INDEXES))
def test_a_decider_reads_a_path_every_way_decide_request_does(default: str) -> None:
    """Paths that one of decide_uncached_request's readings denies, and their plain kin."""
    index = PATH_INDEXES[default]
    destination = Destination(ipaddress.ip_address("203.0.113.7"), 80)
    decider = RequestDecider(index, destination)
    for path in (
        "/admin;v=1",
        "/admin%3Bx",
        "/x\\..\\admin",
        "/admin/../public",
        "//admin",
        "/%61dmin",
        "/public/..;/admin",
        "/public/a",
        "/admin",
    ):
        facts = RequestFacts(destination, "app.example.com", "GET", path, "", (), False)
        assert decider.decide(*facts[1:]) == index.decide_uncached_request(facts), path


@given(st.sampled_from(sorted(PATH_INDEXES)), st.lists(PATH_SEGMENTS, max_size=5))
def test_a_second_reading_only_ever_denies(default: str, segments: list[str]) -> None:
    """Deciding a path again as some servers read it turns the path's own decision into a
    deny or leaves it: nothing is let through that the path as written is not."""
    index = PATH_INDEXES[default]
    destination = Destination(ipaddress.ip_address("203.0.113.7"), 80)
    path = "/" + "/".join(segments)
    facts = RequestFacts(destination, "app.example.com", "GET", path, "", (), grpc=False)
    as_written = index._decide_normalized(facts._replace(path=normalized_path(facts.path)))
    decided = index.decide_request(facts)
    assert decided == as_written or decided.action is Action.DENY


@given(st.text(alphabet="/.%2eaF", max_size=24))
def test_a_normalised_path_has_no_dot_segments_or_empty_ones(text: str) -> None:
    path = normalized_path("/" + text)
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")[1:]
    assert "." not in segments and ".." not in segments


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a/b/.", "/a/b/"), ("/a/b/..", "/a/"), ("/a/./b", "/a/b"), ("/.", "/")],
)
def test_a_dot_segment_at_the_end_leaves_its_slash(path: str, expected: str) -> None:
    """RFC 3986 5.2.4: `/a/b/.` is the directory `/a/b/`, which a rule on the exact path
    `/a/b/` (or a prefix written with its slash) must still take, as the server reads it."""
    assert normalized_path(path) == expected


@pytest.mark.parametrize(
    ("authority", "port", "another"),
    [
        ("[2001:db8::1]", 80, False),
        ("[2001:db8::1]:80", 80, False),
        ("[2001:db8::1]:8080", 80, True),
        ("a.example", 80, False),
        ("a.example:80", 80, False),
    ],
)
def test_an_ipv6_literal_names_a_port_only_after_its_bracket(
    authority: str, port: int, another: bool
) -> None:
    """The colons inside `[2001:db8::1]` are the address's: read as a port, an IPv6 host
    without one would name another port, and OSM's Egress deny every request to it."""
    destination = Destination(ipaddress.ip_address("2001:db8::1"), port)
    facts = RequestFacts(destination, None, "GET", "/", "", (), grpc=False, authority=authority)
    assert names_another_port(facts) is another


INCLUSION_WITHIN_EXCLUSION = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec:
  traffic:
    enableEgress: false
    outboundIPRangeInclusionList: [203.0.113.0/24]
    outboundIPRangeExclusionList: [203.0.0.0/16]
"""


def test_an_excluded_block_holding_an_included_range_leaves_it_untouched() -> None:
    """The exclusion list leaves its addresses out of what the sidecar is given, those of
    the inclusion list among them: a range it holds whole is no egress the mesh decides,
    so the proxy passes it untouched (denying it, with egress off, would refuse what OSM never
    hands its sidecar)."""
    index = compile_policy(load_policy_text(INCLUSION_WITHIN_EXCLUSION, "p.yaml"), Settings())
    for address in ("203.0.113.5", "203.0.113.255"):
        destination = Destination(ipaddress.ip_address(address), 443)
        decision = index.decide_connection(ConnectionFacts(destination, Detected.OPAQUE, None))
        assert (decision.action, decision.parent, decision.route) == (Action.PASS, None, None)


SAME_SECOND_NETWORKS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: zeta, namespace: linkerd-egress, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {trafficPolicy: Allow, networks: [{cidr: 203.0.113.0/24}]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: alpha, namespace: linkerd-egress, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {trafficPolicy: Deny, networks: [{cidr: 203.0.113.0/24}]}
"""


def test_networks_created_in_the_same_second_are_ordered_by_name_not_by_file() -> None:
    """Linkerd orders networks of equal size by creationTimestamp, then namespace/name: the
    cluster has no document order, so the one written first (zeta, Allow) must not win over
    alpha (Deny), which Linkerd picks."""
    index = compile_policy(load_policy_text(SAME_SECOND_NETWORKS, "p.yaml"), Settings())
    destination = Destination(ipaddress.ip_address("203.0.113.5"), 5432)
    decision = index.decide_connection(ConnectionFacts(destination, Detected.OPAQUE, None))
    assert decision.parent is not None and decision.parent.name == "alpha"
    assert decision.action is Action.DENY


EQUAL_RULES_FOR_A_CALL = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p}}
spec:
  default: allow
  rules:
  - {{name: first-allow, hosts: [h.example], {matches}}}
  - {{name: second-deny, hosts: [h.example], {matches}, action: deny}}
  - {{name: grpc-other, hosts: [h.example], grpc: [{{service: other.Svc}}]}}
"""


@pytest.mark.parametrize(
    "matches",
    ["grpc: [{service: pkg.Svc}]", "http: [{pathPrefix: /pkg.Svc}]"],
    ids=["grpc-matches", "http-matches"],
)
def test_between_equal_rules_for_a_grpc_call_the_one_written_first_wins(matches: str) -> None:
    """As for an HTTP request (the README's rule): of two rules matching a call equally,
    gRPC matches or HTTP ones, the first written decides, not the last one seen."""
    text = EQUAL_RULES_FOR_A_CALL.format(matches=matches)
    index = compile_policy(load_policy_text(text, "p.yaml"), Settings())
    call = RequestFacts(
        Destination(ipaddress.ip_address("203.0.113.7"), 50051),
        "h.example",
        "POST",
        "/pkg.Svc/M",
        "",
        (("content-type", "application/grpc"),),
        grpc=True,
        authority="h.example:50051",
    )
    decision = index.decide_request(call)
    assert decision.route is not None and decision.route.name == "p.first-allow"
    assert decision.action is Action.PASS


def walked_best_http_rule(table: HttpRules, request: RequestFacts) -> CompiledRule | None:
    """Gateway API precedence as its words say it, by a walk over every rule and match of
    the most specific hostname level first: the best score, the first met of equals."""
    for level in table.levels(request.hostname):
        best: CompiledRule | None = None
        best_score: tuple[object, ...] = ()
        for rule in level:
            if not rule.covers(request.destination.ip):
                continue
            if rule.route.port_in_host_must_match and names_another_port(request):
                continue
            for match in rule.http or (DEFAULT_HTTP_MATCH,):
                score = match.score_for(request.path)
                query = parse_qsl(request.query, keep_blank_values=True, encoding="latin-1")
                if (best is None or score > best_score) and match.matches(request, query):
                    best, best_score = rule, score
        if best is not None:
            return best
        if any(rule.route.most_specific_host_only for rule in level):
            return None
    return None


RANKED_ROUTE = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{namespace: linkerd-egress, name: r{number}{created}}}
spec:
  parentRefs: [{{name: all, kind: EgressNetwork, group: policy.linkerd.io, port: 80}}]
  hostnames: {hostnames}
  rules: {rules}
"""
RANKED_PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/b/1", "/b/12"]
HTTP_MATCHES = st.fixed_dictionaries(
    {},
    optional={
        "path": st.one_of(
            st.builds(
                lambda kind, value: {"type": kind, "value": value},
                st.sampled_from(["Exact", "PathPrefix"]),
                st.sampled_from(["/", "/a", "/a/", "/a/b", "/b/1", "/a.b"]),
            ),
            st.builds(
                lambda value: {"type": "RegularExpression", "value": value},
                st.sampled_from(["/", "/a", "/a/", "/a/b", "/b/[0-9]+", "/a.*", ""]),
            ),
        ),
        "method": st.sampled_from(["GET", "POST"]),
        "headers": st.just([{"name": "x-a", "value": "1"}]),
        "queryParams": st.just([{"name": "q", "value": "1"}]),
    },
)
HTTP_ROUTES = st.lists(
    st.tuples(
        st.sampled_from([[], ["a.example"], ["*.example"]]),
        st.lists(st.lists(HTTP_MATCHES, max_size=3), min_size=1, max_size=3),
        st.sampled_from(["", "2026-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]),
    ),
    min_size=1,
    max_size=4,
)


def ranked_index(routes: list[tuple[list[str], list[list[dict[str, object]]], str]]) -> PolicyIndex:
    text = """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: linkerd-egress, name: all}
spec: {trafficPolicy: Deny}
"""
    for number, (hostnames, rules, created) in enumerate(routes):
        text += RANKED_ROUTE.format(
            number=number,
            created=f", creationTimestamp: '{created}'" if created else "",
            hostnames=json.dumps(hostnames),
            rules=json.dumps([{"matches": matches} for matches in rules]),
        )
    return compile_policy(load_policy_text(text, "ranked.yaml"), Settings())


@settings(max_examples=300, deadline=None)
@given(
    HTTP_ROUTES,
    st.lists(
        st.tuples(
            st.sampled_from([None, "a.example", "b.example"]),
            st.sampled_from(["GET", "POST"]),
            st.sampled_from(RANKED_PATHS),
            st.sampled_from(["", "q=1"]),
            st.sampled_from([(), (("x-a", "1"),)]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_a_ranked_level_picks_the_rule_a_walk_over_every_match_picks(
    routes: list[tuple[list[str], list[list[dict[str, object]]], str]],
    requests: list[tuple[str | None, str, str, str, tuple[tuple[str, str], ...]]],
) -> None:
    """best_http_rule holds a request against the matches its path can meet, best first:
    it picks what Gateway API precedence picks among every match of the level."""
    index = ranked_index(routes)
    destination = Destination(ipaddress.ip_address("203.0.113.9"), 80)
    network = index.network_for(destination)
    assert network is not None
    table = network.table(80).http
    for hostname, method, path, query, headers in requests:
        facts = RequestFacts(destination, hostname, method, path, query, headers, False)
        assert best_http_rule(table, facts) is walked_best_http_rule(table, facts), facts


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("osm-3-egress-policy.yaml", Settings(namespace="curl", service_account="curl")),
        ("osm-5-egress-routegroup.yaml", Settings(namespace="curl", service_account="curl")),
        ("native-1-allowlist.yaml", Settings()),
    ],
)
def test_ranked_levels_of_the_examples_pick_what_a_walk_picks(name: str, config: Settings) -> None:
    """The other dialects' rules too: OSM's (an authority's port, most specific host only),
    the native one's (addresses, methods)."""
    index = compile_policy(load_policy_text((EXAMPLES / name).read_text(), name), config)
    checked = 0
    for network in index.compiled.values():
        for table in (network.every_port, *network.ports.values()):
            for hostname, _ in table.http.entries():
                for address in ("203.0.113.9", "198.51.100.9"):
                    for path in ("/", "/get", "/get/x", "/headers", "/post", "/x"):
                        for method, authority in [("GET", None), ("POST", "h:8080")]:
                            destination = Destination(ipaddress.ip_address(address), 80)
                            facts = RequestFacts(
                                destination, hostname, method, path, "", (), False, authority
                            )
                            ranked = best_http_rule(table.http, facts)
                            assert ranked is walked_best_http_rule(table.http, facts), facts
                            checked += ranked is not None
    assert checked


@pytest.mark.parametrize("older", ["Regex", "Prefix"])
def test_a_regular_expression_and_a_prefix_of_one_score_go_to_the_older_route(
    older: str,
) -> None:
    """`/a.*` matching all of `/a` and the prefix `/a` both count two characters."""
    matches = {
        "Regex": [[{"path": {"type": "RegularExpression", "value": "/a.*"}}]],
        "Prefix": [[{"path": {"type": "PathPrefix", "value": "/a"}}]],
    }
    newer = "Prefix" if older == "Regex" else "Regex"
    index = ranked_index(
        [([], matches[older], "2025-01-01T00:00:00Z"), ([], matches[newer], "2026-01-01T00:00:00Z")]
    )
    destination = Destination(ipaddress.ip_address("203.0.113.9"), 80)
    network = index.network_for(destination)
    assert network is not None
    facts = RequestFacts(destination, "a.example", "GET", "/a", "", (), False)
    best = best_http_rule(network.table(80).http, facts)
    assert best is not None and best.route.ref.name == "r0"
    assert best is walked_best_http_rule(network.table(80).http, facts)
