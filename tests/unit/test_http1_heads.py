"""The pure pieces of http1: heads written back from h11 events, and the facts policy sees."""

from __future__ import annotations

import ipaddress

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressproxy.http1 import (
    parse_request,
    request_head,
    response_head,
    without_upgrade,
)
from egressproxy.policy.decision import Destination
from egressproxy.sniff.http import authority_host

DESTINATION = Destination(ipaddress.ip_address("203.0.113.10"), 80)
TCHAR = "!#$%&'*+-.^_`|~0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKEN = st.text(alphabet=TCHAR, min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(
    lambda text: text.replace(" ", "")
) | st.just("two words")
FRAMING = {"content-length", "transfer-encoding", "host"}
HEADER = st.tuples(TOKEN, VALUE).filter(lambda pair: pair[0].lower() not in FRAMING)
TARGET = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&%.-_~", max_size=30).map(
    lambda text: "/" + text
) | st.sampled_from(["*", "http://example.test/x?y=1", "example.test:443"])


def parse_one(data: bytes, role: type[h11.CLIENT] | type[h11.SERVER]) -> h11.Request | h11.Response:
    connection = h11.Connection(role)
    connection.receive_data(data)
    event = connection.next_event()
    assert isinstance(event, h11.Request | h11.Response | h11.InformationalResponse)
    return event  # type: ignore[return-value]


@given(
    method=TOKEN,
    target=TARGET,
    version=st.sampled_from(["1.0", "1.1"]),
    host_case=st.sampled_from(["Host", "host", "HOST", "hOsT"]),
    headers=st.lists(HEADER, max_size=8),
    host_position=st.integers(min_value=0, max_value=8),
)
def test_request_head_is_what_the_client_sent(
    method: str,
    target: str,
    version: str,
    host_case: str,
    headers: list[tuple[str, str]],
    host_position: int,
) -> None:
    """Written back from h11's event, a canonical head is byte for byte the original,
    and h11 parses it to the same event (names, case, order, target form)."""
    headers.insert(min(host_position, len(headers)), (host_case, "example.test"))
    original = f"{method} {target} HTTP/{version}\r\n".encode()
    original += b"".join(f"{name}: {value}\r\n".encode() for name, value in headers) + b"\r\n"
    event = parse_one(original, h11.SERVER)
    written = request_head(event)  # type: ignore[arg-type]
    assert written == original
    again = parse_one(written, h11.SERVER)
    assert again.headers.raw_items() == event.headers.raw_items()
    assert (again.method, again.target, again.http_version) == (  # type: ignore[union-attr]
        event.method,  # type: ignore[union-attr]
        event.target,  # type: ignore[union-attr]
        event.http_version,
    )


@given(
    status=st.integers(min_value=100, max_value=599).filter(lambda code: code != 101),
    reason=st.sampled_from(["", "OK", "Not Found", "Whatever You Like"]),
    headers=st.lists(HEADER, max_size=8),
)
def test_response_head_is_what_the_upstream_sent(
    status: int, reason: str, headers: list[tuple[str, str]]
) -> None:
    original = f"HTTP/1.1 {status} {reason}\r\n".encode()
    original += b"".join(f"{name}: {value}\r\n".encode() for name, value in headers) + b"\r\n"
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(original)
    event = client.next_event()
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    assert response_head(event) == original


def test_obsolete_whitespace_is_normalised_the_way_h11_reads_it() -> None:
    event = parse_one(b"GET / HTTP/1.1\r\nHost:   example.test  \r\nX-A:\t1\r\n\r\n", h11.SERVER)
    assert request_head(event) == b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\n\r\n"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("Example.Test", "example.test"),
        ("example.test:8080", "example.test"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("203.0.113.5:80", "203.0.113.5"),
        (" example.test ", "example.test"),
        ("example.test.:80", "example.test"),
        ("evil.example:", "evil.example"),
        ("evil.example.:", "evil.example"),
        (".", None),
        ("", None),
        ("[", None),
        ("evil.example:80:80", None),
        ("evil.example:x", None),
        ("evil.example:99999", None),
        ("2001:db8::1", None),
        ("evil example", None),
        ("user@evil.example", None),
        ("\tallowed.example ", "allowed.example"),
        ("allowed.example\xa0", None),
        ("allowed.example\x85", None),
        ("\x1callowed.example", None),
        ("allowed.example\x1f", None),
    ],
)
def test_authority_host(authority: str, host: str | None) -> None:
    """An empty port is no port; what is not `host[:port]` has no host (and is refused):
    only HTTP's whitespace (space, tab) around it is not part of it."""
    assert authority_host(authority) == host


def request(head: bytes) -> h11.Request:
    event = parse_one(head, h11.SERVER)
    assert isinstance(event, h11.Request)
    return event


def test_facts_of_an_origin_form_request() -> None:
    parsed = parse_request(
        request(
            b"POST /api/v1?x=1&y=2 HTTP/1.1\r\nHost: API.example.test:80\r\n"
            b"Content-Type: application/grpc+proto\r\nContent-Length: 5\r\n\r\n"
        ),
        DESTINATION,
    )
    facts = parsed.facts
    assert (facts.hostname, facts.method, facts.path, facts.query) == (
        "api.example.test",
        "POST",
        "/api/v1",
        "x=1&y=2",
    )
    assert facts.headers[0] == ("host", "API.example.test:80")
    assert facts.grpc and parsed.has_body and not parsed.smuggling


def test_absolute_form_authority_wins_over_host() -> None:
    parsed = parse_request(
        request(b"GET http://user@Other.Test:8080/p?q HTTP/1.1\r\nHost: example.test\r\n\r\n"),
        DESTINATION,
    )
    assert (parsed.facts.hostname, parsed.facts.path, parsed.facts.query) == (
        "other.test",
        "/p",
        "q",
    )
    assert not parsed.has_body


def test_connect_is_decided_on_its_target() -> None:
    parsed = parse_request(
        request(b"CONNECT example.test:443 HTTP/1.1\r\nHost: other.test\r\n\r\n"), DESTINATION
    )
    assert (parsed.facts.hostname, parsed.facts.path) == ("example.test", "/")


def test_content_length_beside_chunked_is_smuggling() -> None:
    parsed = parse_request(
        request(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ),
        DESTINATION,
    )
    assert parsed.smuggling and parsed.has_body


def test_h2c_upgrade_is_flagged_and_removed() -> None:
    event = request(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMAAABk\r\nX-A: 1\r\n\r\n"
    )
    assert parse_request(event, DESTINATION).h2c_upgrade
    assert request_head(without_upgrade(event)) == b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n"
    websocket = request(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
    assert not parse_request(websocket, DESTINATION).h2c_upgrade


def test_head_size_counts_every_line() -> None:
    head = b"GET /abc HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 1000 + b"\r\n\r\n"
    assert parse_request(request(head), DESTINATION).head_size == len(head)
