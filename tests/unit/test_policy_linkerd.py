"""Every step of the Linkerd egress guide, decided exactly as its metric samples show."""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from egressproxy.metrics import ROUTE_IDENTITY, route_identity
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
EXTERNAL = ipaddress.ip_address("203.0.113.5")
CLIENT = Settings(namespace="egress-test")
GATEWAY = "gateway.networking.k8s.io"


def parent(port: int) -> ParentRef:
    return ParentRef(
        "policy.linkerd.io", "EgressNetwork", "egress-test", "all-egress-traffic", str(port)
    )


def default(name: str) -> RouteRef:
    return RouteRef("", "default", "", name)


def route(kind: str, name: str) -> RouteRef:
    return RouteRef(GATEWAY, kind, "egress-test", name)


def step(name: str, settings: Settings = CLIENT) -> PolicyIndex:
    return compile_policy(load_policy(EXAMPLES / name), settings)


def http(index: PolicyIndex, host: str, path: str, port: int = 80) -> Decision:
    facts = RequestFacts(Destination(EXTERNAL, port), host, "GET", path, "", (), grpc=False)
    return index.decide_request(facts)


def tls(index: PolicyIndex, sni: str | None, port: int = 443) -> Decision:
    return index.decide_connection(ConnectionFacts(Destination(EXTERNAL, port), Detected.TLS, sni))


def opaque(index: PolicyIndex, port: int) -> Decision:
    return index.decide_connection(
        ConnectionFacts(Destination(EXTERNAL, port), Detected.OPAQUE, None)
    )


def labels(decision: Decision) -> tuple[Action, RouteProtocol, ParentRef | None, RouteRef | None]:
    return decision.action, decision.protocol, decision.parent, decision.route


def test_step1_allow_observes_with_http_egress_allow() -> None:
    index = step("linkerd-1-allow.yaml")
    assert labels(http(index, "httpbin.org", "/get")) == (
        Action.PASS,
        RouteProtocol.HTTP,
        parent(80),
        default("http-egress-allow"),
    )
    assert labels(tls(index, "httpbin.org")) == (
        Action.PASS,
        RouteProtocol.TCP,
        parent(443),
        default("tcp-egress-allow"),
    )


def test_step2_deny_gives_http_egress_deny() -> None:
    index = step("linkerd-2-deny.yaml")
    assert labels(http(index, "httpbin.org", "/get")) == (
        Action.DENY,
        RouteProtocol.HTTP,
        parent(80),
        default("http-egress-deny"),
    )
    assert labels(tls(index, "httpbin.org"))[::3] == (Action.DENY, default("tcp-egress-deny"))
    assert labels(opaque(index, 5432))[::3] == (Action.DENY, default("tcp-egress-deny"))


def test_step3_httproute_allows_only_get() -> None:
    index = step("linkerd-3-httproute.yaml")
    assert labels(http(index, "httpbin.org", "/get")) == (
        Action.PASS,
        RouteProtocol.HTTP,
        parent(80),
        route("HTTPRoute", "httpbin-get"),
    )
    assert labels(http(index, "httpbin.org", "/get/x"))[0] == Action.PASS
    assert labels(http(index, "httpbin.org", "/getx"))[::3] == (
        Action.DENY,
        default("http-egress-deny"),
    )
    assert labels(http(index, "httpbin.org", "/ip"))[::3] == (
        Action.DENY,
        default("http-egress-deny"),
    )
    assert labels(tls(index, "httpbin.org"))[::3] == (Action.DENY, default("tcp-egress-deny"))
    assert index.port_protocol(Destination(EXTERNAL, 80)) == RouteProtocol.HTTP
    assert index.port_protocol(Destination(EXTERNAL, 443)) is None


def test_step4_tlsroute_allows_httpbin_and_closes_github() -> None:
    index = step("linkerd-4-tlsroute.yaml")
    assert labels(tls(index, "httpbin.org")) == (
        Action.PASS,
        RouteProtocol.TLS,
        parent(443),
        route("TLSRoute", "tls-egress"),
    )
    assert labels(tls(index, "github.com")) == (
        Action.DENY,
        RouteProtocol.TLS,
        parent(443),
        default("tls-egress-deny"),
    )
    assert tls(index, None).route == default("tls-egress-deny")
    assert index.port_protocol(Destination(EXTERNAL, 443)) == RouteProtocol.TLS
    plaintext_on_tls_port = opaque(index, 443)
    assert plaintext_on_tls_port.action == Action.DENY


def test_step5_redirects_plaintext_to_the_internal_service() -> None:
    index = step("linkerd-5-redirect.yaml")
    get = http(index, "httpbin.org", "/get")
    assert labels(get) == (
        Action.PASS,
        RouteProtocol.HTTP,
        parent(80),
        route("HTTPRoute", "httpbin-get"),
    )
    assert get.backend is None
    google = http(index, "google.com", "/")
    assert labels(google) == (
        Action.ROUTE,
        RouteProtocol.HTTP,
        parent(80),
        route("HTTPRoute", "unencrypted-http"),
    )
    assert google.backend == Backend("internal-egress.egress-test.svc.cluster.local", 80)
    assert http(index, "httpbin.org", "/ip").route == route("HTTPRoute", "unencrypted-http")
    for sni in ("httpbin.org", "github.com"):
        assert labels(tls(index, sni)) == (
            Action.PASS,
            RouteProtocol.TLS,
            parent(443),
            route("TLSRoute", "tls-egress"),
        )
    # linkerd2-proxy's TLS stack requires a server name (NewDetectRequiredSni): a hello
    # without one is failed before any route, even the one that takes every hostname
    assert labels(tls(index, None)) == (
        Action.DENY,
        RouteProtocol.TLS,
        parent(443),
        default("tls-egress-deny"),
    )


def test_the_guides_manifests_appended_step_after_step_decide_as_its_last_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kubectl apply of each step's manifests in turn: step 5 applies httpbin-get and
    tls-egress again (the TLSRoute now without hostnames), and each step here gives the
    network again (Allow, then Deny). Appended to one file, the last of each is in force,
    as the API server holds it, with a warning; refused, step 5 never came in force."""
    files = sorted(path.name for path in EXAMPLES.glob("linkerd-*.yaml"))
    assert len(files) == 5
    text = "\n---\n".join((EXAMPLES / name).read_text() for name in files)
    with caplog.at_level(logging.WARNING):
        appended = compile_policy(load_policy_text(text, "guide.yaml"), CLIENT)
    last = step(files[-1])
    for host, path in [("httpbin.org", "/get"), ("httpbin.org", "/ip"), ("google.com", "/")]:
        decisions = [http(index, host, path) for index in (appended, last)]
        assert len({(labels(each), each.backend) for each in decisions}) == 1, decisions
    for sni in ("httpbin.org", "github.com", None):
        assert labels(tls(appended, sni)) == labels(tls(last, sni))
    assert labels(tls(appended, "github.com"))[0] is Action.PASS
    given_again = [record.getMessage() for record in caplog.records if "given again" in record.msg]
    assert sum("TLSRoute egress-test/tls-egress" in line for line in given_again) == 1
    networks = [line for line in given_again if "EgressNetwork egress-test/all-egress" in line]
    assert len(networks) == 4
    assert len({line.partition("first at line ")[2] for line in networks}) == 1, networks


def test_step5_cluster_domain_is_baked_in() -> None:
    index = step(
        "linkerd-5-redirect.yaml", Settings(namespace="egress-test", cluster_domain="corp")
    )
    assert http(index, "google.com", "/").backend == Backend(
        "internal-egress.egress-test.svc.corp", 80
    )


def test_http1_connection_level_decision_is_get_slash() -> None:
    index = step("linkerd-3-httproute.yaml")
    facts = ConnectionFacts(Destination(EXTERNAL, 80), Detected.HTTP1, "httpbin.org")
    assert index.decide_connection(facts).route == default("http-egress-deny")


def test_cluster_networks_are_not_egress() -> None:
    index = step("linkerd-2-deny.yaml")
    inside = RequestFacts(
        Destination(ipaddress.ip_address("10.1.2.3"), 80), "svc", "GET", "/", "", (), grpc=False
    )
    decision = index.decide_request(inside)
    assert (decision.action, decision.parent, decision.route) == (Action.PASS, None, None)
    for detected in (Detected.HTTP1, Detected.H2):
        connection = ConnectionFacts(inside.destination, detected, "svc")
        untouched = index.decide_connection(connection)
        assert (untouched.action, untouched.protocol, untouched.parent) == (
            Action.PASS,
            RouteProtocol.TCP,
            None,
        ), "HTTP no network covers is spliced as opaque TCP, not read"
        assert index.decide_connection(connection) is untouched, "one shared decision"


def network(name: str, namespace: str, policy: str, networks: str = "", extra: str = "") -> str:
    body = f"""
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: {namespace}
  name: {name}
{extra}
spec:
  trafficPolicy: {policy}
