"""The lean head parsers agree with h11: what they accept h11 reads the same, with the same
framing and keep-alive; what h11 refuses they leave to h11."""

from __future__ import annotations

import ipaddress
import re
import time

import h11
import pytest
from h11 import _abnf
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressproxy import http1_lean
from egressproxy.http1 import (
    DENIED_CLOSING_HEAD,
    DENIED_CLOSING_RESPONSE,
    DENIED_HEAD,
    DENIED_RESPONSE,
    parse_request,
    response_head,
)
from egressproxy.http1 import request_head as h11_request_head
from egressproxy.http1_lean import NEED_MORE, LeanRequest, LeanResponse
from egressproxy.policy.decision import Destination
from egressproxy.sniff.http import authority_host

LIMIT = 1024
DESTINATION = Destination(ipaddress.ip_address("192.0.2.1"), 80)

NAMES = [
    "Host", "host", "HOST", "Content-Length", "content-length", "Transfer-Encoding",
    "Connection", "Upgrade", "Expect", "Content-Type", "X-Trace", "Accept",
    "Bad Name", "", " X-Folded", "X\x00", "Ünï",
]  # fmt: skip
VALUES = [
    "example.test", "example.test:8080", "0", "00", "7", "-1", "1 2", "chunked", "gzip, chunked",
    "close", "keep-alive", "Keep-Alive, Close", "upgrade", "websocket", "100-continue",
    "application/grpc", "application/grpcx", "application/grpc+proto", "Application/GRPC; q=1",
    "text/plain", "a  b", "", " ", "\x80x", "a\x00b", "a\rb", "a\nb",
    "99999999999999999999", "a\x0bb", "a\x0cb", "\x7f", "a\tb", "\x01", "1\t",
]  # fmt: skip
SEPARATORS = [":", ": ", ":\t", " :", ":  "]
TRAILERS = ["", " ", "\t "]
EOLS = ["\r\n"] * 8 + ["\n", "\r", ""]
ENDS = ["\r\n\r\n"] * 6 + ["\n\n", "\r\n\n", "\n\r\n", "\r\n", ""]


@st.composite
def heads(draw: st.DrawFn, first_lines: list[str]) -> bytes:
    lines = [draw(st.sampled_from(first_lines))]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(NAMES))
        lines.append(
            name
            + draw(st.sampled_from(SEPARATORS))
            + draw(st.sampled_from(VALUES))
            + draw(st.sampled_from(TRAILERS))
        )
    text = lines[0]
    for line in lines[1:]:
        text += draw(st.sampled_from(EOLS)) + line
    text += draw(st.sampled_from(ENDS))
    return text.encode("latin-1") + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"\x00x"]))


REQUEST_LINES = [
    "GET / HTTP/1.1", "GET /get?x=1&y HTTP/1.1", "HEAD /h HTTP/1.1", "POST /p HTTP/1.1",
    "CONNECT example.test:443 HTTP/1.1", "GET http://example.test/a HTTP/1.1", "OPTIONS * HTTP/1.1",
    "GET / HTTP/1.0", "GET / HTTP/2.0", "GET  / HTTP/1.1", "GET / HTTP/1.1 ", "get /x HTTP/1.1",
    "G(T / HTTP/1.1", "GET /\x80 HTTP/1.1", "", " GET / HTTP/1.1", "\r\nGET / HTTP/1.1",
]  # fmt: skip
STATUS_LINES = [
    "HTTP/1.1 200 OK", "HTTP/1.1 200", "HTTP/1.1 200 ", "HTTP/1.1 404 Not  Found",
    "HTTP/1.1 204 No Content", "HTTP/1.1 304 Not Modified", "HTTP/1.1 101 Switching Protocols",
    "HTTP/1.1 100 Continue", "HTTP/1.0 200 OK", "HTTP/1.1 2000 OK", "HTTP/1.1 099 X",
    "HTTP/1.1 500 \x80rr", "HTTP/1.1  200 OK", "HTTP/2 200", "",
]  # fmt: skip


