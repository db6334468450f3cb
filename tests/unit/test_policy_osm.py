"""The OSM egress guide and Egress policy demo, step by step."""

from __future__ import annotations

import ipaddress
import json
import logging
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from egressproxy.policy.decision import (
    Action,
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
EXTERNAL = ipaddress.ip_address("198.51.100.20")
CURL = Settings(namespace="curl", service_account="curl")


def step(name: str, settings: Settings = CURL) -> PolicyIndex:
    return compile_policy(load_policy(EXAMPLES / name), settings)


def mesh(port: int) -> ParentRef:
    return ParentRef(
        "config.openservicemesh.io", "MeshConfig", "osm-system", "osm-mesh-config", str(port)
    )


def egress(name: str) -> RouteRef:
    return RouteRef("policy.openservicemesh.io", "Egress", "curl", name)


def http(index: PolicyIndex, host: str, path: str, port: int = 80) -> Decision:
    facts = RequestFacts(Destination(EXTERNAL, port), host, "GET", path, "", (), grpc=False)
    return index.decide_request(facts)


def tls(index: PolicyIndex, sni: str, port: int = 443) -> Decision:
    return index.decide_connection(ConnectionFacts(Destination(EXTERNAL, port), Detected.TLS, sni))


def test_mesh_wide_egress_enabled_passes_everything() -> None:
    index = step("osm-1-egress-enabled.yaml")
    decision = tls(index, "httpbin.org")
    assert (decision.action, decision.parent, decision.route) == (
        Action.PASS,
        mesh(443),
        RouteRef("", "default", "", "tcp-egress-allow"),
    )
    assert http(index, "example.com", "/").route == RouteRef("", "default", "", "http-egress-allow")


def test_mesh_wide_egress_disabled_denies() -> None:
    index = step("osm-2-egress-disabled.yaml")
    assert tls(index, "httpbin.org").action == Action.DENY
    assert http(index, "httpbin.org", "/get").route == RouteRef(
        "", "default", "", "http-egress-deny"
    )


def test_egress_policy_http_and_https() -> None:
    index = step("osm-3-egress-policy.yaml")
    allowed = http(index, "httpbin.org", "/get")
    assert (allowed.action, allowed.protocol, allowed.parent, allowed.route) == (
        Action.PASS,
        RouteProtocol.HTTP,
        mesh(80),
        egress("httpbin-80"),
    )
    assert http(index, "example.com", "/get").action == Action.DENY
    secure = tls(index, "httpbin.org")
    assert (secure.action, secure.protocol, secure.route) == (
        Action.PASS,
        RouteProtocol.TLS,
        egress("httpbin-443"),
    )
    other = tls(index, "github.com")
    assert (other.action, other.route) == (
        Action.DENY,
        RouteRef("", "default", "", "tls-egress-deny"),
    )
    assert http(index, "httpbin.org", "/get", port=8080).action == Action.DENY
    assert index.port_protocol(Destination(EXTERNAL, 443)) is None


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        (Settings(namespace="curl", service_account="curl"), True),
        (Settings(namespace="curl", service_account="other"), False),
        (Settings(namespace="other", service_account="curl"), False),
        (Settings(), True),
    ],
)
def test_sources_match_the_client_identity(settings: Settings, allowed: bool) -> None:
    index = step("osm-3-egress-policy.yaml", settings)
    assert (http(index, "httpbin.org", "/get").action == Action.PASS) is allowed


def test_tcp_egress_allows_any_host_on_the_port() -> None:
    index = step("osm-4-egress-tcp.yaml")
    for decision in (tls(index, "openservicemesh.io"), http(index, "anything", "/", port=443)):
        assert (decision.action, decision.route) == (Action.PASS, egress("tcp-443"))
    assert tls(index, "openservicemesh.io", port=8443).action == Action.DENY


def test_http_route_group_matches() -> None:
    index = step("osm-5-egress-routegroup.yaml")
    assert http(index, "httpbin.org", "/get").action == Action.PASS
    assert http(index, "httpbin.org", "/status/200").action == Action.PASS
    assert http(index, "httpbin.org", "/ip").action == Action.DENY
    assert http(index, "example.com", "/get").action == Action.DENY


def test_ip_addresses_restrict_tcp_egress() -> None:
    text = (
        (EXAMPLES / "osm-4-egress-tcp.yaml")
        .read_text()
        .replace("  ports:\n", "  ipAddresses:\n  - 198.51.100.0/24\n  ports:\n")
    )
    index = compile_policy(load_policy_text(text, "p.yaml"), CURL)
    assert tls(index, "a").action == Action.PASS
    outside = ConnectionFacts(
        Destination(ipaddress.ip_address("203.0.113.1"), 443), Detected.TLS, "a"
    )
    assert index.decide_connection(outside).action == Action.DENY


def test_ip_addresses_the_mesh_never_takes_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A VPC database at 10.1.0.0/16 is inside the default --cluster-networks: the
    Egress for it never decides its traffic, which is not egress here."""
    text = (
        (EXAMPLES / "osm-4-egress-tcp.yaml")
        .read_text()
        .replace("  ports:\n", "  ipAddresses:\n  - 10.1.0.0/16\n  - 198.51.100.0/24\n  ports:\n")
    )
    with caplog.at_level(logging.WARNING):
        compile_policy(load_policy_text(text, "p.yaml"), CURL)
    [warning] = caplog.messages
    assert warning.startswith("p.yaml:")
    assert ": Egress curl/tcp-443: 10.1.0.0/16 is outside every address MeshConfig" in warning


MESH_CONFIG_WITHOUT_ENABLE_EGRESS = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{name: osm-mesh-config, namespace: osm-system}}
spec:
{spec}
"""


@pytest.mark.parametrize(
    "spec",
    ["  traffic: {}", "  {}", "  traffic: {enableEgress: false}"],
    ids=["empty-traffic", "empty-spec", "written-false"],
)
def test_a_mesh_config_without_enable_egress_is_egress_disabled(spec: str) -> None:
    """OSM reads the MeshConfig into a Go struct: enableEgress left out is false, egress
    disabled, and every destination without an Egress policy is denied, not passed."""
    text = MESH_CONFIG_WITHOUT_ENABLE_EGRESS.format(spec=spec)
    index = compile_policy(load_policy_text(text, "p.yaml"), CURL)
    decision = tls(index, "httpbin.org")
    assert (decision.action, decision.parent, decision.route) == (
        Action.DENY,
        mesh(443),
        RouteRef("", "default", "", "tcp-egress-deny"),
    )


def test_egress_without_mesh_config_is_egress_disabled() -> None:
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text().split("---", 1)[1]
    index = compile_policy(load_policy_text(text, "p.yaml"), CURL)
    assert http(index, "httpbin.org", "/get").action == Action.PASS
    denied = http(index, "example.com", "/")
    assert (denied.action, denied.parent) == (Action.DENY, mesh(80))