"""
    if networks:
        body += "  networks:\n" + networks
    return body


def compiled(text: str, settings: Settings = CLIENT) -> PolicyIndex:
    return compile_policy(load_policy_text(text, "policy.yaml"), settings)


def decide_ip(index: PolicyIndex, address: str, port: int = 5432) -> Decision:
    facts = ConnectionFacts(Destination(ipaddress.ip_address(address), port), Detected.OPAQUE, None)
    return index.decide_connection(facts)


def test_smallest_cidr_wins_and_except_is_honoured() -> None:
    text = "---".join(
        [
            network("wide", "egress-test", "Allow", "  - cidr: 198.51.100.0/24\n"),
            network(
                "narrow",
                "egress-test",
                "Deny",
                "  - cidr: 198.51.100.0/28\n    except: [198.51.100.5/32]\n",
            ),
        ]
    )
    index = compiled(text)
    assert decide_ip(index, "198.51.100.1").parent.name == "narrow"  # type: ignore[union-attr]
    assert decide_ip(index, "198.51.100.5").parent.name == "wide"  # type: ignore[union-attr]
    assert decide_ip(index, "198.51.100.200").parent.name == "wide"  # type: ignore[union-attr]
    assert decide_ip(index, "192.0.2.1").parent is None


def test_oldest_then_name_breaks_ties() -> None:
    older = "  creationTimestamp: 2020-01-01T00:00:00Z"
    newer = "  creationTimestamp: 2024-01-01T00:00:00Z"
    text = "---".join(
        [
            network("a", "egress-test", "Allow", extra=newer),
            network("b", "egress-test", "Deny", extra=older),
        ]
    )
    assert decide_ip(compiled(text), "203.0.113.1").parent.name == "b"  # type: ignore[union-attr]
    by_order = "---".join(
        [network("z", "egress-test", "Allow"), network("a", "egress-test", "Deny")]
    )
    assert decide_ip(compiled(by_order), "203.0.113.1").parent.name == "z"  # type: ignore[union-attr]


def test_explicit_network_covers_cluster_addresses() -> None:
    text = network("internal", "egress-test", "Deny", "  - cidr: 10.9.0.0/16\n")
    index = compiled(text)
    assert decide_ip(index, "10.9.1.1").action == Action.DENY
    assert decide_ip(index, "10.8.1.1").parent is None


@pytest.mark.parametrize(
    ("networks", "accepted"),
    [
        ("  - cidr: 10.9.0.0/16\n  - cidr: 203.0.113.0/24\n", False),
        ("  - cidr: 0.0.0.0/0\n", False),
        ("  - cidr: 0.0.0.0/0\n    except: [10.0.0.0/8, 100.64.0.0/10, 172.16.0.0/12,"
         " 192.168.0.0/16]\n", True),
        ("  - cidr: 0.0.0.0/0\n    except: [10.0.0.0/9]\n", False),
        ("  - cidr: 203.0.113.0/24\n  - cidr: '2001:db8::/32'\n", True),
    ],
)  # fmt: skip
def test_a_network_overlapping_the_cluster_networks_takes_no_routes(
    networks: str, accepted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Linkerd's status controller does not accept an EgressNetwork whose explicit networks
    intersect a cluster network (one holds the other, no `except` holds the cluster one),
    nor its routes: its traffic gets the default routes, and loading it says so."""
    text = (
        network("all-egress-traffic", "egress-test", "Deny", networks)
        + "---"
        + http_route("everything", EVERYTHING)
    )
    with caplog.at_level(logging.WARNING, logger="egressproxy.policy"):
        index = compiled(text)
    decision = http(index, "api.example.com", "/")
    assert decision.route == (
        route("HTTPRoute", "everything") if accepted else default("http-egress-deny")
    )
    warnings = [record.getMessage() for record in caplog.records]
    if accepted:
        assert warnings == []
    else:
        assert warnings == [
            "policy.yaml:2: EgressNetwork egress-test/all-egress-traffic: its networks overlap"
            " 10.0.0.0/8 of --cluster-networks: Linkerd accepts neither it nor its routes"
            " (EgressReasonNetworkOverlap); its traffic takes the default routes"
        ]
        assert "EgressReasonNetworkOverlap" in decision.reason


@pytest.mark.parametrize(
    ("namespace", "expected"),
    [("egress-test", "local"), ("other", "global"), (None, "unrelated")],
)
def test_namespace_scoping(namespace: str | None, expected: str) -> None:
    text = "---".join(
        [
            network("local", "egress-test", "Deny", "  - cidr: 203.0.113.0/24\n"),
            network("global", "linkerd-egress", "Allow", "  - cidr: 203.0.113.0/25\n"),
            network("unrelated", "elsewhere", "Allow", "  - cidr: 203.0.113.0/26\n"),
        ]
    )
    index = compiled(text, Settings(namespace=namespace))
    decision = decide_ip(index, "203.0.113.10")
    assert decision.parent is not None and decision.parent.name == expected


def test_unset_namespace_sees_every_namespace() -> None:
    text = network("unrelated", "elsewhere", "Deny", "  - cidr: 203.0.113.0/26\n")
    assert decide_ip(compiled(text, Settings()), "203.0.113.1").action == Action.DENY
    assert decide_ip(compiled(text, Settings(namespace="x")), "203.0.113.1").parent is None


def test_a_consumer_route_serves_only_its_own_namespace() -> None:
    """Linkerd's producer/consumer rule: a route beside its EgressNetwork serves every
    client, a route from another namespace only that namespace's clients; with no
    --namespace every route applies."""

    def route_in(namespace: str, name: str, prefix: str) -> str:
        return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{namespace: {namespace}, name: {name}}}
spec:
  parentRefs:
  - {{name: global, namespace: linkerd-egress, kind: EgressNetwork, group: policy.linkerd.io,
     port: 80}}
  rules:
  - matches: [{{path: {{value: {prefix}}}}}]
