"""Protocol detection over the first bytes: dispatch, prefixes, and answers that never change."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from egressproxy.flow import _classify
from egressproxy.policy.decision import Detected
from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    H2Preface,
    Hold,
    HttpRequestHead,
    NeedMore,
    Opaque,
    Sniffed,
    TlsHello,
    detect,
)
from egressproxy.sniff.detect import Sniffer, sniff
from egressproxy.sniff.http import EMPTY_LINES_ALLOWED, LOOSE_SPACE, could_begin_request
from egressproxy.sniff.tls import RecordWalk

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
RESULT_TYPES = (TlsHello, HttpRequestHead, H2Preface, Opaque, NeedMore)

EXPECTED = {
    "chromium.bin": TlsHello("example.test", ("h2", "http/1.1"), ech=True),
    "chromium_three_records.bin": TlsHello("example.test", ("h2", "http/1.1"), ech=True),
    "curl_tls12.bin": TlsHello("www.example.com", ("h2", "http/1.1"), ech=False),
    "curl_tls13.bin": TlsHello("example.test", ("h2", "http/1.1"), ech=False),
    "curl_tls13_ech.bin": TlsHello("example.test", ("h2", "http/1.1"), ech=True),
    "curl_tls13_two_records.bin": TlsHello("example.test", ("h2", "http/1.1"), ech=False),
    "openssl_no_sni.bin": TlsHello(None, ("http/1.1",), ech=False),
    "openssl_s_client.bin": TlsHello("api.example.org", (), ech=False),
    "python_ssl.bin": TlsHello("python.example.net", ("http/1.1",), ech=False),
    "curl_http_origin_form.bin": HttpRequestHead(
        "GET", "/get?x=1", "HTTP/1.1", "example.test", 18080
    ),
    "curl_http_absolute_form.bin": HttpRequestHead(
        "GET", "http://WWW.Example.COM:8080/path", "HTTP/1.1", "www.example.com", 8080
    ),
    "curl_http_connect.bin": HttpRequestHead(
        "CONNECT", "api.example.org:443", "HTTP/1.1", "api.example.org", 443
    ),
    "curl_http_ipv6_host.bin": HttpRequestHead("GET", "/", "HTTP/1.1", "2001:db8::1", 8080),
}
P_HEADS = {
    b"POST /form HTTP/1.1\r\nHost: p.example\r\nContent-Length: 3\r\n\r\n": HttpRequestHead(
        "POST", "/form", "HTTP/1.1", "p.example", None
    ),
    b"PUT /x HTTP/1.0\r\n\r\n": HttpRequestHead("PUT", "/x", "HTTP/1.0", None, None),
    b"PATCH /x HTTP/1.1\r\nHost: [2001:db8::2]\r\n\r\n": HttpRequestHead(
        "PATCH", "/x", "HTTP/1.1", "2001:db8::2", None
    ),
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": H2Preface(),
}


def load(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def test_every_capture_is_expected_here() -> None:
    captures = {path.name for path in CAPTURES.glob("*.bin")}
    assert captures == {*EXPECTED, "curl_h2_prior_knowledge.bin"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_prefix_of_a_capture_needs_more(name: str) -> None:
    capture = load(name)
    for end in range(len(capture)):
        assert sniff(capture[:end]) is NEED_MORE, end
    assert sniff(capture) == EXPECTED[name]
    assert sniff(capture + b"\x00\xffjunk" * 10) == EXPECTED[name]


@pytest.mark.parametrize(("head", "expected"), list(P_HEADS.items()))
def test_heads_starting_with_p(head: bytes, expected: H2Preface | HttpRequestHead) -> None:
    for end in range(len(head)):
        assert sniff(head[:end]) is NEED_MORE, head[:end]
    assert sniff(head) == expected
    assert sniff(head + b"\x00\x00\x12\x04\x00") == expected


def test_h2_prior_knowledge_capture() -> None:
    assert sniff(load("curl_h2_prior_knowledge.bin")) == H2Preface()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00", "unknown_protocol"),  # PostgreSQL, MySQL replies, most binary protocols
        (b"*1\r\n$4\r\nPING\r\n", "not_http"),  # Redis
        (b"\x80\x2e\x01\x03\x01", "unknown_protocol"),  # SSLv2-compatible ClientHello
        (b"get key\r\n", "not_http"),  # memcached
        (b"NICK egress\r\n", "not_http"),  # IRC
        (b"INVITE sip:a@example.test SIP/2.0\r\n", "not_http"),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "not_http"),
        (b"PRI * HTTP/2.0\r\n\r\nXX", "unsupported_version"),
        (b"PING\r\n", "not_http"),
        # LDAP's bind (ASN.1): `0`, a length that is whitespace (0x1d), then a tag, \x02
        (b"0\x1d\x02\x01\x01`\x18\x02\x01\x03\x04\x08cn=admin\x80\x09password", "not_http"),
        (b"\x16\x03\x01\x00\x05\x02", "not_client_hello"),
        (b"\x16\x10", "not_tls"),
        (b"\x15\x03\x03\x00\x02\x02\x28\x17", "not_tls"),  # an alert, then no hello
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "bad_host"),
    ],
)
def test_rejected_early(data: bytes, reason: str) -> None:
    assert sniff(data) == Opaque(reason)


IRREGULAR_REQUEST_LINES = [
    b"GET  / HTTP/1.1",
    b"GET / HTTP/1.1 ",
    b"GET\t/ HTTP/1.1",
    b"GET /caf\xc3\xa9 HTTP/1.1",
    b"get / HTTP/1.1",
    b"get / http/1.1",
    b"A" * 30 + b" / HTTP/1.1",
    b"X" * 65 + b" / HTTP/1.1",
    b"x" * 4000 + b" / HTTP/1.1",
    b" GET / HTTP/1.1",
    b"\tGET / HTTP/1.1",
    b"\x0bGET / HTTP/1.1",
    b"\x1cGET / HTTP/1.1",
    b"GET\x0b/ HTTP/1.1",
    b"GET / HTTP/1.1\x0b",
    b"GET\xa0/\xa0HTTP/1.1",
    b"GET / HTTP/01.1",
    b"GET / HTTP/1.01",
    b"GET / HTTP/1.10",
    b"GET /admin",
    b"GET http://a.test/admin",
    b"GET\r/ HTTP/1.1",
    b"GET \r/ HTTP/1.1",
    b"GET / HTTP/1.1\r",
    b"GET /?\x01 HTTP/1.1",
    b"GET /\x7f HTTP/1.1",
]
"""nginx or Python's http.server (whose str.split() takes \\r, \\x0b, \\x1c and \\xa0 for
whitespace, and which keeps control bytes in a target) read each of these as GET / (nginx
reads a version digit by digit, and serves HTTP/0.9's line without one, as Apache does)."""


@pytest.mark.parametrize(
    "empty_lines",
    [
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n\n",
        b"\r\n" * EMPTY_LINES_ALLOWED,
        b"\n" * EMPTY_LINES_ALLOWED,
    ],
)
def test_empty_lines_before_a_request_line_are_skipped(empty_lines: bytes) -> None:
    """RFC 9112 2.2: the request after them is read as it is, Host and all (it was
    bad_request_line, decided without its host and answered 400)."""
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert sniff(empty_lines + head) == sniff(head)
    for end in range(1, len(empty_lines) + len(head)):
        assert sniff((empty_lines + head)[:end]) is NEED_MORE


@pytest.mark.parametrize(
    "line_ends",
    [b"\r\n" * (EMPTY_LINES_ALLOWED + 1), b"\n" * (EMPTY_LINES_ALLOWED + 1), b"\r" * 21],
    ids=["crlf", "lf", "cr"],
)
def test_more_empty_lines_than_allowed_are_http_refused(line_ends: bytes) -> None:
    """As Apache, at most EMPTY_LINES_ALLOWED empty lines are skipped; nginx skips any
    number of CRs and LFs and reads the request after them: the head is HTTP without a
    host (400), not opaque bytes past the host rule."""
    head = line_ends + b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert sniff(head) == Opaque("bad_request_line")
    assert _classify(Opaque("bad_request_line"), head)[0] is Detected.HTTP1


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
def test_ten_empty_lines_are_skipped_and_the_eleventh_is_refused(line_end: bytes) -> None:
    """Apache's number, written out rather than read from EMPTY_LINES_ALLOWED: a change
    of the constant changes what requests the proxy serves (fewer: a client's stray line
    ends answered 400; more: heads nginx reads but the proxy no longer bounds alike)."""
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert sniff(line_end * 10 + head) == sniff(head)
    assert isinstance(sniff(head), HttpRequestHead)
    assert sniff(line_end * 11 + head) == Opaque("bad_request_line")


def bytes_sniffed_one_byte_a_read(
    flight: bytes, monkeypatch: pytest.MonkeyPatch
) -> tuple[Sniffed | NeedMore, int, int]:
    """The answer for flight arriving one byte a read, sniffed as the flow sniffs it (a
    Sniffer from the first read it finds incomplete), the bytes handed to sniff and to hold
    on the way (each reads them all), the work it did, and the length it answered at."""
    handed = 0
    whole, hold = detect.sniff, detect.hold

    def counted_sniff(buf: bytes, records: RecordWalk | None = None) -> Sniffed | NeedMore:
        nonlocal handed
        handed += len(buf)
        return whole(buf, records)

    def counted_hold(buf: bytes, records: RecordWalk | None = None) -> Hold:
        nonlocal handed
        handed += len(buf)
        return hold(buf, records)

    monkeypatch.setattr(detect, "sniff", counted_sniff)
    monkeypatch.setattr(detect, "hold", counted_hold)
    answer = counted_sniff(flight[:1])
    if answer is not NEED_MORE:
        return answer, handed, 1
    sniffer = Sniffer(flight[:1])
    for end in range(2, len(flight) + 1):
        answer = sniffer.sniff(flight[:end])
        if answer is not NEED_MORE:
            return answer, handed, end
    return answer, handed, len(flight)


def test_empty_lines_one_byte_a_read_cost_bounded_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read sniffs the whole buffer again: 8,000 CRLFs one byte a read held the event
    loop two seconds, as the sniffer took them all for empty lines still to be skipped."""
    flight = b"\r\n" * 8000 + b"GET / HTTP/1.1\r\n"
    answer, handed, _ = bytes_sniffed_one_byte_a_read(flight, monkeypatch)
    assert handed <= 2 * (2 * EMPTY_LINES_ALLOWED + 1) ** 2, handed
    assert answer == Opaque("bad_request_line")


@pytest.mark.parametrize("line", IRREGULAR_REQUEST_LINES)
def test_an_irregular_request_line_is_http_not_opaque(line: bytes) -> None:
    """A lenient server (nginx, RFC 9112 2.2 and 3) may take these for requests: as opaque
    bytes they would pass the host rules, so they stay HTTP, for the handler to refuse or
    parse; while the line grows, the sniffer waits for it."""
    head = line + b"\r\nHost: a.test\r\n\r\n"
    assert sniff(head) == Opaque("bad_request_line")
    assert _classify(Opaque("bad_request_line"), head)[0] is Detected.HTTP1
    growing = line + b"\r"  # the CR of its CRLF too: the LF may come in the next segment
    for end in range(1, len(growing) + 1):
        assert sniff(growing[:end]) is NEED_MORE, growing[:end]
        assert could_begin_request(growing[:end]), growing[:end]


VERSIONLESS_LINES_NOT_GET = [
    b"POST /admin",
    b"PUT http://a.test/admin",
    b"get /admin",
    b"GETS /admin",
    b"A\r/\x8a%\xf0k~",
]
"""Lines without a version that no server serves: HTTP/0.9 has GET only (RFC 1945 4.1),
and nginx, Apache and Python's http.server refuse any other method without a version.
The last is the start of a binary payload (a letter, CR, `/`, visible bytes)."""


@pytest.mark.parametrize("line", VERSIONLESS_LINES_NOT_GET)
def test_a_line_without_a_version_is_http_only_after_get(line: bytes) -> None:
    """Such a line was bad_request_line, HTTP refused 400: about one random 8 KiB payload
    in 100,000 began so and never reached its server."""
    flight = line + b"\n\x00\xff\x16binary"
    assert sniff(flight) == Opaque("not_http")
    assert _classify(Opaque("not_http"), flight)[0] is Detected.OPAQUE


@pytest.mark.parametrize(
    "start",
    [
        b"\x16\x03\x01\x40\x00\x01\x00\x40\x00",
        b"GET /",
        b"GET / HTTP/1.1\r\nCookie: ",
        b"POST /",
        b"PATCH /x HTTP/1.1\r\nX: ",
    ],
)
def test_a_full_buffer_without_an_answer_is_opaque(start: bytes) -> None:
    buffer = (start + b"a" * SNIFF_BUFFER_LIMIT)[:SNIFF_BUFFER_LIMIT]
    assert sniff(buffer[:-1]) is NEED_MORE
    assert sniff(buffer) == Opaque("too_large")


@pytest.mark.parametrize(
    "flight",
    [
        b"GET" + b" " * 16000 + b"x\n",
        b"GET /" + b"\xa0" * 16000 + b"\x00\n",
        b"GET / HTTP/1.1\r\nX:" + b" " * 16000 + b"\x00\r\n\r\n",
    ],
    ids=["spaces_after_the_method", "nbsp_after_the_target", "spaces_in_an_empty_field"],
)
def test_a_run_of_whitespace_is_sniffed_in_linear_time(flight: bytes) -> None:
    """The worker's event loop runs the sniffer: patterns that backtracked over every split
    of a run of whitespace took a second or two for one such 16 KiB flight, during which
    no other connection of the worker was served."""
    started = time.process_time()
    sniff(flight)
    assert time.process_time() - started < 0.1


def test_an_empty_buffer_needs_more() -> None:
    assert sniff(b"") is NEED_MORE


# -- properties -------------------------------------------------------------------------


@st.composite
def first_flights(draw: st.DrawFn) -> bytes:
    """Captures and heads, sometimes damaged, followed by arbitrary bytes."""
    base = draw(st.sampled_from([*(load(name) for name in sorted(EXPECTED)), *P_HEADS]))
    data = bytearray(base)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=64))


@given(st.binary(max_size=600) | first_flights())
def test_arbitrary_bytes_give_a_result(data: bytes) -> None:
    assert isinstance(sniff(data), RESULT_TYPES)


@given(first_flights(), st.data())
def test_an_answer_never_changes_as_more_bytes_arrive(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    early = sniff(data[:cut])
    if early is not NEED_MORE:
        assert sniff(data) == early


@given(st.binary(min_size=1, max_size=64), st.sampled_from([b"\x16\x03\x01", b"GET /", b""]))
def test_a_full_buffer_never_needs_more(tail: bytes, start: bytes) -> None:
    buffer = start + tail * (SNIFF_BUFFER_LIMIT // len(tail) + 1)
    assert sniff(buffer) is not NEED_MORE


_LINE_SEPARATORS = st.lists(st.sampled_from(sorted(LOOSE_SPACE)), min_size=1, max_size=3)
_GET_THEN_SEPARATOR = re.compile(
    b"[" + re.escape(LOOSE_SPACE) + b"]*GET[" + re.escape(LOOSE_SPACE) + b"]"
)


@st.composite
def versionless_flights(draw: st.DrawFn) -> bytes:
    """A first line in HTTP/0.9's shape, or near it, with a method or any word, then bytes."""
    word = draw(st.sampled_from([b"POST", b"get", b"Get", b"GETS", b"XGET", b"GE", b"A"]))
    target = draw(st.sampled_from([b"/", b"http://", b"HTTPS://", b""]))
    return (
        bytes(draw(_LINE_SEPARATORS))[: draw(st.integers(0, 2))]
        + (word if draw(st.booleans()) else draw(st.binary(min_size=1, max_size=8)))
        + bytes(draw(_LINE_SEPARATORS))
        + target
        + draw(st.binary(max_size=32))
        + b"\n"
        + draw(st.binary(max_size=32))
    )


@given(versionless_flights() | st.binary(max_size=64).map(lambda data: data + b"\n"))
def test_only_get_makes_a_line_without_a_version_http(flight: bytes) -> None:
    """HTTP/0.9's line (no version) is `GET target`: any other first line without a
    version is never taken for HTTP, whatever its shape."""
    request_line = flight.lstrip(b"\r\n").partition(b"\n")[0]
    assume(b"http/" not in request_line.lower())
    assume(_GET_THEN_SEPARATOR.match(request_line) is None)
    result = sniff(flight)
    assert result is NEED_MORE or _classify(result, flight)[0] is not Detected.HTTP1


@pytest.mark.parametrize("method", ["ACL", "ZAP"])
def test_a_method_at_either_end_of_the_alphabet_is_an_http_head(method: str) -> None:
    """The strict parser takes a head whose first byte is A to Z (WebDAV's ACL, and Z at
    the other end): a range one letter short sent them to the loose reader, which refuses
    a regular head (bad_request_line, 400) or takes it without its host."""
    head = method.encode() + b" /x HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert sniff(head) == HttpRequestHead(method, "/x", "HTTP/1.1", "a.example", None)
    for end in range(1, len(head)):
        assert sniff(head[:end]) is NEED_MORE, head[:end]