def h11_request(data: bytes) -> tuple[h11.Connection, h11.Request | None, object]:
    """h11's reading of data as a server: (connection, request or None, next event or error)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    if data:  # b"" would tell h11 the peer closed
        connection.receive_data(data)
    try:
        first = connection.next_event()
        if not isinstance(first, h11.Request):
            return connection, None, first
        return connection, first, connection.next_event()
    except h11.RemoteProtocolError as error:
        return connection, None, error


def check_request(data: bytes) -> LeanRequest | None:
    lean = http1_lean.parse_request(data, LIMIT)
    connection, request, following = h11_request(data)
    if isinstance(following, h11.RemoteProtocolError):
        assert lean is None, "h11 refuses what the lean parser accepts"
    if lean is NEED_MORE:
        assert following is h11.NEED_DATA and request is None
        return None
    if lean is None:
        return None
    assert isinstance(lean, LeanRequest)
    assert request is not None, following
    assert (request.method, request.target, request.http_version) == (
        lean.method,
        lean.target,
        b"1.1",
    )
    assert type(following) is h11.EndOfMessage, "a lean request has no body"
    ended = h11.MUST_CLOSE if lean.close else h11.DONE
    assert connection.their_state is ended, "no upgrade, CONNECT or 100-continue; same keep-alive"
    assert connection.trailing_data[0] == data[lean.size :]
    assert h11_request_head(request) == lean.head
    parsed = parse_request(request, DESTINATION)
    assert parsed.facts.headers == lean.headers
    assert parsed.facts.grpc == lean.grpc
    assert parsed.head_size == lean.head_size
    if lean.target.startswith(b"/"):  # the only requests the proxy reads lean
        assert parsed.facts.hostname == authority_host(lean.host)
    assert dict(parsed.facts.headers)["host"] == lean.host
    assert not parsed.smuggling and not parsed.has_body and not parsed.h2c_upgrade
    connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    connection.send(h11.EndOfMessage())
    if lean.close:
        assert connection.our_state is h11.MUST_CLOSE, "h11 would keep the connection"
        assert lean.size == len(data), "h11 refuses bytes after a closing request"
    else:
        assert connection.our_state is h11.DONE, "h11 would close after this request"
    return lean


@settings(max_examples=1500)
@given(heads(REQUEST_LINES))
@example(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n")
@example(b"GET / HTTP/1.1\nHost: a\r\n\r\n")
def test_requests_the_lean_parser_accepts_h11_reads_the_same(data: bytes) -> None:
    check_request(data)


@pytest.mark.parametrize("separator", SEPARATORS)
@pytest.mark.parametrize("trailer", TRAILERS)
def test_every_one_field_head_agrees_with_h11(separator: str, trailer: str) -> None:
    """Each name and value in each spacing, in a request and in a response: the fast
    whole-head check and the line-by-line one must both agree with h11 on every byte
    class (a value with \\x0b is refused by h11, one with \\x01 is not)."""
    for name in NAMES:
        for value in VALUES:
            field = f"{name}{separator}{value}{trailer}\r\n".encode("latin-1")
            check_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n")
            check_request(b"GET / HTTP/1.1\r\n" + field + b"Host: a\r\n\r\n")
            response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + field + b"\r\nok"
            for method in (b"GET", b"HEAD"):
                check_response(response, method)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_agree_with_h11(data: bytes) -> None:
    check_request(data)
    check_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + data)


@given(
    st.lists(
        st.tuples(st.sampled_from(["X-A", "Accept", "Content-Type"]), st.sampled_from(VALUES[:18])),
        max_size=4,
    ),
    st.sampled_from([" ", "", "  "]),
)
def test_ordinary_requests_take_the_lean_path(headers: list[tuple[str, str]], space: str) -> None:
    """Not vacuous: a plain keep-alive GET is lean, with or without tidy spacing."""
    lines = ["GET /get?a=1 HTTP/1.1", f"Host:{space}example.test"]
    lines += [f"{name}:{space}{value}" for name, value in headers if value.strip() == value]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    lean = check_request(data)
    assert lean is not None
    assert lean.size == len(data)


H11_HEADER_FIELD = re.compile(_abnf.header_field.encode("ascii"))
"""h11's own field pattern, before http1_lean gave h11 its linear one."""