"""

    text = "---".join(
        [
            network("global", "linkerd-egress", "Deny"),
            route_in("linkerd-egress", "producer", "/shared"),
            route_in("team-a", "consumer", "/team-a"),
        ]
    )
    expected = {
        "team-a": ("producer", "consumer"),
        "team-b": ("producer", "http-egress-deny"),
        None: ("producer", "consumer"),
    }
    for namespace, names in expected.items():
        index = compiled(text, Settings(namespace=namespace))
        assert (request(index, "/shared"), request(index, "/team-a")) == names, namespace
    team_b = compiled(text, Settings(namespace="team-b"))
    applies = {route.ref.name: team_b.applies(route) for route in team_b.model.routes}
    assert applies == {"producer": True, "consumer": False}, "as /config reports it"


def http_route(name: str, rules: str, hostnames: str = "", port: int = 80, extra: str = "") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: egress-test
{extra}
spec:
  parentRefs:
  - name: all-egress-traffic
    kind: EgressNetwork
    group: policy.linkerd.io
    port: {port}
{hostnames}
  rules:
{rules}
"""


DENY_NET = network("all-egress-traffic", "egress-test", "Deny")


def request(
    index: PolicyIndex,
    path: str,
    *,
    host: str = "example.com",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    query: str = "",
) -> str:
    facts = RequestFacts(Destination(EXTERNAL, 80), host, method, path, query, headers, grpc=False)
    decision = index.decide_request(facts)
    assert decision.route is not None
    return decision.route.name