def test_osm_errors() -> None:
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    broken = text.replace("    name: egress-http-route\n", "    name: missing\n")
    broken = broken.replace("protocol: http\n", "protocol: smtp\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(broken, "p.yaml")
    reasons = [problem.reason for problem in caught.value.problems]
    assert len(reasons) == 2
    assert "'smtp' is not one of http, https, tcp, tcp-server-first" in reasons[0]
    assert "HTTPRouteGroup curl/missing does not exist in this policy" in reasons[1]


OSM_HTTP_EGRESS = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata:
  name: osm-mesh-config
  namespace: osm-system
spec:
  traffic:
    enableEgress: false
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata:
  name: http-80
  namespace: curl
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: curl
  {hosts}
  ports:
  - number: 80
    protocol: http
  {matches}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: nothing
  namespace: curl
spec:
  matches: []
"""


NAMES_EMPTY_GROUP = (
    "matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: nothing}]"
)


@pytest.mark.parametrize(
    ("hosts", "matches"), [("", ""), ("hosts: [httpbin.org]", NAMES_EMPTY_GROUP)]
)
def test_an_http_egress_without_hosts_or_route_matches_allows_nothing(
    hosts: str, matches: str
) -> None:
    """OSM builds an http port's routes per host and per HTTPRouteGroup match; with no
    host, or groups without matches, Envoy gets a route configuration without routes."""
    text = OSM_HTTP_EGRESS.format(hosts=hosts, matches=matches)
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    assert http(index, "httpbin.org", "/get").action is Action.DENY
    assert http(index, "anything.example", "/").action is Action.DENY


WILDCARD_AND_EXACT = """\
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata:
  name: {name}
  namespace: curl
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: curl
  hosts: [{host}]
  ports:
  - number: 80
    protocol: http
  {matches}
"""
ONLY_GET = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: only-get
  namespace: curl
spec:
  matches:
  - name: get
    pathRegex: /get
    methods: [GET]
"""


def test_the_most_specific_egress_host_alone_decides_a_request() -> None:
    """OSM gives every Egress host its own Envoy virtual host, and Envoy routes a request
    by the most specific one: what api.example.com's Egress does not allow is denied
    even though a *.example.com Egress allows every request."""
    text = "---\n".join(
        [
            WILDCARD_AND_EXACT.format(name="everything", host='"*.example.com"', matches=""),
            WILDCARD_AND_EXACT.format(
                name="api-get",
                host="api.example.com",
                matches="matches: [{apiGroup: specs.smi-spec.io/v1alpha4, "
                "kind: HTTPRouteGroup, name: only-get}]",
            ),
            ONLY_GET,
        ]
    )
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    assert http(index, "api.example.com", "/get").route == egress("api-get")
    denied = http(index, "api.example.com", "/delete")
    assert (denied.action, denied.route.kind) == (Action.DENY, "default")
    assert http(index, "www.example.com", "/delete").route == egress("everything")


@pytest.mark.parametrize(
    ("match", "allowed"),
    [
        ("pathRegex: ''", []),
        ("headers: {x-debug: ''}", ["/get empty", "/x empty"]),
    ],
)
def test_an_empty_regular_expression_of_a_route_group_matches_only_empty_text(
    match: str, allowed: list[str]
) -> None:
    """Envoy matches a regular expression against the whole path or value: `''` takes no
    path and only a header sent empty. Read as false, it was dropped, and the match
    took every path or any value of the header."""
    group = ONLY_GET.replace("pathRegex: /get\n    methods: [GET]", match)
    matches = (
        "matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: only-get}]"
    )
    text = "---\n".join(
        [WILDCARD_AND_EXACT.format(name="api", host="api.example.com", matches=matches), group]
    )
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    passed = []
    for path in ("/get", "/x"):
        for name, headers in (("empty", (("x-debug", ""),)), ("set", (("x-debug", "1"),))):
            facts = RequestFacts(
                Destination(EXTERNAL, 80), "api.example.com", "GET", path, "", headers, grpc=False
            )
            if index.decide_request(facts).action == Action.PASS:
                passed.append(f"{path} {name}")
    assert passed == allowed


def test_route_group_methods_are_the_crds_upper_case_values() -> None:
    """Envoy matches OSM's :method header exactly, and the CRD admits only upper-case
    methods: `get` is an error at its line rather than a rule that matches GET."""
    lower = ONLY_GET.replace("methods: [GET]", "methods: [get]")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(lower, "osm.yaml")
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            10,
            "HTTPRouteGroup curl/only-get.spec.matches[0].methods: 'get' is not one of *, "
            "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH "
            "(the HTTPRouteGroup CRD's values)",
        )
    ]


@pytest.mark.parametrize("settings", [CURL, Settings()])
def test_an_egress_with_no_sources_applies_to_no_client(settings: Settings) -> None:
    """OSM lists a client's Egresses by the sources that name it: `sources: []` names no
    client, so it allows nothing (it does not apply to every client)."""
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text()
    no_sources = text.replace(
        "  sources:\n  - kind: ServiceAccount\n    name: curl\n    namespace: curl\n",
        "  sources: []\n",
    )
    assert no_sources.count("sources: []") == 2
    index = compile_policy(load_policy_text(no_sources, "p.yaml"), settings)
    assert http(index, "httpbin.org", "/get").action is Action.DENY
    assert tls(index, "httpbin.org").action is Action.DENY