@settings(max_examples=3000)
@given(st.lists(st.sampled_from([b" ", b"\t", b":", b"a", b"-", b"\x00", b"\x80", b"\r", b"\x0b"])))
@example([b"a", b":", b" ", b" ", b"\t"])
@example([b"a", b":", b" ", b"a", b" ", b"\t", b"a", b" "])
def test_the_linear_field_pattern_reads_what_h11s_reads(parts: list[bytes]) -> None:
    line = b"".join(parts)
    ours, theirs = http1_lean.HEADER_FIELD.fullmatch(line), H11_HEADER_FIELD.fullmatch(line)
    assert (ours is None) == (theirs is None)
    if ours is not None and theirs is not None:
        assert ours.groupdict() == theirs.groupdict()


FIELD_OF_WHITESPACE = b"X:" + b" " * 60000 + b"\x00\r\n\r\n"
"""h11's field pattern tried this field's whitespace split every way between its two OWS:
9 s on the worker's event loop (--max-header-bytes is 64 KiB), 0.7 s for 16 KiB."""


def test_a_field_of_whitespace_is_read_in_linear_time() -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + FIELD_OF_WHITESPACE
    response = b"HTTP/1.1 200 OK\r\n" + FIELD_OF_WHITESPACE
    started = time.process_time()
    assert http1_lean.parse_request(request, 65536) is None
    assert http1_lean.parse_response(response, b"GET") is None
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
    server.receive_data(request)
    with pytest.raises(h11.RemoteProtocolError, match="illegal header line"):
        server.next_event()
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.receive_data(response)
    with pytest.raises(h11.RemoteProtocolError, match="illegal header line"):
        client.next_event()
    assert time.process_time() - started < 0.5
    assert check_request(b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" \t" * 100 + b"\r\n\r\n")


@settings(max_examples=1000)
@given(heads(REQUEST_LINES + STATUS_LINES), st.data())
def test_a_head_found_incomplete_is_parsed_again_only_when_it_may_end(
    data: bytes, draw: st.DataObject
) -> None:
    """still_incomplete answers True only where the parsers would answer NEED_MORE again,
    for a head cut anywhere and grown by any number of bytes."""
    cut = draw.draw(st.integers(0, len(data)))
    grown = draw.draw(st.integers(cut, len(data)))
    for parse, limit in (
        (lambda buffer: http1_lean.parse_request(buffer, LIMIT), LIMIT),
        (lambda buffer: http1_lean.parse_response(buffer, b"GET"), http1_lean.MAX_RESPONSE_HEAD),
    ):
        if parse(data[:cut]) is NEED_MORE and http1_lean.still_incomplete(data[:grown], cut, limit):
            assert parse(data[:grown]) is NEED_MORE


