"""Egress control that holds (issue 9): spoofed names, Encrypted Client Hello, audit mode,
least privilege — through the real redirect.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import dns_server
from .clients import TlsClient, bytes_before_close, http_request, recv_line, recv_until_eof
from .proxy_process import Proxy
from .world import NETNS_ETC, World

pytestmark = pytest.mark.e2e

StartProxy = Callable[..., Proxy]

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
CAPTURES = Path(__file__).resolve().parents[1] / "captures"
TLS_ROUTE_POLICY = (EXAMPLES / "linkerd-4-tlsroute.yaml").read_text()
"""Default Deny; HTTP /get and TLS httpbin.org allowed."""
DENY_ALL_POLICY = (EXAMPLES / "linkerd-2-deny.yaml").read_text()
SETTLE_TIMEOUT = 5.0


def metric_samples(proxy: Proxy, name: str) -> list[tuple[dict[str, str], float]]:
    status, body = proxy.admin_get("/metrics")
    assert status == 200
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    ]


def settled(proxy: Proxy, name: str, total: float) -> list[tuple[dict[str, str], float]]:
    """The samples of `name` once they add up to `total` (closes are counted after the fact)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        samples = metric_samples(proxy, name)
        if sum(value for _, value in samples) >= total or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def spoofed_tls_get(world: World, sni: str, address: str) -> dict[str, object] | None:
    """A TLS GET carrying `sni`, sent to `address`; the server's echo, or None if cut off."""
    with world.connect(address, 443) as sock:
        client = TlsClient(sock, world.tls_context(), sni)
        try:
            client.handshake()
        except OSError:
            return None
        client.send(http_request(sni, "/get", "Connection: close\r\n"))
        status, _, body = client.recv_http_response()
        sock.shutdown(socket.SHUT_WR)
        recv_until_eof(sock)
    assert status == 200
    echoed: dict[str, object] = json.loads(body)
    return echoed


def server_address(echoed: dict[str, object]) -> object:
    server = echoed["server"]
    assert isinstance(server, dict)
    return server["address"]


@pytest.mark.parametrize("mode", ["off", "log", "enforce"])
def test_sni_of_an_allowed_host_sent_to_another_address(
    world: World, proxy: StartProxy, mode: str
) -> None:
    running = proxy(TLS_ROUTE_POLICY, "--verify-destination", mode)
    github = world.host("github.com")
    echoed = spoofed_tls_get(world, "httpbin.org", github.v4)
    if mode == "enforce":
        assert echoed is None
        closes = settled(running, "outbound_tls_route_close_total", 1)
        assert [(labels["route_name"], labels["error"]) for labels, n in closes if n] == [
            ("tls-egress", "destination_mismatch")
        ]
    else:
        assert echoed is not None and server_address(echoed) == github.v4
    if mode == "off":
        assert metric_samples(running, "egress_destination_mismatch_total") == []
    else:  # log counts it when the lookup answers, which the traffic does not wait for
        mismatches = settled(running, "egress_destination_mismatch_total", 1)
        assert mismatches == [({"hostname": "httpbin.org", "mode": mode}, 1.0)]
    honest = spoofed_tls_get(world, "httpbin.org", world.host("httpbin.org").v4)
    assert honest is not None and server_address(honest) == world.host("httpbin.org").v4


def test_a_network_annotation_enforces_verification(world: World, proxy: StartProxy) -> None:
    annotated = TLS_ROUTE_POLICY.replace(
        "  name: all-egress-traffic\n",
        "  name: all-egress-traffic\n"
        "  annotations:\n"
        "    egressproxy.io/verify-destination: enforce\n",
        1,
    )
    assert annotated != TLS_ROUTE_POLICY
    proxy(annotated)
    assert spoofed_tls_get(world, "httpbin.org", world.host("github.com").v4) is None


@pytest.mark.parametrize("mode", ["log", "enforce"])
def test_spoofed_host_header(world: World, proxy: StartProxy, mode: str) -> None:
    running = proxy(TLS_ROUTE_POLICY, "--verify-destination", mode)
    github = world.host("github.com")
    result = world.curl(
        "-4", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: httpbin.org",
        f"http://{github.v4}/get",
    )  # fmt: skip
    assert result.stdout.decode() == ("421" if mode == "enforce" else "200")
    assert settled(running, "egress_destination_mismatch_total", 1) == [
        ({"hostname": "httpbin.org", "mode": mode}, 1.0)
    ]


def test_a_name_is_verified_as_itself_not_as_the_search_list_makes_it(
    world: World, proxy: StartProxy
) -> None:
    """In a pod (search svc.cluster.local, ndots:5) `victim.test` is first asked as
    `victim.test.svc.cluster.local`: the Service `victim` of a namespace `test`, pointed
    wherever whoever may create that namespace likes. Enforce verifies the name itself:
    its absolute form has no address, so a request for it to that address is refused,
    while a name whose absolute form resolves there passes."""
    resolv_conf = NETNS_ETC / world.client_ns / "resolv.conf"
    if not resolv_conf.exists():
        pytest.skip("the world has no resolv.conf (the host has none to bind it over)")
    github = world.host("github.com").v4
    search = "svc.cluster.local"
    addresses = {f"victim.test.{search}": github, "honest.test": github}
    with dns_server.serving(world.client_ns, resolv_conf, search, addresses) as asked:
        running = proxy(None, "--verify-destination", "enforce")
        statuses = [
            world.curl(
                "-4", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {name}",
                f"http://{github}/get",
            ).stdout.decode()
            for name in ("victim.test", "honest.test")
        ]  # fmt: skip
    assert statuses == ["421", "200"]
    assert metric_samples(running, "egress_destination_mismatch_total") == [
        ({"hostname": "victim.test", "mode": "enforce"}, 1.0)
    ]
    assert set(asked) == {"victim.test", "honest.test"}