@pytest.mark.parametrize(
    ("match", "reason"),
    [
        (
            "{kind: HTTPRouteGroup, name: egress-http-route}",
            "Egress curl/httpbin-80.spec.matches[0]: missing required field 'apiGroup'",
        ),
        (
            "{apiGroup: specs.smi-spec.io/v1alpha3, kind: HTTPRouteGroup, name: egress-http-route}",
            "Egress curl/httpbin-80.spec.matches[0].apiGroup: 'specs.smi-spec.io/v1alpha3' is "
            "not one of specs.smi-spec.io/v1alpha4, policy.openservicemesh.io/v1alpha1",
        ),
        (
            "{apiGroup: policy.openservicemesh.io/v1alpha1, kind: HTTPRouteGroup, name: x}",
            "Egress curl/httpbin-80.spec.matches[0].kind: expected UpstreamTrafficSetting for "
            "apiGroup policy.openservicemesh.io/v1alpha1, got 'HTTPRouteGroup'",
        ),
    ],
    ids=["no-apiGroup", "other-smi-version", "kind-of-another-group"],
)
def test_egress_matches_are_checked_as_osms_admission_webhook_does(match: str, reason: str) -> None:
    """The CRD requires apiGroup, kind and name; OSM's webhook admits HTTPRouteGroup of
    specs.smi-spec.io/v1alpha4 and at most one UpstreamTrafficSetting of
    policy.openservicemesh.io/v1alpha1, and rejects anything else."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    start = text.index("  matches:\n  - apiGroup")
    broken = text[:start] + f"  matches: [{match}]\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(broken, "p.yaml")
    assert [problem.reason for problem in caught.value.problems] == [reason]
    assert caught.value.problems[0].line == broken.count("\n")


@pytest.mark.parametrize("kind", ["Egress", "HTTPRouteGroup"])
def test_an_egress_or_route_group_given_twice_is_the_last_one(kind: str) -> None:
    """The API server holds one object per namespace and name, and `kubectl apply` of a
    file naming one twice keeps the last: egressproxy applied both Egresses once (the first
    one's hosts stayed allowed) and silently dropped the first HTTPRouteGroup's matches,
    then refused the file. The last one is used, in the first one's place."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    documents = text.split("---\n")
    again = next(document for document in documents if f"kind: {kind}\n" in document)
    changed = again.replace("httpbin.org", "example.com").replace(
        "pathRegex: /get", "pathRegex: /delete"
    )
    first = load_policy_text(text, "p.yaml")
    last = load_policy_text(text + "---\n" + changed, "p.yaml")
    assert len(last.routes) == len(first.routes) == 1
    route = last.routes[0]
    hosts = ("example.com",) if kind == "Egress" else ("httpbin.org",)
    paths = {match.path.value for rule in route.rules for match in rule.http_matches if match.path}
    assert (route.hostnames, route.order) == (hosts, first.routes[0].order)
    assert ("/delete" if kind == "HTTPRouteGroup" else "/get") in paths, paths


UPSTREAM_TRAFFIC_SETTING = (
    "{apiGroup: policy.openservicemesh.io/v1alpha1, kind: UpstreamTrafficSetting, name: limits}"
)


@pytest.mark.parametrize(
    "matches",
    [
        f"[{UPSTREAM_TRAFFIC_SETTING}]",
        "[{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: egress-http-route}"
        f", {UPSTREAM_TRAFFIC_SETTING}]",
    ],
    ids=["alone", "beside-a-route-group"],
)
def test_an_upstream_traffic_setting_match_is_refused_not_ignored(matches: str) -> None:
    """OSM applies an UpstreamTrafficSetting's connectionSettings (connect timeout, maximum
    connections, HTTP circuit breaking) to the Egress's clusters, and ignores the whole
    Egress when the setting does not exist. egressproxy does neither, so the match is an
    error at its line rather than limits that silently do not hold."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    start = text.index("  matches:\n  - apiGroup")
    policy = text[:start] + f"  matches: {matches}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(policy, "p.yaml")
    index = matches.count("HTTPRouteGroup")
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            policy.count("\n"),
            f"Egress curl/httpbin-80.spec.matches[{index}]: UpstreamTrafficSetting curl/limits "
            "is not supported: OSM applies its connectionSettings (tcp connectTimeout and "
            "maxConnections, http maxRequests, maxPendingRequests, maxRequestsPerConnection "
            "and maxRetries) to the Egress's upstream clusters, and ignores the whole Egress "
            "when it does not exist; egressproxy enforces none of them. Remove the match "
            "(--connect-timeout sets the connect timeout for every destination)",
        )
    ]


@pytest.mark.parametrize("address", ["198.51.100.7", "2001:db8::/32", "198.51.100.0/24 x"])
def test_egress_ip_addresses_are_ipv4_cidrs_as_the_crd_admits(address: str) -> None:
    """The Egress CRD's pattern for ipAddresses is a.b.c.d/n: the API server refuses a
    bare address or an IPv6 range, and so does the loader, at the entry's line."""
    text = (
        (EXAMPLES / "osm-4-egress-tcp.yaml")
        .read_text()
        .replace("  ports:\n", f"  ipAddresses:\n  - {address}\n  ports:\n")
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    line = text.splitlines().index(f"  - {address}") + 1
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            line,
            f"Egress curl/tcp-443.spec.ipAddresses: {address!r} is not an IPv4 CIDR a.b.c.d/n "
            "(the Egress CRD's)",
        )
    ]


def test_mesh_wide_egress_leaves_egress_policies_unapplied() -> None:
    """OSM's catalog returns no Egress policy when enableEgress is true: everything is the
    passthrough's, counted under http-egress-allow / tcp-egress-allow, not an Egress."""
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text()
    enabled = text.replace("enableEgress: false", "enableEgress: true")
    model = load_policy_text(enabled, "p.yaml")
    assert model.routes == ()
    index = compile_policy(model, CURL)
    assert http(index, "httpbin.org", "/get").route == RouteRef(
        "", "default", "", "http-egress-allow"
    )
    assert (tls(index, "httpbin.org").action, tls(index, "httpbin.org").route) == (
        Action.PASS,
        RouteRef("", "default", "", "tcp-egress-allow"),
    )


def test_egress_port_protocols_are_lower_case() -> None:
    """OSM's listener compares a port's protocol with `http`, `https`, `tcp` as written:
    `HTTP` gets no filter chain there (its traffic goes to the default), so it is an
    error at its line rather than a port that allows HTTP."""
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text()
    upper = text.replace("protocol: http\n", "protocol: HTTP\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(upper, "p.yaml")
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            upper.splitlines().index("    protocol: HTTP") + 1,
            "Egress curl/httpbin-80.spec.ports[0].protocol: 'HTTP' is not one of http, https, "
            "tcp, tcp-server-first (lower case: OSM's listener builds a filter chain for no "
            "other spelling)",
        )
    ]


def test_an_ipv4_egress_host_matches_the_host_header_and_warns_on_https(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OSM admits any string in hosts: on an http port Envoy matches an IPv4 one against the
    Host header, so it stays valid; on an https port it can never match (SNI is never an
    address, RFC 6066 3), which a warning at its line says."""
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text().replace("httpbin.org", "203.0.113.9")
    with caplog.at_level("WARNING", logger="egressproxy.policy.osm"):
        index = compile_policy(load_policy_text(text, "p.yaml"), CURL)
    assert http(index, "203.0.113.9", "/get").route == egress("httpbin-80")
    https_line = (
        text.splitlines().index("  - 203.0.113.9", text.count("\n", 0, text.index("httpbin-443")))
        + 1
    )
    assert [record.getMessage() for record in caplog.records] == [
        f"p.yaml:{https_line}: Egress curl/httpbin-443.spec.hosts: '203.0.113.9' never matches "
        "on https ports (SNI never carries an address); match addresses with ipAddresses on a "
        "tcp port"
    ]


def test_an_idn_egress_host_hints_at_its_idna_form() -> None:
    text = (
        (EXAMPLES / "osm-3-egress-policy.yaml").read_text().replace("httpbin.org", "bücher.example")
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    assert caught.value.problems[0].reason == (
        "Egress curl/httpbin-80.spec.hosts: 'bücher.example' is not a valid hostname "
        "(an internationalised name: write its IDNA form 'xn--bcher-kva.example')"
    )


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        (
            "httpbin.org:80",
            "a hostname carries no port: write 'httpbin.org' and match the port on its own",
        ),
        ("httpbin.*", "a wildcard is only a whole first label, as in '*.example.com'"),
        ("*bin.org", "a wildcard is only a whole first label, as in '*.example.com'"),
    ],
)
def test_a_refused_egress_host_says_what_it_was_meant_to_be(
    host: str, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that is a name with a port, or a partial wildcard, is refused with what to
    write instead, and without the info line that the Egress has no hosts: it has one, the
    refused one."""
    text = (
        (EXAMPLES / "osm-3-egress-policy.yaml")
        .read_text()
        .replace("  - httpbin.org", f"  - {host!r}", 1)
    )
    with (
        caplog.at_level("INFO", logger="egressproxy.policy.osm"),
        pytest.raises(PolicyError) as caught,
    ):
        load_policy_text(text, "p.yaml")
    assert [problem.reason for problem in caught.value.problems] == [
        f"Egress curl/httpbin-80.spec.hosts: {host!r} is not a valid hostname ({hint})"
    ]
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.parametrize("header", ["x team", "x-team:"])
def test_route_group_header_names_are_tokens(header: str) -> None:
    """SMI HTTPRouteGroup headers map a name to a regex: the value is a regex, the name a
    header name, and one with a space or `:` never matches (Envoy's header matcher)."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    start = text.index("  - name: status")
    broken = text[:start] + f'    headers: {{"{header}": ".*"}}\n' + text[start:]
    with pytest.raises(PolicyError) as caught:
        load_policy_text(broken, "p.yaml")
    assert [problem.reason for problem in caught.value.problems] == [
        f"HTTPRouteGroup curl/egress-http-route.spec.matches[0].headers: {header!r} is not a "
        "header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    ]


@pytest.mark.parametrize(
    "listed", ['    - x-team: ".*"\n', '    - name: x-team\n      value: ".*"\n']
)
def test_route_group_headers_as_a_list_say_what_smi_takes(listed: str) -> None:
    """SMI's headers are a mapping: a list (Gateway API's form, or a list of one-entry
    mappings) is refused once, at its line, with the form to write."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    start = text.index("  - name: status")
    broken = text[:start] + "    headers:\n" + listed + text[start:]
    with pytest.raises(PolicyError) as caught:
        load_policy_text(broken, "p.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        f"p.yaml:{text.count(chr(10), 0, start) + 1}: HTTPRouteGroup "
        "curl/egress-http-route.spec.matches[0].headers: expected a mapping of each header "
        "name to a regular expression (`headers: {user-agent: '.*Android.*'}`), got a list"
    ]