def h11_response(data: bytes, method: bytes) -> tuple[h11.Connection, list[object]]:
    """h11's reading of data as the client that sent `method`: its events, or the error last."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[(b"host", b"a")]))
    connection.send(h11.EndOfMessage())
    if data:
        connection.receive_data(data)
    events: list[object] = []
    try:
        while True:
            event = connection.next_event()
            events.append(event)
            if event is h11.NEED_DATA or type(event) in (h11.EndOfMessage, h11.ConnectionClosed):
                return connection, events
            if type(event) is h11.InformationalResponse or event is h11.PAUSED:
                return connection, events
    except h11.RemoteProtocolError as error:
        events.append(error)
        return connection, events


def check_response(data: bytes, method: bytes) -> LeanResponse | None:
    lean = http1_lean.parse_response(data, method)
    _, events = h11_response(data, method)
    if isinstance(events[-1], h11.RemoteProtocolError):
        assert lean is None, "h11 refuses what the lean parser accepts"
    if lean is NEED_MORE:
        assert events == [h11.NEED_DATA]
        return None
    if lean is None:
        return None
    assert isinstance(lean, LeanResponse)
    body = bytes(range(256)) * (lean.body_length // 256 + 1)
    whole = data[: lean.size] + body[: lean.body_length]
    connection, events = h11_response(whole, method)
    response = events[0]
    assert type(response) is h11.Response
    assert response.status_code == lean.status
    assert response_head(response) == lean.head
    assert b"".join(e.data for e in events if type(e) is h11.Data) == body[: lean.body_length]
    assert type(events[-1]) is h11.EndOfMessage
    assert connection.trailing_data[0] == b""
    if lean.close:
        assert connection.their_state is h11.MUST_CLOSE, "h11 would reuse the upstream"
    else:
        connection.start_next_cycle()  # the upstream is reusable, as on the lean path
    return lean


@settings(max_examples=1500)
@given(heads(STATUS_LINES), st.sampled_from([b"GET", b"HEAD", b"POST"]))
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", b"GET")
@example(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD")
@example(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", b"GET")
def test_responses_the_lean_parser_accepts_h11_reads_the_same(data: bytes, method: bytes) -> None:
    check_response(data.replace(b"99999999999999999999", b"12"), method)


@given(st.binary(max_size=200), st.sampled_from([b"GET", b"HEAD"]))
def test_arbitrary_response_bytes_agree_with_h11(data: bytes, method: bytes) -> None:
    check_response(data, method)
    check_response(b"HTTP/1.1 200 OK\r\n" + data, method)


def test_ordinary_responses_take_the_lean_path() -> None:
    plain = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
    lean = check_response(plain + b"abc", b"GET")
    assert lean is not None and lean.head == plain and lean.body_length == 3
    untidy = check_response(b"HTTP/1.1 200 OK\r\nContent-Length:3 \r\n\r\n", b"GET")
    assert untidy is not None and untidy.head == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    head = check_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"HEAD")
    assert head is not None and head.body_length == 0


@pytest.mark.parametrize(
    ("connection_header", "head", "whole"),
    [
        (b"", DENIED_HEAD, DENIED_RESPONSE),
        (b"Connection: close\r\n", DENIED_CLOSING_HEAD, DENIED_CLOSING_RESPONSE),
    ],
)
def test_the_lean_denial_is_what_h11_writes(
    connection_header: bytes, head: bytes, whole: bytes
) -> None:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + connection_header + b"\r\n")
    connection.next_event()
    payload = b"traffic not allowed\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(payload))]
    written = connection.send(h11.Response(status_code=403, headers=headers, reason=b"Forbidden"))
    assert written == head
    assert written + (connection.send(h11.Data(data=payload)) or b"") == whole


def test_closing_exchanges_take_the_lean_path() -> None:
    """wrk -H 'Connection: close' and nginx's answer to it: lean, and marked as the last."""
    request = b"GET /100b HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n"
    lean = check_request(request)
    assert lean is not None and lean.close and lean.head == request
    assert check_request(request + b"GET / HTTP/1.1\r\n") is None
    keep = check_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    assert keep is not None and not keep.close
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    tidy = check_response(response + b"abc", b"GET")
    assert tidy is not None and tidy.close and tidy.head == response
    untidy = check_response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection:close\r\n\r\n", b"GET"
    )
    assert untidy is not None and untidy.close


AFTER_A_HEAD = [
    b"", b"GET / HTTP/1.1\r\n", b"\r\n", b"\n", b"x", b"HTTP/1.1 200 OK\r\n\r\n", b"\x00",
]  # fmt: skip


