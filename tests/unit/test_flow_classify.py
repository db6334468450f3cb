"""A request head read once at the sniff (flow.lean_head) is classified exactly as the
sniffer and _classify classify it: same protocol, same hostname, same outcome."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from egressproxy.flow import _classify, head_end_came, lean_head
from egressproxy.policy.decision import Detected
from egressproxy.settings import Settings
from egressproxy.sniff import HttpRequestHead
from egressproxy.sniff.detect import sniff
from tests.unit.test_http1_lean import REQUEST_LINES, heads
from tests.unit.test_sniff_reads import reads

LIMIT = Settings().max_header_bytes
HOSTS = [
    "example.test", "Example.TEST", "example.test.", "example.test:8080", "example.test.:80",
    "a_b.example.test", "xn--bcher-kva.example", "198.51.100.7", "198.51.100.7:8080",
    "[2001:db8::1]", "[2001:db8::1]:443", "[2001:DB8::A]", "[fe80::1%25eth0]", "2001:db8::1",
    "example..test", ".", "..", "-x.example", "example.test:", "example.test:0",
    "example.test:65536", "example.test:x", "user@example.test", "exa mple.test", "",
    "a" * 64 + ".example", "\u00e9.example",
]  # fmt: skip
FIRST_LINES = [
    "GET / HTTP/1.1", "GET /get?x=1&y HTTP/1.1", "POST /p HTTP/1.1", "HEAD /h HTTP/1.1",
    "DELETE /d HTTP/1.1", "GET http://example.test/a HTTP/1.1", "OPTIONS * HTTP/1.1",
    "GET / HTTP/1.0", "CONNECT example.test:443 HTTP/1.1",
]  # fmt: skip
OTHER_FIELDS = [
    "Accept: */*", "Connection: close", "Connection: keep-alive", "Content-Length: 0",
    "Content-Length: 5", "Transfer-Encoding: chunked", "Content-Type: application/grpc",
    "X-Trace: 1",
]  # fmt: skip


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Heads the lean path mostly reads: a Host (sometimes two) among ordinary fields."""
    fields = draw(st.lists(st.sampled_from(OTHER_FIELDS), max_size=3))
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):
        fields.insert(draw(st.integers(0, len(fields))), f"Host: {draw(st.sampled_from(HOSTS))}")
    lines = [draw(st.sampled_from(FIRST_LINES)), *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@given(st.one_of(request_heads(), heads(REQUEST_LINES)))
@example(b"GET /100b HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: Example.TEST.:80\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
def test_a_head_read_once_is_classified_as_the_sniffer_classifies_it(head: bytes) -> None:
    """Under --max-header-bytes (the handler's limit) as well: a head past the sniffer's
    own limit is the sniffer's to call too large, whole or not."""
    found = lean_head(head, LIMIT)
    if found is None:
        return  # the sniffer classifies it alone, as before
    sniffed = sniff(head)
    assert isinstance(sniffed, HttpRequestHead)
    assert _classify(sniffed, head) == (Detected.HTTP1, found[1], "http1")


def test_ordinary_heads_are_read_once() -> None:
    """The common request heads take the one reading; others are left to the sniffer."""
    ordinary = b"GET /100b HTTP/1.1\r\nHost: Bench.Example.\r\nConnection: close\r\n\r\n"
    found = lean_head(ordinary, LIMIT)
    assert found is not None and found[1] == "bench.example"
    for other in (
        b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n",  # absolute form
        b"GET / HTTP/1.0\r\nHost: example.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.test:x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.test\r\n",  # not whole yet
        b"\x16\x03\x01",
    ):
        assert lean_head(other, LIMIT) is None, other


@given(
    st.one_of(request_heads(), heads(REQUEST_LINES)),
    st.binary(max_size=16),
    st.lists(st.integers(1, 8) | st.integers(9, 200), max_size=30),
)
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", [25, 1])
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", [24, 1, 1])
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", [23, 1, 1, 1])
def test_a_head_in_reads_is_read_once_at_its_end(
    head: bytes, after: bytes, sizes: list[int]
) -> None:
    """After the first read the flow tries lean_head only where head_end_came says a head
    may have ended: at any other read with a line end it finds none (tried there, a head of
    short lines that came in pieces was read whole at each line)."""
    flight = head + after
    start = 0
    for end in reads(flight, sizes):
        buffer = flight[:end]
        if start and buffer.find(b"\n", start) >= 0 and not head_end_came(buffer, end - start):
            assert lean_head(buffer, LIMIT) is None, (start, end)
        start = end