def request_to(index: PolicyIndex, authority: str, port: int = 80, path: str = "/get") -> Decision:
    """A request as the data plane sees it: the authority as sent, its host lower-cased."""
    hostname = authority.rpartition(":")[0] if ":" in authority else authority
    facts = RequestFacts(
        Destination(EXTERNAL, port),
        hostname.lower(),
        "GET",
        path,
        "",
        (),
        grpc=False,
        authority=authority,
    )
    return index.decide_request(facts)


DENIED = RouteRef("", "default", "", "http-egress-deny")


@pytest.mark.parametrize(
    ("authority", "route"),
    [
        ("httpbin.org", egress("httpbin-80")),
        ("httpbin.org:80", egress("httpbin-80")),
        ("HTTPBIN.ORG:80", egress("httpbin-80")),
        ("httpbin.org:8080", DENIED),
        ("httpbin.org:080", DENIED),
        ("httpbin.org:", DENIED),
    ],
)
def test_an_http_egress_takes_its_host_alone_or_with_its_own_port(
    authority: str, route: RouteRef
) -> None:
    """OSM gives an Egress host on http port 80 the Envoy virtual host domains httpbin.org
    and httpbin.org:80 (pkg/catalog/egress.go buildHTTPRouteConfigs), and its listener
    strips no port: `Host: httpbin.org:8080` matches no virtual host, so it is denied as
    a host no Egress lists is. Envoy compares the domain as text, `:080` included."""
    decision = request_to(step("osm-3-egress-policy.yaml"), authority)
    assert (decision.action, decision.route) == (
        Action.PASS if route == egress("httpbin-80") else Action.DENY,
        route,
    )


def test_the_port_a_host_may_name_is_its_egress_port_for_wildcards_and_addresses() -> None:
    """The port is the Egress port the request came to: on 8080, `:8080` matches and `:80`
    does not; a wildcard host and an IPv4 host are domains with the port as well."""
    text = "---\n".join(
        WILDCARD_AND_EXACT.format(name=name, host=host, matches="").replace(
            "number: 80", "number: 8080"
        )
        for name, host in [("wildcard", '"*.example.com"'), ("address", "192.0.2.7")]
    )
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    for authority, route in [
        ("api.example.com:8080", egress("wildcard")),
        ("api.example.com", egress("wildcard")),
        ("api.example.com:80", DENIED),
        ("192.0.2.7:8080", egress("address")),
        ("192.0.2.7:80", DENIED),
    ]:
        assert request_to(index, authority, port=8080).route == route, authority


def test_gateway_api_and_native_hostnames_match_whatever_port_the_host_names() -> None:
    """Only OSM's Envoy domains carry the port: a Linkerd HTTPRoute hostname and a native
    host rule take `httpbin.org:8080` on port 80 as they take `httpbin.org`."""
    linkerd = step("linkerd-3-httproute.yaml", Settings(namespace="egress-test"))
    decision = request_to(linkerd, "httpbin.org:8080")
    assert (decision.action, decision.route.kind) == (Action.PASS, "HTTPRoute")
    native = compile_policy(
        load_policy_text(
            "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: t}\n"
            "spec:\n  default: deny\n  rules:\n  - {name: bin, hosts: [httpbin.org], "
            "action: allow}\n",
            "native.yaml",
        ),
        Settings(),
    )
    assert request_to(native, "httpbin.org:8080").action == Action.PASS


@pytest.mark.parametrize("name", ["host", "Host", "HOST"])
def test_a_host_header_match_reads_the_authority_as_envoy_does(name: str) -> None:
    """OSM turns an HTTPRouteGroup `host` header match into Envoy's `:authority` (pkg/envoy/
    rds/route getHeadersForRoute): the Host of an HTTP/1 request and the :authority of an
    HTTP/2 one, which carries no `host` header. Any other spelling OSM passes on as a
    header matcher of that name, which Envoy lower-cases (HeaderData's LowerCaseString)
    and looks up in a request's header map, where `host` is the :authority entry
    (header_map_impl.cc maps the legacy host header to it): the same match. Its regex
    sees the port as sent."""
    group = ONLY_GET.replace("methods: [GET]", f'headers: {{{name}: "httpbin\\\\.org(:80)?"}}')
    text = "---\n".join(
        [
            WILDCARD_AND_EXACT.format(
                name="bin",
                host="httpbin.org",
                matches="matches: [{apiGroup: specs.smi-spec.io/v1alpha4, "
                "kind: HTTPRouteGroup, name: only-get}]",
            ),
            group,
        ]
    )
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    assert request_to(index, "httpbin.org").route == egress("bin")
    assert request_to(index, "httpbin.org:80").route == egress("bin")
    assert request_to(index, "HTTPBIN.org").route == DENIED


def with_feature_flags(flags: str, example: str = "osm-3-egress-policy.yaml") -> str:
    """The example with `featureFlags: FLAGS` in its MeshConfig's spec."""
    text = (EXAMPLES / example).read_text()
    return text.replace(
        "    enableEgress: false\n", f"    enableEgress: false\n  featureFlags: {flags}\n"
    )


def routes_off(index: PolicyIndex) -> list[object]:
    """Each network's routes_off as /config shows it."""
    networks = index.describe()["networks"]
    assert isinstance(networks, list)
    return [network["routes_off"] for network in networks]