def test_http_match_precedence() -> None:
    routes = [
        http_route("prefix", "  - matches:\n    - path: {type: PathPrefix, value: /a}\n"),
        http_route("longer", "  - matches:\n    - path: {type: PathPrefix, value: /a/b/}\n"),
        http_route("exact", "  - matches:\n    - path: {type: Exact, value: /a/b/c}\n"),
        http_route(
            "method",
            "  - matches:\n    - path: {type: PathPrefix, value: /a}\n      method: POST\n",
        ),
        http_route(
            "headers",
            "  - matches:\n    - path: {value: /a}\n      method: POST\n      headers:\n"
            "      - {name: X-Team, value: blue}\n",
        ),
        http_route(
            "query",
            "  - matches:\n    - path: {value: /a}\n      method: POST\n      headers:\n"
            "      - {name: x-team, value: blue}\n      queryParams:\n"
            "      - {type: RegularExpression, name: v, value: '[0-9]+'}\n",
        ),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/a/b/c") == "exact"
    assert request(index, "/a/b/c/d") == "longer"
    assert request(index, "/a/b") == "longer"
    assert request(index, "/a/x") == "prefix"
    assert request(index, "/a/x", method="POST") == "method"
    assert request(index, "/a/x", method="POST", headers=(("x-team", "blue"),)) == "headers"
    assert (
        request(index, "/a", method="POST", headers=(("x-team", "blue"),), query="v=12") == "query"
    )
    assert request(index, "/ab") == "http-egress-deny"


def test_rule_paths_are_normalised_as_request_paths_are() -> None:
    """A request path is matched decoded, merged and without dot segments; so are the
    Exact and PathPrefix values, else `/files/a%20b` or `/a/%62` could never match."""
    routes = [
        http_route("exact", "  - matches:\n    - path: {type: Exact, value: /files/a%20b}\n"),
        http_route("prefix", "  - matches:\n    - path: {type: PathPrefix, value: /a/%62/}\n"),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/files/a%20b") == "exact"
    assert request(index, "/files/a%20bc") == "http-egress-deny"
    for path in ("/a/b", "/a//b", "/a/b/c", "/a/%62/c"):
        assert request(index, path) == "prefix", path
    for path in ("/a/bc", "/a"):
        assert request(index, path) == "http-egress-deny", "on segment boundaries still"


def sent(text: str) -> str:
    """text as a request carries it, the way the HTTP layers read it: its UTF-8 bytes, one
    character per byte."""
    return text.encode().decode("latin-1")


def test_text_in_the_policy_matches_the_utf8_a_request_sends() -> None:
    """`/café` in a rule is the path a client sends for it, raw or percent-encoded; header
    and query values compare as their UTF-8 too (Linkerd compares a header's bytes with the
    UTF-8 of its match, and decodes query strings as UTF-8)."""
    header = "      headers:\n      - {name: x-city, value: Zürich}\n"
    query = "      queryParams:\n      - {name: q, value: 日本}\n      - {name: città, value: x}\n"
    routes = [
        http_route("exact", "  - matches:\n    - path: {type: Exact, value: /café}\n"),
        http_route("prefix", "  - matches:\n    - path: {type: PathPrefix, value: /日本}\n"),
        http_route("header", f"  - matches:\n    - path: {{value: /h}}\n{header}"),
        http_route("query", f"  - matches:\n    - path: {{value: /q}}\n{query}"),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    for path in (sent("/café"), "/caf%C3%A9", "/caf%c3%a9"):
        assert request(index, path) == "exact", path
    assert request(index, sent("/cafe")) == "http-egress-deny"
    assert request(index, "/caf\xe9") == "http-egress-deny", "é in latin-1 is another byte"
    assert request(index, sent("/日本/東京")) == "prefix"
    assert request(index, "/%E6%97%A5%E6%9C%AC") == "prefix"
    assert request(index, sent("/日本語")) == "http-egress-deny", "on segment boundaries still"
    assert request(index, "/h", headers=(("x-city", sent("Zürich")),)) == "header"
    assert request(index, "/h", headers=(("x-city", "Z\xfcrich"),)) == "http-egress-deny"
    assert request(index, "/q", query="q=%E6%97%A5%E6%9C%AC&citt%C3%A0=x") == "query"
    assert request(index, "/q", query=sent("q=日本&città=x")) == "query"
    assert request(index, "/q", query="q=%E6%97%A5%E6%9C%AC&citt%E0=x") == "http-egress-deny"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("''", "must not be empty (leave it out for '/', every path)"),
        ("admin", "must start with '/'"),
        ("/..", "must not end with '/..'"),
        ("/admin/..", "must not end with '/..'"),
        ("/admin/.", "must not end with '/.'"),
        ("/a//b", "must not contain '//'"),
        ("/a/./b", "must not contain '/./'"),
        ("/a/../b", "must not contain '/../'"),
        ("/a%2fb", "must not contain '%2f'"),
        ("/a%2Fb", "must not contain '%2F'"),
        ("'/a#b'", "must not contain '#'"),
        ("'/a b'", "has a character a path cannot hold unescaped"),
        ("/a%zz", "has a character a path cannot hold unescaped"),
    ],
)
@pytest.mark.parametrize("kind", ["Exact", "PathPrefix"])
def test_a_path_value_the_api_server_refuses_is_refused(kind: str, value: str, reason: str) -> None:
    """HTTPPathMatch's CEL rules. Taken as written, `''` became `/` and `/admin/..`
    normalised to `/`: a route meant for one path allowed every path of its hosts."""
    document = http_route("r", f"  - matches:\n    - path: {{type: {kind}, value: {value}}}\n")
    shown = value.strip("'")
    assert route_problems(document) == [
        (
            line_of(document, "- path:"),
            f"HTTPRoute egress-test/r.spec.rules[0].matches[0].path.value: {shown!r} {reason}",
        )
    ]


def test_an_empty_regular_expression_matches_no_path() -> None:
    """As in Linkerd, whose regular expressions match the whole path: `''` is no `/`."""
    index = compiled(
        DENY_NET
        + "---"
        + http_route("r", "  - matches:\n    - path: {type: RegularExpression, value: ''}\n")
    )
    assert request(index, "/") == "http-egress-deny"
    assert request(index, "/anything") == "http-egress-deny"


def test_a_trailing_slash_does_not_lengthen_a_prefix() -> None:
    """linkerd2-proxy trims it before comparing lengths: `/foo/` ties with `/foo`, and the
    older route wins the tie."""
    routes = [
        http_route(
            "b-new",
            "  - matches:\n    - path: {value: /foo/}\n",
            extra="  creationTimestamp: '2024-06-01T00:00:00Z'",
        ),
        http_route(
            "a-old",
            "  - matches:\n    - path: {value: /foo}\n",
            extra="  creationTimestamp: '2024-01-01T00:00:00Z'",
        ),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/foo/bar") == "a-old"
    assert request(index, "/foo") == "a-old"


def test_a_root_prefix_is_one_character_long() -> None:
    """linkerd2-proxy counts a PathPrefix of `/` (and a rule without matches) as one
    character matched, so on `/` it ties a RegularExpression and the older route wins."""
    old = "  creationTimestamp: '2024-01-01T00:00:00Z'"
    new = "  creationTimestamp: '2024-06-01T00:00:00Z'"
    regex = "  - matches:\n    - path: {type: RegularExpression, value: '/.*'}\n"
    for root in ("  - matches:\n    - path: {type: PathPrefix, value: /}\n", "  - {}\n"):
        routes = [
            http_route("b-regex", regex, extra=new),
            http_route("a-root", root, extra=old),
        ]
        index = compiled("---".join([DENY_NET, *routes]))
        assert request(index, "/") == "a-root"
        assert request(index, "/x") == "b-regex"


def test_a_method_match_is_exact() -> None:
    """linkerd2-proxy compares methods exactly: `get` is not GET."""
    get = http_route("get", "  - matches:\n    - method: GET\n")
    index = compiled(DENY_NET + "---" + get)
    assert request(index, "/", method="GET") == "get"
    assert request(index, "/", method="get") == "http-egress-deny"


def test_hostnames_exact_before_wildcard_before_none() -> None:
    routes = [
        http_route("none", "  - {}\n"),
        http_route("wild", "  - {}\n", hostnames="  hostnames: ['*.example.com']"),
        http_route("deeper", "  - {}\n", hostnames="  hostnames: ['*.api.example.com']"),
        http_route("exact", "  - {}\n", hostnames="  hostnames: [www.example.com]"),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/", host="www.example.com") == "exact"
    assert request(index, "/", host="a.example.com") == "wild"
    assert request(index, "/", host="a.b.example.com") == "wild"
    assert request(index, "/", host="v1.api.example.com") == "deeper"
    assert request(index, "/", host="example.com") == "none"
    assert request(index, "/", host="other.org") == "none"


def test_hostname_level_without_matching_rule_falls_back() -> None:
    routes = [
        http_route("catch-all", "  - {}\n"),
        http_route(
            "exact-get",
            "  - matches:\n    - path: {type: Exact, value: /get}\n",
            hostnames="  hostnames: [httpbin.org]",
        ),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/get", host="httpbin.org") == "exact-get"
    assert request(index, "/ip", host="httpbin.org") == "catch-all"


def test_oldest_route_wins_a_tie() -> None:
    routes = [
        http_route("b-new", "  - {}\n", extra="  creationTimestamp: '2024-05-01T00:00:00Z'"),
        http_route("a-old", "  - {}\n", extra="  creationTimestamp: '2021-05-01T00:00:00Z'"),
    ]
    assert request(compiled("---".join([DENY_NET, *routes])), "/") == "a-old"
    same_age = [http_route("b", "  - {}\n"), http_route("a", "  - {}\n")]
    assert request(compiled("---".join([DENY_NET, *same_age])), "/") == "b"


def test_a_route_with_a_creation_timestamp_wins_a_tie_against_one_without() -> None:
    """As Linkerd's policy controller sorts a port's routes (timestamp_then_name): one
    with a creationTimestamp before one without, whatever the document order; routes of
    the same timestamp by name."""
    stamped = "  creationTimestamp: '2024-05-01T00:00:00Z'"
    mixed = [http_route("unstamped", "  - {}\n"), http_route("stamped", "  - {}\n", extra=stamped)]
    assert request(compiled("---".join([DENY_NET, *mixed])), "/") == "stamped"
    same_second = [
        http_route("b-same", "  - {}\n", extra=stamped),
        http_route("a-same", "  - {}\n", extra=stamped),
    ]
    assert request(compiled("---".join([DENY_NET, *same_second])), "/") == "a-same"


def test_a_regular_expression_path_ranks_by_the_length_of_the_path_it_matched() -> None:
    """linkerd2-proxy ranks a RegularExpression path match by the characters it matched, the
    whole path: it beats any shorter PathPrefix (the sink pattern of the guide's step 5 under
    a broad allow), ties one as long (the older route wins), and loses to Exact."""
    routes = [
        http_route("prefix", "  - matches:\n    - path: {type: PathPrefix, value: /api}\n"),
        http_route(
            "admin", "  - matches:\n    - path: {type: RegularExpression, value: '/api.*'}\n"
        ),
        http_route("exact", "  - matches:\n    - path: {type: Exact, value: /api/exact}\n"),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert request(index, "/api/admin/users") == "admin"
    assert request(index, "/api") == "prefix"
    assert request(index, "/api/exact") == "exact"


def grpc_route(name: str, rules: str, port: int = 50051) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: {name}
  namespace: egress-test
spec:
  parentRefs:
  - {{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: {port}}}
  rules:
{rules}
"""


def grpc_call(index: PolicyIndex, path: str, port: int = 50051, method: str = "POST") -> Decision:
    facts = RequestFacts(
        Destination(EXTERNAL, port),
        "api.example.com",
        method,
        path,
        "",
        (("content-type", "application/grpc"),),
        grpc=True,
    )
    return index.decide_request(facts)


def test_grpc_routes() -> None:
    routes = [
        grpc_route("service", "  - matches:\n    - method: {service: pkg.Greeter}\n"),
        grpc_route(
            "method", "  - matches:\n    - method: {service: pkg.Greeter, method: SayHello}\n"
        ),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    hello = grpc_call(index, "/pkg.Greeter/SayHello")
    assert (hello.protocol, hello.route) == (RouteProtocol.GRPC, route("GRPCRoute", "method"))
    assert grpc_call(index, "/pkg.Greeter/Other").route == route("GRPCRoute", "service")
    denied = grpc_call(index, "/pkg.Other/Call")
    assert (denied.action, denied.route) == (Action.DENY, default("grpc-egress-deny"))
    assert index.port_protocol(Destination(EXTERNAL, 50051)) == RouteProtocol.GRPC
    undeclared = grpc_call(index, "/pkg.Greeter/SayHello", port=9000)
    assert (undeclared.protocol, undeclared.route) == (
        RouteProtocol.HTTP,
        default("http-egress-deny"),
    )


def test_a_grpc_method_match_takes_only_post() -> None:
    """linkerd2-proxy: a GRPCRoute match never matches another method than POST, while a
    rule without matches matches every request."""
    service = grpc_route("service", "  - matches:\n    - method: {service: pkg.Greeter}\n")
    index = compiled(DENY_NET + "---" + service)
    assert grpc_call(index, "/pkg.Greeter/SayHello").route == route("GRPCRoute", "service")
    for method in ("GET", "post"):
        assert grpc_call(index, "/pkg.Greeter/SayHello", method=method).route == default(
            "grpc-egress-deny"
        ), method
    everything = compiled(DENY_NET + "---" + grpc_route("everything", "  - {}\n"))
    assert grpc_call(everything, "/pkg.Greeter/SayHello", method="GET").route == route(
        "GRPCRoute", "everything"
    )


@pytest.mark.parametrize(
    "match", ["    - headers: [{name: content-type, value: application/grpc}]\n", "    - {}\n"]
)
def test_a_grpc_match_naming_no_method_takes_only_calls(match: str) -> None:
    """linkerd2-proxy's MatchRpc needs a path of two segments even when the match names
    neither service nor method: a header match alone does not open `POST /admin`. Only a
    rule without matches takes everything."""
    index = compiled(DENY_NET + "---" + grpc_route("calls", "  - matches:\n" + match))
    for path in ("/pkg.Greeter/SayHello", "/pkg.Greeter/SayHello/more", "/pkg.Greeter/"):
        assert grpc_call(index, path).route == route("GRPCRoute", "calls"), path
    for path in ("/admin", "/", "admin/x"):
        decided = grpc_call(index, path)
        assert (decided.action, decided.route) == (Action.DENY, default("grpc-egress-deny")), path


ROUTE_HEAD = """
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: r, namespace: egress-test}}
spec:
  parentRefs:
  - {{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}}
"""


@pytest.mark.parametrize(
    ("kind", "rules", "matches_all"),
    [
        ("HTTPRoute", "", True),
        ("HTTPRoute", "  rules: null\n", True),
        ("HTTPRoute", "  rules: []\n", False),
        ("GRPCRoute", "", False),
        ("GRPCRoute", "  rules: null\n", False),
        ("GRPCRoute", "  rules: []\n", False),
    ],
)
def test_only_an_httproute_without_rules_gets_the_default_rule(
    kind: str, rules: str, matches_all: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes fills in the HTTPRoute CRD's default rule (PathPrefix /) where rules is
    absent or null, not where it is `[]`; the GRPCRoute CRD has no default. A route
    without rules matches nothing in linkerd2-proxy: on a Deny network it must not open
    its port to every request, and loading it says it matches nothing."""
    text = DENY_NET + "---" + ROUTE_HEAD.format(kind=kind) + rules
    with caplog.at_level(logging.WARNING, logger="egressproxy.policy"):
        index = compiled(text)
    deny = default("grpc-egress-deny" if kind == "GRPCRoute" else "http-egress-deny")
    for method, path in (("GET", "/admin"), ("POST", "/pkg.Svc/Call")):
        decided = grpc_call(index, path, port=80, method=method)
        expected = (Action.PASS, route(kind, "r")) if matches_all else (Action.DENY, deny)
        assert (decided.action, decided.route) == expected, (method, path)
    warnings = [record.getMessage() for record in caplog.records]
    if matches_all:
        assert warnings == []
    else:
        line = text.count("\n") if rules else text[: text.rindex("spec:")].count("\n") + 1
        assert len(warnings) == 1
        assert warnings[0].startswith(
            f"policy.yaml:{line}: {kind} egress-test/r has no rules: it matches no request"
        ), warnings


def test_a_call_path_splits_as_linkerds_does() -> None:
    """Service and method are the first two segments; what follows does not hide a call
    from its service's rule (nor from a deny of it)."""
    rules = "  - matches:\n    - method: {service: pkg.Greeter, method: SayHello}\n"
    index = compiled(DENY_NET + "---" + grpc_route("hello", rules))
    assert grpc_call(index, "/pkg.Greeter/SayHello/x/y").route == route("GRPCRoute", "hello")
    assert grpc_call(index, "/pkg.Greeter/SayHelloX").route == default("grpc-egress-deny")


def test_grpc_matches_rank_by_the_characters_of_service_then_method() -> None:
    """Gateway API's GRPCRoute precedence, and linkerd2-proxy's: most characters of service
    matched, then of method, then header matches; not how many of them a match names."""
    rules = (
        "  - matches:\n    - method: {method: Check}\n"
        "    backendRefs: [{kind: Service, name: sink, port: 8080}]\n"
        "  - matches:\n    - method: {service: grpc.health.v1.Health}\n"
    )
    index = compiled(DENY_NET + "---" + grpc_route("health", rules))
    check = grpc_call(index, "/grpc.health.v1.Health/Check")
    assert (check.route, check.backend) == (route("GRPCRoute", "health"), None)
    elsewhere = grpc_call(index, "/pkg.Other/Check")
    assert elsewhere.backend is not None
    assert elsewhere.backend.host.startswith("sink.")
    headers = (
        "  - matches:\n    - method: {service: pkg.Greeter}\n"
        "      headers: [{name: x-team, value: blue}]\n"
        "    backendRefs: [{kind: Service, name: sink, port: 8080}]\n"
        "  - matches:\n    - method: {service: pkg.Greeter, method: Hi}\n"
    )
    index = compiled(DENY_NET + "---" + grpc_route("team", headers))
    facts = RequestFacts(
        Destination(EXTERNAL, 50051),
        "api.example.com",
        "POST",
        "/pkg.Greeter/Hi",
        "",
        (("content-type", "application/grpc"), ("x-team", "blue")),
        grpc=True,
    )
    assert index.decide_request(facts).backend is None


@pytest.mark.parametrize("policy", ["Allow", "Deny"])
def test_what_is_no_grpc_call_matches_no_default_route_on_a_grpc_port(policy: str) -> None:
    """linkerd2-proxy's default egress route for gRPC takes only a POST of /service/method,
    as every GRPCRoute match does: a GET, or a path of one segment, that no rule took
    matches no route there (a 404) and is denied here, under the default deny route (on
    an Allow network too: a denial labelled grpc-egress-allow would count as allowed)."""
    net = network("all-egress-traffic", "egress-test", policy)
    service = grpc_route("service", "  - matches:\n    - method: {service: pkg.Greeter}\n")
    index = compiled(net + "---" + service)
    name = f"grpc-egress-{policy.lower()}"
    for method, path in (("GET", "/admin"), ("GET", "/pkg.Other/Call"), ("POST", "/admin")):
        decided = grpc_call(index, path, method=method)
        assert (decided.action, decided.route) == (Action.DENY, default("grpc-egress-deny")), (
            method,
            path,
        )
    called = grpc_call(index, "/pkg.Other/Call")
    expected = Action.PASS if policy == "Allow" else Action.DENY
    assert (called.action, called.route) == (expected, default(name))


def test_tcp_route_fixes_the_port() -> None:
    text = (
        DENY_NET
        + """---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: postgres, namespace: egress-test}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 5432}
  rules:
  - backendRefs:
    - {kind: EgressNetwork, group: policy.linkerd.io, name: all-egress-traffic}
"""
    )
    index = compiled(text)
    decision = decide_ip(index, "203.0.113.9", 5432)
    assert labels(decision) == (
        Action.PASS,
        RouteProtocol.TCP,
        parent(5432),
        route("TCPRoute", "postgres"),
    )
    assert decide_ip(index, "203.0.113.9", 5433).route == default("tcp-egress-deny")


EVERYTHING = "  - matches:\n    - path: {type: PathPrefix, value: /}\n"

TCP_ROUTE_ON_443 = """---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: anything, namespace: egress-test}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
  rules: [{}]
"""
"""A TCPRoute for every address on port 443 of the guide's network (egress-test)."""

TLS_AND_TCP_ON_443 = (
    """---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: api, namespace: egress-test}
spec:
  hostnames: [api.example.com]
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
  rules: [{}]
"""
    + TCP_ROUTE_ON_443
)


def test_a_grpc_route_leaves_the_ports_http_routes_unused() -> None:
    """One kind of route per port, GRPCRoute first: a plain HTTP request to the port is
    a gRPC call that no GRPCRoute matched, not a request for its HTTPRoute."""
    routes = [
        grpc_route("service", "  - matches:\n    - method: {service: pkg.Greeter}\n"),
        http_route("everything", EVERYTHING, port=50051),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    assert grpc_call(index, "/pkg.Greeter/SayHello").route == route("GRPCRoute", "service")
    plain = http(index, "api.example.com", "/", port=50051)
    assert labels(plain) == (
        Action.DENY,
        RouteProtocol.GRPC,
        parent(50051),
        default("grpc-egress-deny"),
    )


def test_a_grpc_route_of_another_namespace_leaves_the_ports_http_routes_unused_for_all() -> None:
    """Linkerd's status controller refuses the HTTPRoute (RouteReasonConflicted) for any
    GRPCRoute on the same network port, whatever its namespace: so for a client the
    GRPCRoute does not serve, the port has no routes and plain HTTP gets the default."""
    global_net = network("global", "linkerd-egress", "Deny")
    producer = (
        http_route("allow-everything", EVERYTHING)
        .replace("namespace: egress-test", "namespace: linkerd-egress")
        .replace("name: all-egress-traffic", "name: global")
    )
    consumer = (
        grpc_route("team-a-grpc", "  - matches:\n    - method: {service: pkg.Svc}\n", port=80)
        .replace("namespace: egress-test", "namespace: team-a")
        .replace("{name: all-egress-traffic,", "{name: global, namespace: linkerd-egress,")
    )
    text = "---".join([global_net, producer, consumer])
    team_b = compiled(text, Settings(namespace="team-b"))
    assert labels(http(team_b, "api.example.com", "/")) == (
        Action.DENY,
        RouteProtocol.HTTP,
        ParentRef("policy.linkerd.io", "EgressNetwork", "linkerd-egress", "global", "80"),
        default("http-egress-deny"),
    )
    without_grpc = compiled("---".join([global_net, producer]), Settings(namespace="team-b"))
    assert http(without_grpc, "api.example.com", "/").action == Action.PASS
    team_a = compiled(text, Settings(namespace="team-a"))
    assert http(team_a, "api.example.com", "/").route == default("grpc-egress-deny")

    def applying(index: PolicyIndex) -> dict[str, object]:
        routes: Any = json.loads(json.dumps(index.describe()))["routes"]
        return {route["ref"]["name"]: route["applies"] for route in routes}

    # /config says so too: it said the HTTPRoute applied
    assert applying(team_a) == {"allow-everything": False, "team-a-grpc": True}
    assert applying(without_grpc) == {"allow-everything": True}


def test_a_tls_route_leaves_the_ports_tcp_routes_unused() -> None:
    """TLSRoute before TCPRoute: TLS goes by SNI (the default when none matches) and
    anything else is refused, as on a port with TLSRoutes alone."""
    index = compiled(DENY_NET + TLS_AND_TCP_ON_443)
    assert tls(index, "api.example.com").route == route("TLSRoute", "api")
    assert labels(tls(index, "other.example.com")) == (
        Action.DENY,
        RouteProtocol.TLS,
        parent(443),
        default("tls-egress-deny"),
    )
    for decision in (opaque(index, 443), http(index, "api.example.com", "/", port=443)):
        assert labels(decision) == (
            Action.DENY,
            RouteProtocol.TLS,
            parent(443),
            default("tls-egress-deny"),
        )
        assert decision.reason == "not TLS on port 443, whose routes are TLSRoutes"


@pytest.mark.parametrize("policy", ["Allow", "Deny"])
@pytest.mark.parametrize("hostnames", ["  hostnames: [api.example.com]\n", ""])
def test_a_tls_route_port_refuses_tls_without_a_server_name(policy: str, hostnames: str) -> None:
    """linkerd2-proxy's TLS stack requires a server name (NewDetectRequiredSni): a hello
    without one, or bytes that are no TLS, are failed before any route, a TLSRoute that
    takes every hostname included. They passed there. Denied under tls-egress-deny, on an
    Allow network too: under tls-egress-allow, a dashboard counted them as allowed."""
    route_text = (
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\n"
        "metadata: {name: api, namespace: egress-test}\nspec:\n" + hostnames + "  parentRefs:\n"
        "  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}\n"
        "  rules: [{}]\n"
    )
    index = compiled(network("all-egress-traffic", "egress-test", policy) + route_text)
    assert tls(index, "api.example.com").route == route("TLSRoute", "api")
    for decision, reason in (
        (tls(index, None), "TLS without a server name on port 443, whose routes are TLSRoutes"),
        (opaque(index, 443), "not TLS on port 443, whose routes are TLSRoutes"),
        (
            http(index, "api.example.com", "/", port=443),
            "not TLS on port 443, whose routes are TLSRoutes",
        ),
    ):
        assert labels(decision) == (
            Action.DENY,
            RouteProtocol.TLS,
            parent(443),
            default("tls-egress-deny"),
        )
        assert decision.reason == reason


def test_a_parent_ref_is_an_egress_network_only_with_linkerds_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As in Linkerd: group and kind compared case-insensitively, and a parentRef without
    group is Gateway API's (group gateway.networking.k8s.io), so it attaches nothing and a
    warning names its line."""
    mixed_case = http_route(
        "mixed-case",
        "  - backendRefs: [{group: Policy.Linkerd.IO, kind: egressnetwork,"
        " name: all-egress-traffic}]\n",
    ).replace(
        "kind: EgressNetwork\n    group: policy.linkerd.io",
        "kind: egressnetwork\n    group: POLICY.linkerd.io",
    )
    assert "kind: egressnetwork" in mixed_case
    decision = compiled(DENY_NET + "---" + mixed_case).decide_request(
        RequestFacts(Destination(EXTERNAL, 80), "a", "GET", "/", "", (), grpc=False)
    )
    assert (decision.action, decision.route) == (Action.PASS, route("HTTPRoute", "mixed-case"))
    no_group = http_route("no-group", "  - {}\n").replace("    group: policy.linkerd.io\n", "")
    text = DENY_NET + "---" + no_group
    with caplog.at_level("INFO", logger="egressproxy.policy"):
        index = compiled(text)
    assert request(index, "/") == "http-egress-deny"
    line = text.splitlines().index("  - name: all-egress-traffic") + 1
    assert (
        f"policy.yaml:{line}: HTTPRoute egress-test/no-group.spec.parentRefs[0] is not an "
        "EgressNetwork: it has no group, which Gateway API defaults to "
        "gateway.networking.k8s.io (add group: policy.linkerd.io)"
    ) in caplog.messages


@pytest.mark.parametrize("version", ["v1beta1", "v1beta2", "v1beta3"])
def test_linkerds_own_httproute_attaches_too(version: str) -> None:
    """policy.linkerd.io's HTTPRoute has Gateway API's schema, but its CRD defaults a
    parentRef's group to policy.linkerd.io; its metrics say route_group policy.linkerd.io."""
    linkerd_route = (
        http_route("linkerd-flavoured", "  - matches:\n    - path: {value: /get}\n")
        .replace("gateway.networking.k8s.io/v1", f"policy.linkerd.io/{version}")
        .replace("    group: policy.linkerd.io\n", "")
    )
    index = compiled(DENY_NET + "---" + linkerd_route)
    decision = index.decide_request(
        RequestFacts(Destination(EXTERNAL, 80), "a", "GET", "/get", "", (), grpc=False)
    )
    assert (decision.action, decision.route) == (
        Action.PASS,
        RouteRef("policy.linkerd.io", "HTTPRoute", "egress-test", "linkerd-flavoured"),
    )
    assert request(index, "/post") == "http-egress-deny"


def test_section_name_is_ignored_as_in_linkerd() -> None:
    """Linkerd attaches a route whose EgressNetwork parentRef names a section as if it named
    none, and its proxy's parent_section_name is "" for every EgressNetwork parent (the
    policy controller gives the parent no section)."""
    text = (
        DENY_NET
        + "---"
        + http_route("r", "  - {}\n").replace("    port: 80", "    port: 80\n    sectionName: web")
    )
    decision = compiled(text).decide_request(
        RequestFacts(Destination(EXTERNAL, 80), "a", "GET", "/", "", (), grpc=False)
    )
    assert decision.action is Action.PASS
    assert decision.parent == parent(80)
    labels = dict(zip(ROUTE_IDENTITY, route_identity(decision.parent, decision.route), strict=True))
    assert labels["parent_section_name"] == ""
    assert labels["route_name"] == "r"


def test_annotations_and_global_audit() -> None:
    annotated = network(
        "all-egress-traffic",
        "egress-test",
        "Deny",
        extra="  annotations:\n    egressproxy.io/audit: 'true'\n"
        "    egressproxy.io/verify-destination: enforce",
    )
    decision = decide_ip(compiled(annotated), "203.0.113.1")
    assert (decision.action, decision.audit, decision.verify_destination) == (
        Action.DENY,
        True,
        "enforce",
    )
    plain = decide_ip(compiled(DENY_NET), "203.0.113.1")
    assert (plain.audit, plain.verify_destination) == (False, None)
    audited = decide_ip(
        compiled(DENY_NET, Settings(namespace="egress-test", audit=True)), "203.0.113.1"
    )
    assert audited.audit is True
    allowed = decide_ip(
        compiled(network("n", "egress-test", "Allow"), Settings(audit=True)), "203.0.113.1"
    )
    assert (allowed.action, allowed.audit) == (Action.PASS, True), "a denial of it (ECH) is audited"


def test_describe_is_json() -> None:
    description = step("linkerd-5-redirect.yaml").describe()
    text = json.dumps(description)
    assert "unencrypted-http" in text and "internal-egress" in text
    assert str(description["file"]).endswith("linkerd-5-redirect.yaml")


def route_problems(document: str) -> list[tuple[int | None, str]]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(DENY_NET + "---" + document, "policy.yaml")
    return [(problem.line, problem.reason) for problem in caught.value.problems]


def line_of(document: str, text: str) -> int:
    """The line of text in the policy route_problems loads."""
    whole = DENY_NET + "---" + document
    return whole[: whole.index(text)].count("\n") + 1


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute", "TLSRoute"])
@pytest.mark.parametrize("address", ["203.0.113.5", "'2001:db8::5'"])
def test_route_hostnames_refuse_ip_addresses(kind: str, address: str) -> None:
    """Gateway API hostnames: "IPs are not allowed" (and SNI never carries one, RFC 6066 3):
    addresses are an EgressNetwork's networks."""
    document = (
        http_route("by-ip", "  - {}\n", hostnames=f"  hostnames: [{address}]")
        .replace("kind: HTTPRoute", f"kind: {kind}")
        .replace("gateway.networking.k8s.io/v1\n", "gateway.networking.k8s.io/v1alpha2\n")
    )
    assert route_problems(document) == [
        (
            line_of(document, "  hostnames:"),
            f"{kind} egress-test/by-ip.spec.hostnames: {address.strip(chr(39))!r} is an IP "
            "address, not a hostname: match addresses with an EgressNetwork's networks",
        )
    ]


def test_route_hostnames_hint_at_the_idna_form() -> None:
    document = http_route("idn", "  - {}\n", hostnames="  hostnames: [bücher.example]")
    assert route_problems(document) == [
        (
            line_of(document, "  hostnames:"),
            "HTTPRoute egress-test/idn.spec.hostnames: 'bücher.example' is not a valid hostname "
            "(an internationalised name: write its IDNA form 'xn--bcher-kva.example')",
        )
    ]


HEADER_NAME_PROBLEM = "is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)"


@pytest.mark.parametrize("match_type", ["Exact", "RegularExpression"])
def test_header_match_names_are_tokens(match_type: str) -> None:
    """Gateway API's HTTPHeaderName pattern, whatever the match type (it makes the value a
    regex, never the name): a name with a space never matches a request's header."""
    header = f"      - {{type: {match_type}, name: x team, value: blue}}\n"
    http = http_route("h", "  - matches:\n    - headers:\n" + header)
    grpc = grpc_route("g", "  - matches:\n    - headers:\n" + header)
    assert route_problems(http) == [
        (
            line_of(http, "name: x team"),
            "HTTPRoute egress-test/h.spec.rules[0].matches[0].headers[0].name: 'x team' "
            + HEADER_NAME_PROBLEM,
        )
    ]
    assert route_problems(grpc) == [
        (
            line_of(grpc, "name: x team"),
            "GRPCRoute egress-test/g.spec.rules[0].matches[0].headers[0].name: 'x team' "
            + HEADER_NAME_PROBLEM,
        )
    ]


@pytest.mark.parametrize(
    ("method", "problem"),
    [
        (
            "{service: pkg.Greeter/SayHello}",
            "service: 'pkg.Greeter/SayHello' is not a protobuf service name (pkg.Service)",
        ),
        ("{service: pkg Greeter}", "service: 'pkg Greeter' is not a protobuf service name"),
        ("{service: pkg.Greeter, method: Say Hello}", "method: 'Say Hello' is not a method name"),
        ("{type: Exact, method: pkg.SayHello}", "method: 'pkg.SayHello' is not a method name"),
        (
            "{service: pkg.\u212aube}",
            "service: 'pkg.\u212aube' is not a protobuf service name",
        ),
        (
            "{service: .pkg.Greeter}",
            "service: '.pkg.Greeter' matches no call a gRPC client makes: its path names the"
            " service without the leading dot (write 'pkg.Greeter')",
        ),
    ],
)
def test_grpc_exact_names_are_protobuf_names(method: str, problem: str) -> None:
    """GRPCMethodMatch's CEL rules for Exact: no `/` or space, which no /service/method path
    can carry, and ASCII letters only (the Kelvin sign is no K, though it folds to one)."""
    document = grpc_route("g", f"  - matches:\n    - method: {method}\n")
    problems = route_problems(document)
    assert len(problems) == 1
    line, reason = problems[0]
    assert line == line_of(document, "    - method:")
    assert reason.startswith(f"GRPCRoute egress-test/g.spec.rules[0].matches[0].method.{problem}")


def test_a_grpc_regular_expression_method_match_is_refused() -> None:
    """linkerd's policy controller refuses a GRPCRoute whose method match is a
    RegularExpression (its proxy matches names exactly): pasted here, it is an error rather
    than a route Linkerd would not have."""
    document = grpc_route(
        "g",
        "  - matches:\n    - method:\n"
        "        {type: RegularExpression, service: pkg.Greeter, method: SayHello}\n",
    )
    assert route_problems(document) == [
        (
            line_of(document, "type: RegularExpression"),
            "GRPCRoute egress-test/g.spec.rules[0].matches[0].method.type: RegularExpression"
            " is not supported: Linkerd's policy controller refuses such a GRPCRoute (match"
            " service and method exactly)",
        )
    ]


@pytest.mark.parametrize(("key", "name"), [("headers", "X-Team"), ("queryParams", "v")])
def test_a_match_name_given_twice_is_refused(key: str, name: str) -> None:
    """Gateway API's headers and queryParams are lists keyed by name (listType=map): the API
    server refuses a manifest that repeats one, so a pasted one is refused here too."""
    rules = (
        f"  - matches:\n    - {key}:\n      - {{name: {name}, value: blue}}\n"
        f"      - {{name: {name}, value: green}}\n"
    )
    document = http_route("twice", rules)
    assert route_problems(document) == [
        (
            line_of(document, "green"),
            f"HTTPRoute egress-test/twice.spec.rules[0].matches[0].{key}[1].name: "
            f"{name!r} is given twice in {key}",
        )
    ]


def test_only_the_first_header_match_of_a_name_counts() -> None:
    """HTTPHeaderMatch and GRPCHeaderMatch: names equal but for case are one name, and "only
    the first entry with an equivalent name MUST be considered for a match"."""
    headers = "      - {name: X-Team, value: blue}\n      - {name: x-team, value: green}\n"
    index = compiled(
        "---".join(
            [
                DENY_NET,
                http_route("teams", "  - matches:\n    - headers:\n" + headers),
                grpc_route("calls", "  - matches:\n    - headers:\n" + headers),
            ]
        )
    )
    assert request(index, "/", headers=(("x-team", "blue"),)) == "teams"
    assert request(index, "/", headers=(("x-team", "green"),)) == "http-egress-deny"
    for team, route_name in (("blue", "calls"), ("green", "grpc-egress-deny")):
        facts = RequestFacts(
            Destination(EXTERNAL, 50051),
            "example.com",
            "POST",
            "/pkg.Greeter/SayHello",
            "",
            (("content-type", "application/grpc"), ("x-team", team)),
            grpc=True,
        )
        decision = index.decide_request(facts)
        assert decision.route is not None
        assert decision.route.name == route_name


def test_query_parameter_names_differing_in_case_are_two_names() -> None:
    """HTTPQueryParamMatch names match exactly: `v` and `V` are two parameters, both required."""
    query = "      - {name: v, value: '1'}\n      - {name: V, value: '2'}\n"
    index = compiled(
        DENY_NET + "---" + http_route("q", "  - matches:\n    - queryParams:\n" + query)
    )
    assert request(index, "/", query="v=1&V=2") == "q"
    assert request(index, "/", query="v=1") == "http-egress-deny"


@pytest.mark.parametrize(
    ("item", "empty"),
    [
        ("{name: v, value: ''}", "value"),
        ("{name: '', value: '1'}", "name"),
        ("{type: RegularExpression, name: v, value: ''}", "value"),
    ],
)
def test_query_match_names_and_values_are_not_empty(item: str, empty: str) -> None:
    """HTTPQueryParamMatch's name and value have MinLength=1: a pasted manifest with an empty
    one is refused here as the API server refuses it, not read as "any value"."""
    document = http_route("q", f"  - matches:\n    - queryParams:\n      - {item}\n")
    assert route_problems(document) == [
        (
            line_of(document, item),
            f"HTTPRoute egress-test/q.spec.rules[0].matches[0].queryParams[0].{empty}: "
            "must not be empty",
        )
    ]


def test_header_match_values_are_not_empty() -> None:
    document = http_route("h", "  - matches:\n    - headers:\n      - {name: x-team, value: ''}\n")
    assert route_problems(document) == [
        (
            line_of(document, "{name: x-team"),
            "HTTPRoute egress-test/h.spec.rules[0].matches[0].headers[0].value: must not be empty",
        )
    ]


def test_an_empty_grpc_service_matches_any_service() -> None:
    """GRPCMethodMatch.service: "If left empty or omitted, will match any service"."""
    index = compiled(
        DENY_NET
        + "---"
        + grpc_route("any", "  - matches:\n    - method: {service: '', method: Get}\n")
    )
    for path, route_name in (("/pkg.Svc/Get", "any"), ("/pkg.Svc/Put", "grpc-egress-deny")):
        facts = RequestFacts(
            Destination(EXTERNAL, 50051),
            "example.com",
            "POST",
            path,
            "",
            (("content-type", "application/grpc"),),
            grpc=True,
        )
        decision = index.decide_request(facts)
        assert decision.route is not None
        assert decision.route.name == route_name


def test_a_grpc_method_match_with_both_parts_empty_is_refused() -> None:
    document = grpc_route("none", "  - matches:\n    - method: {service: '', method: ''}\n")
    problems = route_problems(document)
    assert len(problems) == 1
    assert problems[0][1].endswith("one of service or method is required")


@pytest.mark.parametrize("group", ['""', "core"])
def test_a_service_backend_ref_of_the_core_group_is_a_service(group: str) -> None:
    """Linkerd's policy controller takes a Service backendRef of group "" or `core`
    alike: a route written with `group: core` sends its requests to the Service, and
    refusing it refused a policy Linkerd applies."""
    rules = f"  - backendRefs: [{{group: {group}, kind: Service, name: sink, port: 8080}}]\n"
    index = compiled(DENY_NET + "---" + http_route("to-sink", rules))
    facts = RequestFacts(Destination(EXTERNAL, 80), "example.com", "GET", "/", "", (), grpc=False)
    decision = index.decide_request(facts)
    assert decision.route == route("HTTPRoute", "to-sink")
    assert decision.backend is not None and decision.backend.host.startswith("sink.")
    assert decision.backend.port == 8080


@pytest.mark.parametrize("value", ["yes", "True", "1", ""])
def test_the_audit_annotation_is_true_or_false_and_nothing_else(value: str) -> None:
    """A value read loosely (`yes` as true, or as false) turns a network's denials into
    logged passes, or the other way, on a word its author may have meant otherwise: the
    policy is refused instead, naming the annotation."""
    annotated = network(
        "all-egress-traffic",
        "egress-test",
        "Deny",
        extra=f"  annotations:\n    egressproxy.io/audit: '{value}'\n",
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_text(annotated, "policy.yaml")
    assert [problem.reason for problem in caught.value.problems] == [
        "EgressNetwork egress-test/all-egress-traffic.spec: annotation egressproxy.io/audit"
        ' must be "true" or "false"'
    ]