@settings(max_examples=1500)
@given(heads(REQUEST_LINES), st.sampled_from(AFTER_A_HEAD))
def test_a_request_head_found_again_is_the_same_request(data: bytes, after: bytes) -> None:
    """What Http1Proxy.repeated_request rests on: bytes that start with a lean request head
    that leaves its connection open, whatever follows, hold that very request."""
    first = http1_lean.parse_request(data, LIMIT)
    if isinstance(first, LeanRequest) and not first.close:
        assert http1_lean.parse_request(data[: first.size] + after, LIMIT) == first


TIDY_LINES = [line for line in REQUEST_LINES if re.fullmatch(r"[A-Z]+ [!-~]+ HTTP/1\.1", line)]


@st.composite
def lean_heads(draw: st.DrawFn) -> bytes:
    """Request heads the lean parser mostly takes: a Host and a few ordinary fields, some
    written otherwise than h11 writes them."""
    fields = [("Host", draw(st.sampled_from(["example.test", "example.test:8080"])))]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["Accept", "X-Trace", "Content-Type", "Connection",
                                     "Content-Length", "User-Agent"]))  # fmt: skip
        value = draw(st.sampled_from(["*/*", "a b", "application/grpc", "keep-alive", "close",
                                      "0", "7", "a\tb", ""]))  # fmt: skip
        fields.append((name, value))
    text = draw(st.sampled_from(TIDY_LINES))
    for name, value in draw(st.permutations(fields)):
        separator = draw(st.sampled_from([": "] * 6 + [":", ":\t", ":  "]))
        text += "\r\n" + name + separator + value + draw(st.sampled_from([""] * 6 + [" "]))
    return (text + "\r\n\r\n").encode("latin-1")


@settings(max_examples=2000)
@given(lean_heads(), st.sampled_from(REQUEST_LINES), st.sampled_from(AFTER_A_HEAD))
def test_a_head_read_by_its_request_line_is_the_request_parse_request_reads(
    data: bytes, line: str, after: bytes
) -> None:
    """What Http1Proxy's reading of a head with its last head's field lines rests on: a
    request line, then those field lines, whatever follows, read by the request line alone
    is the request parse_request reads there; and a tidy line always is read that way."""
    like = http1_lean.parse_request(data, LIMIT)
    if not isinstance(like, LeanRequest):
        return
    fields = http1_lean.field_lines(like, data[: like.size])
    buffer = line.encode("latin-1") + b"\r\n" + fields + after
    found = http1_lean.parse_request_like(buffer, like, fields, LIMIT) if fields else None
    if found is not None:
        assert found == http1_lean.parse_request(buffer, LIMIT)
    elif fields and not like.close and line in TIDY_LINES:
        assert line.startswith("CONNECT ")


def test_a_head_that_comes_untidy_is_read_whole() -> None:
    """field_lines has none for a head that goes upstream otherwise than it came."""
    untidy = b"GET / HTTP/1.1\r\nHost:example.test\r\n\r\n"
    request = http1_lean.parse_request(untidy, LIMIT)
    assert isinstance(request, LeanRequest) and request.head != untidy
    assert http1_lean.field_lines(request, untidy) == b""


@settings(max_examples=1500)
@given(heads(STATUS_LINES), st.sampled_from([b"GET", b"HEAD"]), st.sampled_from(AFTER_A_HEAD))
def test_a_response_head_found_again_is_the_same_response(
    data: bytes, method: bytes, after: bytes
) -> None:
    """What Http1Proxy.repeated_response rests on, for a request of the same method."""
    first = http1_lean.parse_response(data, method)
    if isinstance(first, LeanResponse):
        assert http1_lean.parse_response(data[: first.size] + after, method) == first


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("colon", [b": ", b":"], ids=["tidy", "untidy"])
def test_a_bodiless_status_has_no_body_whatever_its_content_length(
    status: int, colon: bytes
) -> None:
    """RFC 9112 6.3: a 204 or 304 ends at its head; a 304's Content-Length is the length
    of the body a GET would have had. Read as a body, the next response's bytes (or a wait
    for 1234 bytes that never come) would go to the client as this one's."""
    head = b'HTTP/1.1 %d X\r\nETag: "x"\r\nContent-Length%s1234\r\n\r\n' % (status, colon)
    lean = check_response(head, b"GET")
    assert lean is not None and lean.status == status
    assert lean.body_length == 0