@pytest.mark.parametrize("ech", ["allow", "deny", "deny-audited"])
def test_encrypted_client_hello(world: World, proxy: StartProxy, ech: str) -> None:
    """A hello with the ECH extension (0xfe0d) is seen by policy and decided on its outer SNI;
    under --audit, --ech deny only logs and counts it as would_deny."""
    hello = (CAPTURES / "curl_tls13_ech.bin").read_bytes()
    audited = ech == "deny-audited"
    running = proxy(None, "--ech", ech.removesuffix("-audited"), *(["--audit"] if audited else []))
    with world.connect(world.host("example.test").v4, 443) as sock:
        sock.sendall(hello)
        answer = bytes_before_close(sock)
    if ech == "deny":
        assert answer == b""
        closes = settled(running, "outbound_tcp_route_close_total", 1)
        assert [labels["error"] for labels, value in closes if value] == ["forbidden"]
        assert running.logged(r"\bech=true route=\S+ decision=deny\b"), running.log_text()
    else:
        assert answer is None or answer.startswith(b"\x16\x03")
    if audited:
        would_deny = settled(running, "egress_audit_would_deny_total", 1)
        assert [(labels["route_name"], value) for labels, value in would_deny] == [
            ("tcp-egress-allow", 1.0)
        ]
        assert running.logged(r"\bech=true route=\S+ decision=would_deny\b"), running.log_text()
    assert running.logged(r"\bech=true\b"), running.log_text()
    assert metric_samples(running, "egress_encrypted_client_hellos_total") == [({}, 1.0)]


def test_a_would_deny_no_network_covers_is_counted(world: World, proxy: StartProxy) -> None:
    """--ech deny under --audit, on traffic no EgressNetwork covers (in the cluster networks
    here): it passes as would_deny and is counted as one, with the empty parent and route
    labels of traffic that has neither."""
    hello = (CAPTURES / "curl_tls13_ech.bin").read_bytes()
    address = world.host("example.test").v4
    running = proxy(None, "--ech", "deny", "--audit", "--cluster-networks", f"{address}/32")
    with world.connect(address, 443) as sock:
        sock.sendall(hello)
        answer = bytes_before_close(sock)
    assert answer is None or answer.startswith(b"\x16\x03")
    assert running.logged(r"\bech=true route=- decision=would_deny\b"), running.log_text()
    no_route = dict.fromkeys(
        (
            *("parent_group", "parent_kind", "parent_namespace", "parent_name", "parent_port"),
            *("parent_section_name", "route_group", "route_kind", "route_namespace", "route_name"),
        ),
        "",
    )
    assert settled(running, "egress_audit_would_deny_total", 1) == [
        ({**no_route, "hostname": "example.test"}, 1.0)
    ]


def test_audit_mode_lets_denials_pass_and_counts_them(world: World, proxy: StartProxy) -> None:
    running = proxy(DENY_ALL_POLICY, "--audit")
    status = world.curl("-4", "-o", "/dev/null", "-w", "%{http_code}", "http://httpbin.org/get")
    assert status.stdout.decode() == "200"
    would_deny = settled(running, "egress_audit_would_deny_total", 1)
    assert [(labels["route_name"], value) for labels, value in would_deny] == [
        ("http-egress-deny", 1.0)
    ]
    assert running.logged("decision=would_deny"), running.log_text()


def test_an_audit_annotation_applies_to_its_network_only(world: World, proxy: StartProxy) -> None:
    audited = DENY_ALL_POLICY.replace(
        "  name: all-egress-traffic\n",
        '  name: all-egress-traffic\n  annotations:\n    egressproxy.io/audit: "true"\n',
        1,
    )
    assert audited != DENY_ALL_POLICY
    proxy(audited)
    with world.connect(world.host("github.com").v4, 443) as sock:
        client = TlsClient(sock, world.tls_context(), "github.com")
        client.handshake()
    assert client.version is not None


def test_the_admin_server_never_proxies(world: World, proxy: StartProxy) -> None:
    running = proxy()
    assert running.admin_get("http://httpbin.org/get")[0] == 404
    with world.connect("127.0.0.1", 4191) as sock:
        sock.sendall(b"CONNECT httpbin.org:443 HTTP/1.1\r\nHost: httpbin.org:443\r\n\r\n")
        assert recv_line(sock) == b"HTTP/1.1 405 \r\n"


def test_mark_without_the_capability_is_a_clear_error(world: World, proxy: StartProxy) -> None:
    refused = proxy(None, "--mark", "7", ready=False)
    assert refused.wait(10) == 2
    assert "--mark needs CAP_NET_ADMIN" in refused.log_text()
    assert "Traceback" not in refused.log_text()
