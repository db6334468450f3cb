"""HTTP/1 request head and h2 preface sniffing, checked against captures and against h11."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import h11
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    H2Preface,
    HttpRequestHead,
    NeedMore,
    NotThis,
)
from egressproxy.sniff.http import (
    H2_PREFACE,
    is_plausible_host,
    parse_h2_preface,
    parse_request_head,
)

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
RESULT_TYPES = (HttpRequestHead, NeedMore, NotThis)
TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

CAPTURED_HEADS = {
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

CRAFTED_HEADS = [
    (
        b"GET http://origin.example:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n",
        HttpRequestHead("GET", "http://origin.example:8080/x", "HTTP/1.1", "origin.example", 8080),
    ),
    (
        b"GET HTTPS://Secure.Example/ HTTP/1.1\r\nHost: secure.example\r\n\r\n",
        HttpRequestHead("GET", "HTTPS://Secure.Example/", "HTTP/1.1", "secure.example", None),
    ),
    (
        b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
        HttpRequestHead("OPTIONS", "*", "HTTP/1.1", "example.com", None),
    ),
    (
        b"GET /legacy HTTP/1.0\r\nUser-Agent: old\r\n\r\n",
        HttpRequestHead("GET", "/legacy", "HTTP/1.0", None, None),
    ),
    (b"GET / HTTP/1.0\r\n\r\n", HttpRequestHead("GET", "/", "HTTP/1.0", None, None)),
    (
        b"GET / HTTP/1.1\nHost: lf.example\n\n",
        HttpRequestHead("GET", "/", "HTTP/1.1", "lf.example", None),
    ),
    (
        b"GET / HTTP/1.1\r\nHost: mixed.example\n\r\n",
        HttpRequestHead("GET", "/", "HTTP/1.1", "mixed.example", None),
    ),
    (
        b"POST /submit HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\n",
        HttpRequestHead("POST", "/submit", "HTTP/1.1", "example.com", None),
    ),
    (
        b"PATCH /x HTTP/1.1\r\nX-A: 1\r\nhOsT: \t Example.COM:80 \t\r\nX-B: \x01\xff\r\n\r\n",
        HttpRequestHead("PATCH", "/x", "HTTP/1.1", "example.com", 80),
    ),
    (
        b"PUT /x HTTP/1.1\r\nHost: 192.0.2.10:8080\r\n\r\n",
        HttpRequestHead("PUT", "/x", "HTTP/1.1", "192.0.2.10", 8080),
    ),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", HttpRequestHead("GET", "/", "HTTP/1.1", None, None)),
    (
        b"CONNECT [2001:DB8::5]:443 HTTP/1.1\r\nHost: [2001:db8::5]:443\r\n\r\n",
        HttpRequestHead("CONNECT", "[2001:DB8::5]:443", "HTTP/1.1", "2001:db8::5", 443),
    ),
    (
        b"M-SEARCH /x HTTP/1.1\r\nHost: fqdn.example.:8080\r\n\r\n",
        HttpRequestHead("M-SEARCH", "/x", "HTTP/1.1", "fqdn.example.", 8080),
    ),
]
HEAD_CASES = [
    *(((CAPTURES / name).read_bytes(), expected) for name, expected in CAPTURED_HEADS.items()),
    *CRAFTED_HEADS,
]
HEADS = [head for head, _ in HEAD_CASES]


@pytest.mark.parametrize(("head", "expected"), HEAD_CASES)
def test_every_prefix_needs_more_and_the_whole_head_answers(
    head: bytes, expected: HttpRequestHead
) -> None:
    for end in range(len(head)):
        assert parse_request_head(head[:end]) is NEED_MORE, head[:end]
    assert parse_request_head(head) == expected
    assert parse_request_head(head + b"hello") == expected
    assert parse_request_head(head + b"\x16\x03\x01\x00" * 50) == expected


def test_a_first_byte_that_cannot_start_a_method_is_rejected_at_once() -> None:
    for byte in set(range(256)) - set(TCHARS):
        assert parse_request_head(bytes([byte])) == NotThis("not_http"), byte
    for byte in TCHARS:
        assert parse_request_head(bytes([byte])) is NEED_MORE, byte


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x16\x03\x01\x02\x00\x01", "not_http"),
        (b" GET / HTTP/1.1", "not_http"),
        (b"\r\nGET / HTTP/1.1\r\n", "not_http"),
        (b"G\x00", "not_http"),
        (b"GET  /", "not_http"),
        (b"GET /\x7f", "not_http"),
        (b"GET / h", "not_http"),
        (b"GET / FTP", "not_http"),
        (b"GET / HTTP/1.1x", "not_http"),
        (b"GET / HTTP/1.1\r\r", "not_http"),
        (b"GET / HTTP/11\r\n", "not_http"),
        (b"A" * 25, "not_http"),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "not_http"),
        (b"GET / HTTP/2.0\r\n", "unsupported_version"),
        (b"GET / HTTP/1.2\r\n", "unsupported_version"),
        (b"GET / HTTP/0.9\r\n", "unsupported_version"),
        (b"GET example.com HTTP/1.1\r\n", "bad_target"),
        (b"GET * HTTP/1.1\r\n", "bad_target"),
        (b"GET ftp://example.com/ HTTP/1.1\r\n", "bad_target"),
        (b"CONNECT example.com HTTP/1.1\r\n", "bad_target"),
        (b"CONNECT /x HTTP/1.1\r\n", "bad_target"),
        (b"CONNECT user@example.com:443 HTTP/1.1\r\n", "bad_target"),
        (b"GET http://user@evil.example/ HTTP/1.1\r\n", "bad_host"),
        (b"GET http://allowed.example@evil.example/ HTTP/1.1\r\n", "bad_host"),
        (b"GET http:///x HTTP/1.1\r\n", "bad_host"),
        (b"GET http://example.com:0/ HTTP/1.1\r\n", "bad_host"),
        (b"GET http://example.com:65536/ HTTP/1.1\r\n", "bad_host"),
        (b"GET http://example.com:x/ HTTP/1.1\r\n", "bad_host"),
        (b"GET http://[2001:db8::1/ HTTP/1.1\r\n", "bad_host"),
    ],
)
def test_rejects_as_soon_as_the_request_line_is_wrong(data: bytes, reason: str) -> None:
    assert parse_request_head(data) == NotThis(reason)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"Host: a.example\r\nHost: a.example\r\n", "bad_host"),
        (b"Host: a.example\r\nhost: b.example\r\n", "bad_host"),
        (b"Host: a b\r\n", "bad_host"),
        (b"Host: exa%6dple.com\r\n", "bad_host"),
        (b"Host: user@example.com\r\n", "bad_host"),
        (b"Host: example.com:x\r\n", "bad_host"),
        (b"Host: example.com:80:80\r\n", "bad_host"),
        (b"Host: [2001:db8::1\r\n", "bad_host"),
        (b"Host: [fe80::1%25eth0]\r\n", "bad_host"),
        (b"Host: [example.com]\r\n", "bad_host"),
        (b"Host: 2001:db8::1\r\n", "bad_host"),
        (b"Host: " + b"a" * 64 + b".example\r\n", "bad_host"),
        (b"Host: b\xc3\xbccher.example\r\n", "bad_host"),
        (b"User-Agent: x\r\n", "missing_host"),
        (b"", "missing_host"),
        (b"Host : a.example\r\n", "malformed_header"),
        (b"Host: a.example\r\n folded\r\n", "malformed_header"),
        (b"Host:\r\n a.example\r\n", "malformed_header"),
        (b"Host: a.example\r\nX: a\x00b\r\n", "malformed_header"),
        (b"Host: a.example\r\nX: a\rb\r\n", "malformed_header"),
        (b"Host: a.example\r\nno colon\r\n", "malformed_header"),
        (b"Host: a.example\r\n: empty name\r\n", "malformed_header"),
    ],
)
def test_rejects_bad_headers(headers: bytes, reason: str) -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r\n" + headers + b"\r\n") == NotThis(reason)


def test_a_bad_host_header_is_rejected_even_when_the_target_names_the_host() -> None:
    head = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
    assert parse_request_head(head) == NotThis("bad_host")


def test_a_head_that_does_not_fit_the_buffer_is_too_large() -> None:
    start = b"GET / HTTP/1.1\r\nHost: example.com\r\nCookie: "
    filler = b"x" * SNIFF_BUFFER_LIMIT
    assert parse_request_head((start + filler)[: SNIFF_BUFFER_LIMIT - 1]) is NEED_MORE
    assert parse_request_head((start + filler)[:SNIFF_BUFFER_LIMIT]) == NotThis("too_large")
    assert parse_request_head(start + filler + b"\r\n\r\n") == NotThis("too_large")
    long_target = b"GET /" + b"a" * SNIFF_BUFFER_LIMIT
    assert parse_request_head(long_target[: SNIFF_BUFFER_LIMIT - 1]) is NEED_MORE
    assert parse_request_head(long_target) == NotThis("too_large")


def test_a_head_ending_exactly_at_the_buffer_limit_is_parsed() -> None:
    start = b"GET / HTTP/1.1\r\nHost: example.com\r\nCookie: "
    head = start + b"x" * (SNIFF_BUFFER_LIMIT - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == SNIFF_BUFFER_LIMIT
    expected = HttpRequestHead("GET", "/", "HTTP/1.1", "example.com", None)
    assert parse_request_head(head + b"body") == expected


@pytest.mark.parametrize(
    ("name", "plausible"),
    [
        ("example.com", True),
        ("example.com.", True),
        ("_dmarc.example.com", True),
        ("192.0.2.1", True),
        ("2001:db8::1", True),
        ("::ffff:192.0.2.1", True),
        ("", False),
        (".", False),
        ("example..com", False),
        ("exa mple.com", False),
        ("example.com:443", False),
        ("[2001:db8::1]", False),
        ("fe80::1%eth0", False),
        ("a" * 64, False),
        (".".join(["a" * 63] * 4), False),
        (".".join(["a" * 63] * 3 + ["a" * 61]), True),
    ],
)
def test_plausible_hosts(name: str, plausible: bool) -> None:
    assert is_plausible_host(name) is plausible


NAME_OF_253 = ".".join(["a" * 63] * 3 + ["b" * 61])


@pytest.mark.parametrize(
    ("name", "plausible"),
    [
        (NAME_OF_253, True),
        (NAME_OF_253 + ".", True),
        (NAME_OF_253 + "b", False),
        (NAME_OF_253 + "b.", False),
    ],
    ids=["253", "253-and-root-dot", "254", "254-and-root-dot"],
)
def test_a_host_name_is_plausible_up_to_253_characters(name: str, plausible: bool) -> None:
    """A DNS name is at most 255 octets on the wire (RFC 1035 2.3.4), 253 characters
    written out, its root dot not counted: a name of 254 is no host a resolver answers
    for, and one of 253 written with its root dot (as a client may send it) is a real one,
    which the host rules must still see."""
    assert len(NAME_OF_253) == 253
    assert is_plausible_host(name) is plausible


def test_h2_preface_prefixes_need_more_and_the_whole_preface_answers() -> None:
    capture = (CAPTURES / "curl_h2_prior_knowledge.bin").read_bytes()
    assert capture.startswith(H2_PREFACE)
    for end in range(len(H2_PREFACE)):
        assert parse_h2_preface(capture[:end]) is NEED_MORE
    assert parse_h2_preface(H2_PREFACE) == H2Preface()
    assert parse_h2_preface(capture) == H2Preface()


@pytest.mark.parametrize(
    "data", [b"POST / HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n\r\nXM", b"PRI * HTTP/1.1", b"\x16"]
)
def test_not_an_h2_preface(data: bytes) -> None:
    assert parse_h2_preface(data) == NotThis("not_h2")


# -- properties -------------------------------------------------------------------------


@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_a_result(data: bytes) -> None:
    assert isinstance(parse_request_head(data), RESULT_TYPES)
    assert isinstance(parse_h2_preface(data), (H2Preface, NeedMore, NotThis))


@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_request_line_give_a_result(data: bytes) -> None:
    assert isinstance(parse_request_head(b"GET / HTTP/1.1\r\n" + data), RESULT_TYPES)


tokens = st.text(alphabet=TCHARS.decode("ascii"), min_size=1, max_size=24)
dns_labels = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?", fullmatch=True)
dns_names = st.lists(dns_labels, min_size=1, max_size=5).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda address: f"[{address}]")
hosts = st.one_of(dns_names, ipv4, ipv6)
ports = st.none() | st.integers(1, 65535)
authorities = st.builds(lambda host, port: host if port is None else f"{host}:{port}", hosts, ports)
paths = st.from_regex(r"/[\x21-\x7e]{0,40}", fullmatch=True)
field_values = st.from_regex(r"([\x21-\x7e\x80-\xff]+( [\x21-\x7e]+)*)?", fullmatch=True)
other_header_names = tokens.filter(
    lambda name: name.lower() not in ("host", "content-length", "transfer-encoding")
)
line_ends = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def request_lines(draw: st.DrawFn) -> tuple[str, str]:
    form = draw(st.sampled_from(["origin", "absolute", "authority", "asterisk"]))
    if form == "authority":
        return "CONNECT", f"{draw(hosts)}:{draw(st.integers(1, 65535))}"
    if form == "asterisk":
        return "OPTIONS", "*"
    method = draw(tokens.filter(lambda m: m != "CONNECT"))
    if form == "origin":
        return method, draw(paths)
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "Https"]))
    return method, f"{scheme}://{draw(authorities)}{draw(st.just('') | paths)}"


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method, target = draw(request_lines())
    version = draw(st.sampled_from(["1.0", "1.1"]))
    headers = [
        f"{name}: {value}".encode("latin-1")
        for name, value in draw(st.lists(st.tuples(other_header_names, field_values), max_size=6))
    ]
    if version == "1.1" or draw(st.booleans()):
        host_name = "".join(
            c.upper() if draw(st.booleans()) else c for c in draw(st.sampled_from(["host", "Host"]))
        )
        spaces = draw(st.sampled_from(["", " ", "\t ", "  "]))
        host_line = f"{host_name}:{spaces}{draw(authorities)}{spaces}".encode()
        headers.insert(draw(st.integers(0, len(headers))), host_line)
    lines = [f"{method} {target} HTTP/{version}".encode(), *headers, b""]
    return b"".join(line + draw(line_ends) for line in lines)


def h11_request(data: bytes) -> h11.Request:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    event = connection.next_event()
    assert isinstance(event, h11.Request)
    return event


def assert_agrees_with_h11(data: bytes, head: HttpRequestHead) -> None:
    request = h11_request(data)
    assert head.method == request.method.decode("ascii")
    assert head.target == request.target.decode("ascii")
    assert head.version == "HTTP/" + request.http_version.decode("ascii")
    host_values = [value for name, value in request.headers if name == b"host"]
    assert len(host_values) <= 1
    if request.method == b"CONNECT":
        authority = urlsplit("//" + head.target)
    elif not request.target.startswith((b"/", b"*")):
        authority = urlsplit(head.target)
    elif host_values and host_values[0]:
        authority = urlsplit("//" + host_values[0].decode("ascii"))
    else:
        assert (head.host, head.port) == (None, None)
        return
    assert (head.host, head.port) == (authority.hostname, authority.port)


@given(request_heads())
def test_generated_heads_agree_with_h11(data: bytes) -> None:
    head = parse_request_head(data)
    assert isinstance(head, HttpRequestHead)
    assert_agrees_with_h11(data, head)
    assert parse_request_head(data[:-1]) is NEED_MORE


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(request_heads() | st.sampled_from(HEADS)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "replace" and at < len(data):
            data[at] = draw(st.sampled_from(b" \t\r\n:/[]@%.\x00\x7fHh1"))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\r\n"]))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@given(mutated_heads())
def test_whatever_the_sniffer_accepts_h11_accepts_alike(data: bytes) -> None:
    head = parse_request_head(data)
    assert isinstance(head, RESULT_TYPES)
    if isinstance(head, HttpRequestHead):
        lowered = data.lower()
        assume(b"content-length" not in lowered and b"transfer-encoding" not in lowered)
        assert_agrees_with_h11(data, head)