@pytest.mark.parametrize("status", [100, 103])
def test_an_interim_response_with_a_content_length_is_left_to_h11(status: int) -> None:
    """A 1xx is followed by the final response: the lean path reads final ones only."""
    head = b"HTTP/1.1 %d X\r\nContent-Length: 1234\r\n\r\n" % status
    assert http1_lean.parse_response(head, b"GET") is None


def test_a_head_past_the_limit_without_a_line_end_is_no_longer_incomplete() -> None:
    """still_incomplete spares a head coming a few bytes a read from being parsed whole
    again; past the limit the parsers leave the head to h11, which answers 431 at once:
    "still incomplete" there would leave the request waiting for its header deadline (408)."""
    head = b"GET /" + b"a" * LIMIT
    at_limit, past_limit = head[:LIMIT], head[: LIMIT + 1]
    scanned = LIMIT - 100
    assert http1_lean.parse_request(head[:scanned], LIMIT) is NEED_MORE
    assert http1_lean.parse_request(at_limit, LIMIT) is NEED_MORE
    assert http1_lean.still_incomplete(at_limit, scanned, LIMIT) is True
    assert http1_lean.parse_request(past_limit, LIMIT) is None
    assert http1_lean.still_incomplete(past_limit, scanned, LIMIT) is False


def test_an_untidy_head_within_the_limit_but_longer_written_out_is_left_to_h11() -> None:
    """head_size counts the head as it goes upstream (`Name: value`), which the handler
    answers 431 past the limit on h11's path: a head whose raw bytes fit but whose written
    form does not must not be served on the lean path where h11's would refuse it."""
    fields = b"".join(b"X-%03d:v\r\n" % number for number in range(100))
    head = b"GET / HTTP/1.1\r\nHost:a.test\r\n" + fields + b"\r\n"
    _, request, _ = h11_request(head)
    assert request is not None
    assert len(head) <= LIMIT < parse_request(request, DESTINATION).head_size
    assert http1_lean.parse_request(head, LIMIT) is None


def test_a_request_that_expects_100_continue_is_left_to_h11() -> None:
    """h11 keeps a client's wait for 100 Continue (they_are_waiting_for_100_continue),
    which the handler reads to close a connection whose body will not come; the lean path
    keeps no such state."""
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\n\r\n"
    assert http1_lean.parse_request(head, LIMIT) is None
    assert isinstance(
        http1_lean.parse_request(head.replace(b"Expect", b"X-Expect"), LIMIT), LeanRequest
    )


@pytest.mark.parametrize(
    ("value", "grpc"),
    [
        ("application/grpc", True),
        ("Application/GRPC", True),
        ("application/grpc+proto", True),
        ("application/grpc; charset=utf-8", True),
        ("application/grpc-web-text", True),
        ("application/grpcx", False),
        ("application/grpc_evil", False),
        ("application/grpcfoo/bar", False),
        ("application/json", False),
        ("", False),
    ],
)
def test_grpc_is_its_content_type_not_one_that_begins_like_it(value: str, grpc: bool) -> None:
    """gRPC's spec: application/grpc, then nothing, a +subtype or ;parameters. Any type
    that began with the letters counted, so application/grpcx passed a gRPC allow rule."""
    assert http1_lean.is_grpc_content_type(value) is grpc