def test_the_egress_policy_feature_flag_off_leaves_egress_policies_unapplied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OSM v1.1/v1.2 gate the Egress API on featureFlags.enableEgressPolicy: false, the
    catalog's GetEgressTrafficPolicy returns nothing and the listener builds no Egress
    filter chain, so with enableEgress false an Egress-allowed host is denied. One info line
    at the flag says so; /config and --explain carry why (the network's routes_off)."""
    text = with_feature_flags("{enableEgressPolicy: false, enableWASMStats: true}")
    with caplog.at_level("INFO", logger="egressproxy.policy.osm"):
        model = load_policy_text(text, "p.yaml")
    flags = "  featureFlags: {enableEgressPolicy: false, enableWASMStats: true}"
    flag_line = text.splitlines().index(flags) + 1
    assert model.routes == ()
    assert [record.getMessage() for record in caplog.records] == [
        f"p.yaml:{flag_line}: MeshConfig osm-system/osm-mesh-config: "
        "featureFlags.enableEgressPolicy is false: its 2 Egress policies are not applied"
    ]
    index = compile_policy(model, CURL)
    denied = http(index, "httpbin.org", "/get")
    assert (denied.action, denied.route) == (Action.DENY, DENIED)
    off = f"Egress policies are off: featureFlags.enableEgressPolicy is false at p.yaml:{flag_line}"
    assert denied.reason.endswith(f"default Deny ({off})")
    assert tls(index, "httpbin.org").action == Action.DENY
    assert routes_off(index) == [off]


@pytest.mark.parametrize("flags", ["{enableEgressPolicy: true}", "{}", "{enableEgressPolicy: }"])
def test_the_egress_policy_feature_flag_on_or_absent_applies_egress_policies(flags: str) -> None:
    """`osm install` writes enableEgressPolicy: true (the chart's default) and the guide's
    `kubectl patch --type=merge` keeps it: a MeshConfig that does not set it is that one."""
    index = compile_policy(load_policy_text(with_feature_flags(flags), "p.yaml"), CURL)
    allowed = http(index, "httpbin.org", "/get")
    assert (allowed.action, allowed.route) == (Action.PASS, egress("httpbin-80"))
    assert routes_off(index) == [None]


def test_feature_flags_are_osms_booleans_and_no_others() -> None:
    """The MeshConfig CRD's featureFlags (v1alpha1..v1alpha3) are eight booleans: each is
    accepted, a wrong type or an unknown flag is an error at its line."""
    known = (
        "{enableWASMStats: false, enableEgressPolicy: true, enableMulticlusterMode: false, "
        "enableSnapshotCacheMode: false, enableAsyncProxyServiceMapping: false, "
        "enableIngressBackendPolicy: true, enableEnvoyActiveHealthChecks: false, "
        "enableRetryPolicy: false}"
    )
    assert len(load_policy_text(with_feature_flags(known), "p.yaml").routes) == 2
    text = with_feature_flags(
        "\n    enableEgressPolicy: 'false'\n    enableRetryPolicy: 1\n    enableEgres: true"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    lines = text.splitlines()
    where = "MeshConfig osm-system/osm-mesh-config.spec.featureFlags"
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            lines.index("    enableEgressPolicy: 'false'") + 1,
            f"{where}.enableEgressPolicy: expected true or false, got the string 'false'",
        ),
        (
            lines.index("    enableRetryPolicy: 1") + 1,
            f"{where}.enableRetryPolicy: expected true or false, got int 1",
        ),
        (lines.index("    enableEgres: true") + 1, f"{where}: unknown field 'enableEgres'"),
    ]
    listed = with_feature_flags("[enableEgressPolicy]")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(listed, "p.yaml")
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (
            listed.splitlines().index("  featureFlags: [enableEgressPolicy]") + 1,
            f"{where}: expected a mapping, got a list",
        )
    ]


def test_egress_policies_are_validated_with_the_feature_flag_off() -> None:
    """OSM's validating webhook registers its Egress validator whatever the flag (pkg/
    validator/server.go), and the API server applies the Egress CRD's schema: a policy
    left unapplied by the flag is still checked, as one under enableEgress: true is, and
    every problem, the MeshConfig's included, is reported in one pass."""
    text = with_feature_flags(
        "{enableEgressPolicy: false, enableRetryPolicy: 'no'}", "osm-5-egress-routegroup.yaml"
    )
    broken = text.replace("    name: egress-http-route\n", "    name: missing\n")
    broken = broken.replace("protocol: http\n", "protocol: smtp\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(broken, "p.yaml")
    reasons = [problem.reason for problem in caught.value.problems]
    assert len(reasons) == 3
    assert "featureFlags.enableRetryPolicy: expected true or false" in reasons[0]
    assert "'smtp' is not one of http, https, tcp, tcp-server-first" in reasons[1]
    assert "HTTPRouteGroup curl/missing does not exist in this policy" in reasons[2]


MESH_EGRESS_OFF = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec:
  traffic: {enableEgress: false}
"""
ONE_EGRESS = """\
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: {name}, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  hosts: [{hosts}]
  ipAddresses: [{addresses}]
  ports: [{{number: {port}, protocol: {protocol}}}]
"""
LISTED = IPv4Address("198.51.100.20")
"""Inside the ipAddresses the tables below give (198.51.100.0/24)."""
UNLISTED = IPv4Address("203.0.113.1")


def egresses(*specs: tuple[str, str, str, int, str]) -> PolicyIndex:
    """A MeshConfig with egress off and one Egress per (name, hosts, addresses, port,
    protocol)."""
    text = MESH_EGRESS_OFF + "".join(
        ONE_EGRESS.format(name=name, hosts=hosts, addresses=addresses, port=port, protocol=kind)
        for name, hosts, addresses, port, kind in specs
    )
    return compile_policy(load_policy_text(text, "osm.yaml"), CURL)


def envoy_picks(
    policy: tuple[tuple[str, str, str, int, str], ...],
    detected: Detected,
    address: IPv4Address,
    sni: str | None,
) -> RouteRef:
    """The route (an Egress, or a default denying) a connection, or a plaintext HTTP
    request for bar.com, gets on the port of the policy's Egresses."""
    index = egresses(*policy)
    destination = Destination(address, policy[0][3])
    if detected is Detected.HTTP1:
        facts = RequestFacts(destination, "bar.com", "GET", "/", "", (), grpc=False)
        decision = index.decide_request(facts)
    else:
        decision = index.decide_connection(ConnectionFacts(destination, detected, sni))
    assert decision.route is not None
    assert (decision.action is Action.PASS) == (decision.route.kind == "Egress")
    return decision.route


HTTP_FOO = ("http-foo", "foo.com", "", 80, "http")
TCP_80 = ("tcp-80", "", "", 80, "tcp")
TCP_80_LISTED = ("tcp-80", "", "198.51.100.0/24", 80, "tcp")
HTTPS_FOO_LISTED = ("https-foo", "foo.com", "198.51.100.0/24", 443, "https")
HTTPS_FOO = ("https-foo", "foo.com", "", 443, "https")
TCP_443 = ("tcp-443", "", "", 443, "tcp")
TCP_443_LISTED = ("tcp-443", "", "198.51.100.0/24", 443, "tcp")
TLS_DENIED = RouteRef("", "default", "", "tls-egress-deny")
TCP_DENIED = RouteRef("", "default", "", "tcp-egress-deny")


@pytest.mark.parametrize(
    ("policy", "detected", "address", "sni", "route"),
    [
        # http and tcp on one port: Envoy's HTTP chain takes plaintext HTTP (an unlisted
        # Host gets its 404), the tcp chain the rest.
        ((HTTP_FOO, TCP_80), Detected.HTTP1, UNLISTED, None, DENIED),
        ((HTTP_FOO, TCP_80), Detected.OPAQUE, UNLISTED, None, egress("tcp-80")),
        # ... unless the tcp Egress's ipAddresses match the address: that chain is more
        # specific, and takes the HTTP too.
        ((HTTP_FOO, TCP_80_LISTED), Detected.HTTP1, LISTED, None, egress("tcp-80")),
        ((HTTP_FOO, TCP_80_LISTED), Detected.HTTP1, UNLISTED, None, DENIED),
        # An http Egress without hosts still has its chain, with no routes.
        ((("http-none", "", "", 80, "http"), TCP_80), Detected.HTTP1, UNLISTED, None, DENIED),
        # https with ipAddresses beside tcp for any address: the address picks the https
        # chain, whose server names then decide alone.
        ((HTTPS_FOO_LISTED, TCP_443), Detected.TLS, LISTED, "foo.com", egress("https-foo")),
        ((HTTPS_FOO_LISTED, TCP_443), Detected.TLS, LISTED, "bar.com", TLS_DENIED),
        ((HTTPS_FOO_LISTED, TCP_443), Detected.TLS, LISTED, None, TLS_DENIED),
        ((HTTPS_FOO_LISTED, TCP_443), Detected.TLS, UNLISTED, "bar.com", egress("tcp-443")),
        ((HTTPS_FOO_LISTED, TCP_443), Detected.OPAQUE, LISTED, None, TCP_DENIED),
        # https for any address beside tcp with ipAddresses: the tcp chain takes its
        # addresses whatever the name, the https chain the other addresses by name.
        ((HTTPS_FOO, TCP_443_LISTED), Detected.TLS, LISTED, "bar.com", egress("tcp-443")),
        ((HTTPS_FOO, TCP_443_LISTED), Detected.TLS, LISTED, "foo.com", egress("tcp-443")),
        ((HTTPS_FOO, TCP_443_LISTED), Detected.TLS, UNLISTED, "foo.com", egress("https-foo")),
        ((HTTPS_FOO, TCP_443_LISTED), Detected.TLS, UNLISTED, "bar.com", TLS_DENIED),
    ],
)
def test_a_connection_takes_the_filter_chain_envoy_picks_as_osm_builds_them(
    policy: tuple[tuple[str, str, str, int, str], ...],
    detected: Detected,
    address: IPv4Address,
    sni: str | None,
    route: RouteRef,
) -> None:
    """OSM makes each Egress port an Envoy filter chain (pkg/envoy/lds/egress.go) and
    Envoy picks one by the longest address prefix, then the server name, then whether
    it is HTTP, never going back to a chain an earlier step left out."""
    assert envoy_picks(policy, detected, address, sni) == route


def test_of_two_tcp_egresses_the_most_specific_address_match_names_the_route() -> None:
    policy = (("any", "", "", 443, "tcp"), ("listed", "", "198.51.100.0/24", 443, "tcp"))
    assert envoy_picks(policy, Detected.OPAQUE, LISTED, None) == egress("listed")
    assert envoy_picks(policy, Detected.OPAQUE, UNLISTED, None) == egress("any")


def test_ip_addresses_do_not_restrict_http_ports(caplog: pytest.LogCaptureFixture) -> None:
    """OSM's HTTP filter chain matches any address, and its routes never read the
    Egress's ipAddresses (AllowedDestinationIPRanges): Host decides alone."""
    index = egresses(("http-foo", "foo.com", "198.51.100.0/24", 80, "http"))
    for address in (LISTED, UNLISTED):
        facts = RequestFacts(Destination(address, 80), "foo.com", "GET", "/", "", (), False)
        assert index.decide_request(facts).route == egress("http-foo")
    assert "ipAddresses: they do not restrict its http ports" in caplog.text


@pytest.mark.parametrize("protocol", ["tcp", "tcp-server-first"])
def test_hosts_on_a_tcp_port_are_warned_not_to_restrict_it(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OSM ignores hosts for protocols other than http and https (the Egress API says so):
    an Egress listing `db.example.com` on a tcp port allows every destination of the port,
    which the file does not show; a warning at the hosts says so."""
    index = egresses(("db", "db.example.com", "", 5432, protocol))
    facts = ConnectionFacts(Destination(UNLISTED, 5432), Detected.OPAQUE, None)
    assert index.decide_connection(facts).route == egress("db")
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    line = (MESH_EGRESS_OFF + ONE_EGRESS).splitlines().index("  hosts: [{hosts}]") + 1
    assert [record.getMessage() for record in warnings] == [
        f"osm.yaml:{line}: Egress curl/db.spec.hosts: they do not restrict "
        f"its {protocol} port 5432, which allows every destination (as in OSM, which reads "
        "hosts only on http and https ports); match addresses with ipAddresses"
    ]


def test_hosts_on_http_and_https_ports_only_are_not_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    egresses(HTTP_FOO, HTTPS_FOO, ("any-db", "", "", 5432, "tcp"), ("star", "'*'", "", 25, "tcp"))
    assert "do not restrict" not in caplog.text


@pytest.mark.parametrize(
    ("policy", "overlap"),
    [
        ((HTTPS_FOO_LISTED, ("https-more", "foo.com, bar.com", "198.51.100.0/24", 443, "https")),
         "addresses 198.51.100.0/24 and server name foo.com"),
        ((("https-any", "", "", 443, "https"), TCP_443), "any address and no server name"),
        ((HTTP_FOO, ("http-too", "foo.com", "", 80, "http")), "host foo.com"),
        # OSM names traffic matches by protocol: tcp and tcp-server-first are two chains
        ((TCP_443, ("tcp-first", "", "", 443, "tcp-server-first")),
         "any address and no server name"),
    ],
)  # fmt: skip
def test_egresses_whose_envoy_configuration_envoy_rejects_are_warned_of(
    policy: tuple[tuple[str, str, str, int, str], ...],
    overlap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two filter chains of a port sharing an address range and a server name, or one
    host in two http Egresses of a port: Envoy rejects what OSM makes of them. (The
    second Egress starts on line 16.)"""
    egresses(*policy)
    first, second = policy
    assert [record.getMessage() for record in caplog.records if "overlaps" in record.message] == [
        f"osm.yaml:16: Egress curl/{second[0]}: port {second[3]} overlaps Egress "
        f"curl/{first[0]} (line 7) for ServiceAccount curl/curl on {overlap}: OSM's Envoy "
        "rejects the configuration it makes of the two, and keeps its previous one"
    ]


@pytest.mark.parametrize(
    "policy",
    [
        # identical chains: OSM deduplicates them
        (HTTPS_FOO_LISTED, ("https-same", "foo.com", "198.51.100.0/24", 443, "https")),
        (HTTPS_FOO_LISTED, ("https-foo-any", "foo.com", "", 443, "https")),  # other ranges
        (TCP_443, ("tcp-443-listed", "", "198.51.100.0/24", 443, "tcp")),
        (HTTPS_FOO, ("https-bar", "bar.com", "", 443, "https")),
        (HTTP_FOO, ("http-other-port", "foo.com", "", 8080, "http")),
        (HTTP_FOO, TCP_80),
    ],
)
def test_egresses_envoy_takes_are_not_warned_of(
    policy: tuple[tuple[str, str, str, int, str], ...], caplog: pytest.LogCaptureFixture
) -> None:
    egresses(*policy)
    assert "overlaps" not in caplog.text


STAR_EGRESS = """\
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: star, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  hosts:
  - "*"
  ports: [{{number: {port}, protocol: {protocol}}}]
"""


@pytest.mark.parametrize(
    ("port", "protocol", "reason"),
    [
        (
            80,
            "http",
            "on http port 80 OSM makes it Envoy's catch-all virtual host, whose requests go "
            "to the addresses DNS gives for the name '*', never to the host they name",
        ),
        (
            443,
            "https",
            "on https port 443 OSM makes it a server name of the filter chain, which Envoy "
            "refuses (partial wildcards are not supported in server_names), rejecting the "
            "whole listener",
        ),
    ],
)
def test_a_star_host_is_refused_where_osm_makes_it_allow_nothing(
    port: int, protocol: str, reason: str
) -> None:
    """The Egress CRD admits `*` in hosts. On an http port OSM makes it the domain `*`
    (Envoy's catch-all virtual host) routed to a STRICT_DNS cluster for the host `*`
    (pkg/catalog/egress.go buildHTTPRouteConfigs, pkg/envoy/cds getDNSResolvableEgressCluster),
    so no request reaches the host it names; on an https port it goes to the filter chain's
    server_names (pkg/envoy/lds/egress.go), and Envoy refuses a `*` that is not `*.`."""
    text = STAR_EGRESS.format(port=port, protocol=protocol)
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "osm.yaml")
    assert [(problem.line, problem.reason) for problem in caught.value.problems] == [
        (
            7,
            f"Egress curl/star.spec.hosts: '*' allows nothing as OSM builds it: {reason}. "
            "Name the hosts (*.example.com for a domain's), or allow every destination of a "
            "port with protocol tcp",
        )
    ]


def test_a_star_host_on_a_tcp_port_is_read_no_more_than_other_hosts() -> None:
    """OSM's tcp filter chain matches the port and ipAddresses only: hosts are unused."""
    text = MESH_EGRESS_OFF + "---\n" + STAR_EGRESS.format(port=5432, protocol="tcp")
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    connection = ConnectionFacts(Destination(UNLISTED, 5432), Detected.OPAQUE, None)
    assert index.decide_connection(connection).route == egress("star")


def test_a_wildcard_host_takes_names_of_any_depth_below_its_domain() -> None:
    """Envoy's `*.example.com`, as virtual host domain and as server name, is a suffix
    match: any number of labels in front, never example.com itself."""
    host = '"*.example.com"'
    index = egresses(("web", host, "", 80, "http"), ("tls", host, "", 443, "https"))
    assert request_to(index, "a.b.example.com:80").route == egress("web")
    assert request_to(index, "example.com").route == DENIED
    assert tls(index, "a.b.example.com").route == egress("tls")
    assert tls(index, "example.com").route == TLS_DENIED


PORTS_EGRESS = """\
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: ports, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  hosts: [{hosts}]
  ports:
  - {{number: 80, protocol: {first}}}
  - {{number: 80, protocol: {second}}}
"""


def listed_again(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings of a port listed again (hosts on a tcp port are warned of too)."""
    messages = [record.getMessage() for record in caplog.records]
    return [message for message in messages if "is listed again" in message]


VIRTUAL_HOST_TWICE = "each host's virtual host twice in the port's route configuration"
ONE_MATCH = (
    "two filter chains of the port with one match (the port, the ipAddresses, no server name)"
)


@pytest.mark.parametrize(
    ("hosts", "first", "second", "built"),
    [
        ("foo.com", "http", "http", VIRTUAL_HOST_TWICE),
        ("foo.com", "tcp", "tcp-server-first", ONE_MATCH),
        ("", "https", "tcp", ONE_MATCH),
        ("", "tcp-server-first", "https", ONE_MATCH),
    ],
)
def test_a_port_an_egress_lists_again_as_envoy_rejects_it_is_warned_of(
    hosts: str, first: str, second: str, built: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OSM adds an http port's virtual hosts per port entry (pkg/catalog/egress.go
    GetEgressTrafficPolicy), and Envoy refuses a domain twice in a route configuration;
    it names a traffic match by port and protocol, so tcp and tcp-server-first (or https
    without hosts) survive its deduplication as two filter chains with one match, which
    Envoy refuses in a listener. The warning is at the second entry (line 9)."""
    with caplog.at_level("WARNING", logger="egressproxy.policy.osm"):
        load_policy_text(PORTS_EGRESS.format(hosts=hosts, first=first, second=second), "osm.yaml")
    assert listed_again(caplog) == [
        f"osm.yaml:9: Egress curl/ports.spec.ports[1]: port 80 is listed again (ports[0], "
        f"line 8, {first}): OSM gives Envoy {built}, which Envoy rejects for the Egress's "
        "sources, keeping their previous configuration"
    ]


@pytest.mark.parametrize(
    ("hosts", "first", "second"),
    [
        ("foo.com", "https", "https"),  # identical chains: OSM deduplicates them
        ("", "tcp", "tcp"),
        ("", "http", "http"),  # no hosts: no virtual host at all
        ("foo.com", "http", "tcp"),  # the HTTP chain matches HTTP, the tcp one the rest
        ("foo.com", "https", "tcp"),  # the https chain matches its server names
        ("foo.com", "http", "https"),
    ],
)
def test_a_port_an_egress_lists_again_as_envoy_takes_it_is_not_warned_of(
    hosts: str, first: str, second: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="egressproxy.policy.osm"):
        load_policy_text(PORTS_EGRESS.format(hosts=hosts, first=first, second=second), "osm.yaml")
    assert listed_again(caplog) == []


def test_an_http_port_listed_twice_routes_as_listed_once() -> None:
    text = (
        MESH_EGRESS_OFF
        + "---\n"
        + PORTS_EGRESS.format(hosts="foo.com", first="http", second="http")
    )
    index = compile_policy(load_policy_text(text, "osm.yaml"), CURL)
    (route,) = [route for route in index.model.routes if route.ref == egress("ports")]
    assert [attachment.port for attachment in route.attachments] == [80]
    assert request_to(index, "foo.com").route == egress("ports")


def intercepting(lists: str, settings: Settings = CURL) -> PolicyIndex:
    """MESH_EGRESS_OFF with these spec.traffic lists, and an Egress allowing https
    httpbin.org on 443 (which the lists may take out of the MeshConfig's hands)."""
    mesh_config = MESH_EGRESS_OFF.replace(
        "{enableEgress: false}", f"{{enableEgress: false, {lists}}}"
    )
    text = mesh_config + ONE_EGRESS.format(
        name="httpbin", hosts="httpbin.org", addresses="", port=443, protocol="https"
    )
    return compile_policy(load_policy_text(text, "p.yaml"), settings)


def connection(index: PolicyIndex, address: str, port: int, sni: str | None = None) -> Decision:
    detected = Detected.TLS if sni else Detected.OPAQUE
    destination = Destination(ipaddress.ip_address(address), port)
    return index.decide_connection(ConnectionFacts(destination, detected, sni))


@pytest.mark.parametrize(
    ("lists", "address", "port", "passed"),
    [
        ("outboundIPRangeExclusionList: [203.0.113.0/24]", "203.0.113.9", 443, True),
        ("outboundIPRangeExclusionList: [203.0.113.0/24]", "198.51.100.9", 443, False),
        ("outboundIPRangeExclusionList: ['0.0.0.0/0']", "198.51.100.9", 5432, True),
        ("outboundIPRangeExclusionList: ['0.0.0.0/0']", "2001:db8::9", 5432, False),
        ("outboundPortExclusionList: [5432, 6379]", "198.51.100.9", 5432, True),
        ("outboundPortExclusionList: [5432, 6379]", "198.51.100.9", 5433, False),
        ("outboundIPRangeInclusionList: [198.51.100.0/24]", "203.0.113.9", 443, True),
        ("outboundIPRangeInclusionList: [198.51.100.0/24]", "2001:db8::9", 443, True),
        ("outboundIPRangeInclusionList: [198.51.100.0/24]", "198.51.100.9", 443, False),
        (
            "outboundIPRangeInclusionList: [198.51.100.0/24],"
            " outboundIPRangeExclusionList: [198.51.100.0/25]",
            "198.51.100.9",
            443,
            True,
        ),
        (
            "outboundIPRangeInclusionList: [198.51.100.0/24],"
            " outboundIPRangeExclusionList: [198.51.100.0/25]",
            "198.51.100.200",
            443,
            False,
        ),
    ],
)
def test_the_mesh_configs_outbound_lists_take_traffic_out_of_its_network(
    lists: str, address: str, port: int, passed: bool
) -> None:
    """OSM's injector turns these lists into iptables RETURN rules (exclusions first), so
    that traffic never meets OSM's proxy: it passes whatever enableEgress says. Accepted
    and ignored, they had it denied."""
    index = intercepting(lists)
    decision = connection(index, address, port)
    if passed:
        assert (decision.action, decision.parent) == (Action.PASS, None), decision.reason
        assert decision.reason.endswith("passed untouched")
    else:
        assert (decision.action, decision.route) == (
            Action.DENY,
            RouteRef("", "default", "", "tcp-egress-deny"),
        )


def test_an_excluded_port_passes_untouched_and_the_policy_still_decides_the_rest() -> None:
    index = intercepting("outboundPortExclusionList: [443]")
    excluded = connection(index, "198.51.100.9", 443, sni="example.com")
    assert (excluded.action, excluded.parent) == (Action.PASS, None)
    assert excluded.reason == (
        "port 443 is in the outboundPortExclusionList of MeshConfig osm-system/osm-mesh-config:"
        " passed untouched"
    )
    assert connection(intercepting(""), "198.51.100.9", 443, sni="httpbin.org").route == egress(
        "httpbin"
    )
    request = RequestFacts(Destination(EXTERNAL, 443), "x.com", "GET", "/", "", (), grpc=False)
    assert index.decide_request(request).parent is None


def test_the_inclusion_list_leaves_the_cluster_networks_out() -> None:
    """The cluster networks are never egress: an inclusion list naming one (OSM redirects
    in-mesh traffic too) must not put pod-to-pod traffic under the egress policy."""
    cluster = Settings(
        namespace="curl",
        service_account="curl",
        cluster_networks=(ipaddress.ip_network("198.18.0.0/15"),),
    )
    index = intercepting("outboundIPRangeInclusionList: [198.0.0.0/8]", cluster)
    assert connection(index, "198.18.0.5", 443).parent is None
    assert connection(index, "198.51.100.9", 443).action == Action.DENY
    assert connection(index, "203.0.113.9", 443).parent is None
    inside = intercepting("outboundIPRangeInclusionList: [198.18.0.0/16]", cluster)
    assert connection(inside, "198.18.0.5", 443).parent is None
    wide = intercepting("outboundIPRangeInclusionList: [0.0.0.0/0]", cluster)
    assert connection(wide, "198.18.0.5", 443).parent is None
    assert connection(wide, "203.0.113.9", 443).action == Action.DENY


@pytest.mark.parametrize(
    ("lists", "reason"),
    [
        (
            "outboundIPRangeExclusionList: [not-a-cidr]",
            "MeshConfig osm-system/osm-mesh-config.spec.traffic.outboundIPRangeExclusionList:"
            " 'not-a-cidr' is not a CIDR",
        ),
        (
            "outboundIPRangeInclusionList: 198.51.100.0/24",
            "MeshConfig osm-system/osm-mesh-config.spec.traffic.outboundIPRangeInclusionList:"
            " expected a list, got the string '198.51.100.0/24'",
        ),
        (
            "outboundPortExclusionList: [0]",
            "MeshConfig osm-system/osm-mesh-config.spec.traffic.outboundPortExclusionList[0]:"
            " port 0 is outside 1-65535",
        ),
        (
            "outboundPortExclusionList: ['5432']",
            "MeshConfig osm-system/osm-mesh-config.spec.traffic.outboundPortExclusionList[0]:"
            " expected an integer, got the string '5432'",
        ),
    ],
)
def test_a_bad_outbound_list_is_an_error_at_its_line(lists: str, reason: str) -> None:
    with pytest.raises(PolicyError) as caught:
        intercepting(lists)
    assert [str(problem) for problem in caught.value.problems] == [f"p.yaml:5: {reason}"]


def test_config_shows_the_outbound_lists() -> None:
    """/config's policy is the model as JSON: the port set broke its rendering."""
    index = intercepting(
        "outboundIPRangeInclusionList: [198.51.100.0/24], outboundPortExclusionList: [6379, 25]"
    )
    [network] = json.loads(json.dumps(index.describe()))["networks"]
    assert network["interception"] == {
        "included": ["198.51.100.0/24"],
        "excluded": [],
        "excluded_ports": [25, 6379],
    }


def test_a_path_regex_with_a_percent_escape_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Paths are matched decoded, so `/files/my%20doc` (which OSM's Envoy would match
    against the raw path) matches no request: the user hears it at load, at its line."""
    text = (EXAMPLES / "osm-5-egress-routegroup.yaml").read_text()
    escaped = text.replace("pathRegex: /get", "pathRegex: /files/my%20doc\\.pdf")
    with caplog.at_level("WARNING", logger="egressproxy.policy.errors"):
        index = compile_policy(load_policy_text(escaped, "p.yaml"), CURL)
        load_policy_text(text.replace("pathRegex: /get", "pathRegex: /100\\%25"), "p.yaml")
    assert [record.getMessage() for record in caplog.records] == [
        "p.yaml:19: HTTPRouteGroup curl/egress-http-route.spec.matches[0]: "
        "'/files/my%20doc\\\\.pdf' has a percent-escape, but paths are matched decoded (as a "
        "server resolves them): write the character itself (a space, not %20)"
    ]
    assert http(index, "httpbin.org", "/files/my%20doc.pdf").action == Action.DENY


@pytest.mark.parametrize(("protocol", "warned"), [("http", True), ("tcp", False)])
def test_a_service_account_listed_twice_is_warned_about_on_http_ports(
    caplog: pytest.LogCaptureFixture, protocol: str, warned: bool
) -> None:
    """OSM builds the http routes once per matching source entry: the second builds each
    host's virtual host again, and Envoy rejects the duplicate domain."""
    text = MESH_EGRESS_OFF + ONE_EGRESS.format(
        name="twice", hosts="httpbin.org", addresses="", port=80, protocol=protocol
    ).replace(
        "  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]\n",
        "  sources:\n"
        "  - {kind: ServiceAccount, name: curl, namespace: curl}\n"
        "  - {kind: ServiceAccount, name: other, namespace: curl}\n"
        "  - {kind: ServiceAccount, name: curl, namespace: curl}\n",
    )
    with caplog.at_level("WARNING", logger="egressproxy.policy.osm"):
        load_policy_text(text, "p.yaml")
    messages = [
        record.getMessage() for record in caplog.records if "sources" in record.getMessage()
    ]
    assert messages == (
        [
            "p.yaml:14: Egress curl/twice.spec.sources[2]: this service account is listed "
            "again: OSM gives Envoy each host's virtual host twice in the http port's route "
            "configuration, which Envoy rejects for it, keeping its previous configuration"
        ]
        if warned
        else []
    )


@pytest.mark.parametrize(("field", "line"), [("sources", 11), ("ports", 14)])
def test_a_required_egress_field_left_empty_is_missing(field: str, line: int) -> None:
    """`ports:` with no value is null, which Kubernetes takes for unset: the CRD refuses
    the Egress. It loaded as an Egress with no ports (or sources), allowing nothing,
    silently."""
    egress = ONE_EGRESS.format(
        name="empty", hosts="httpbin.org", addresses="", port=443, protocol="https"
    )
    emptied = "\n".join(
        f"  {field}:" if text.startswith(f"  {field}:") else text for text in egress.split("\n")
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_text(MESH_EGRESS_OFF + emptied, "p.yaml")
    assert [str(problem) for problem in caught.value.problems] == [
        f"p.yaml:{line}: Egress curl/empty.spec: missing required field {field!r}"
    ]
