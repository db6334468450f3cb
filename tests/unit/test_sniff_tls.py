"""ClientHello sniffing against real captures, crafted edge cases and generated hellos."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressproxy.sniff import NEED_MORE, SNIFF_BUFFER_LIMIT, NeedMore, NotThis, TlsHello
from egressproxy.sniff.detect import sniff
from egressproxy.sniff.tls import parse_client_hello, read_again_at

CAPTURES = Path(__file__).resolve().parent.parent / "captures"

H2_AND_HTTP1 = ("h2", "http/1.1")
EXPECTED_HELLOS = {
    "curl_tls13.bin": TlsHello(sni="example.test", alpn=H2_AND_HTTP1, ech=False),
    "curl_tls12.bin": TlsHello(sni="www.example.com", alpn=H2_AND_HTTP1, ech=False),
    "openssl_s_client.bin": TlsHello(sni="api.example.org", alpn=(), ech=False),
    "openssl_no_sni.bin": TlsHello(sni=None, alpn=("http/1.1",), ech=False),
    "python_ssl.bin": TlsHello(sni="python.example.net", alpn=("http/1.1",), ech=False),
    # Chromium offers a GREASE ECH extension by default: indistinguishable from real ECH.
    "chromium.bin": TlsHello(sni="example.test", alpn=H2_AND_HTTP1, ech=True),
    "chromium_three_records.bin": TlsHello(sni="example.test", alpn=H2_AND_HTTP1, ech=True),
    "curl_tls13_two_records.bin": TlsHello(sni="example.test", alpn=H2_AND_HTTP1, ech=False),
    "curl_tls13_ech.bin": TlsHello(sni="example.test", alpn=H2_AND_HTTP1, ech=True),
}
RESULT_TYPES = (TlsHello, NeedMore, NotThis)


def load(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def extension(extension_type: int, body: bytes) -> bytes:
    return u16(extension_type) + u16(len(body)) + body


def sni_extension(name: bytes) -> bytes:
    entry = b"\x00" + u16(len(name)) + name
    return extension(0, u16(len(entry)) + entry)


def alpn_extension(protocols: Sequence[bytes]) -> bytes:
    names = b"".join(u8(len(protocol)) + protocol for protocol in protocols)
    return extension(16, u16(len(names)) + names)


# An outer ECHClientHello (draft-ietf-tls-esni): type, HPKE suite, config id, enc, payload.
ECH_EXTENSION = extension(
    0xFE0D,
    b"\x00" + b"\x00\x01\x00\x01" + b"\x2a" + u16(32) + bytes(range(32)) + u16(144) + bytes(144),
)


def client_hello(extensions: Sequence[bytes], session_id: bytes = bytes(32)) -> bytes:
    """A ClientHello handshake message (type and length included)."""
    block = b"".join(extensions)
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + u8(len(session_id))
        + session_id
        + u16(4)
        + b"\x13\x01\x13\x02"
        + b"\x01\x00"
        + u16(len(block))
        + block
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def frame(message: bytes, fragment_sizes: Sequence[int] = ()) -> bytes:
    """Handshake records carrying ``message``: fragments of the given sizes, then the rest."""
    records = []
    start = 0
    ends = [end for end in _cumulative(fragment_sizes) if end < len(message)]
    for end in [*ends, len(message)]:
        fragment = message[start:end]
        records.append(b"\x16\x03\x01" + u16(len(fragment)) + fragment)
        start = end
    return b"".join(records)


def _cumulative(sizes: Sequence[int]) -> list[int]:
    total = 0
    ends = []
    for size in sizes:
        total += size
        ends.append(total)
    return ends


def handshake_message(capture: bytes) -> bytes:
    """The ClientHello of a single-record capture."""
    record_length = int.from_bytes(capture[3:5])
    assert len(capture) == 5 + record_length
    return capture[5:]


def extensions_start(message: bytes) -> int:
    """Where the extension block's length is in a well-formed ClientHello message."""
    pos = 4 + 2 + 32
    pos += 1 + message[pos]
    pos += 2 + int.from_bytes(message[pos : pos + 2])
    return pos + 1 + message[pos]


def extensions_of(message: bytes) -> list[tuple[int, bytes]]:
    pos = extensions_start(message) + 2
    found = []
    while pos < len(message):
        length = int.from_bytes(message[pos + 2 : pos + 4])
        found.append((int.from_bytes(message[pos : pos + 2]), message[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return found


def add_extension(capture: bytes, new_extension: bytes) -> bytes:
    """Append an extension to a single-record capture, fixing every enclosing length."""
    message = handshake_message(capture)
    pos = extensions_start(message)
    extensions = message[pos + 2 :] + new_extension
    body = message[4:pos] + u16(len(extensions)) + extensions
    return frame(b"\x01" + len(body).to_bytes(3, "big") + body)


def test_crafted_captures_are_what_the_readme_says() -> None:
    chromium = load("chromium.bin")
    message = handshake_message(chromium)
    inside_sni = message.index(b"example.test") + 7
    assert load("chromium_three_records.bin") == frame(message, [2, inside_sni - 2])
    curl = load("curl_tls13.bin")
    curl_message = handshake_message(curl)
    assert load("curl_tls13_two_records.bin") == frame(curl_message, [len(curl_message) // 2])
    assert load("curl_tls13_ech.bin") == add_extension(curl, ECH_EXTENSION)


def test_chromium_capture_is_post_quantum_grease_and_over_one_segment() -> None:
    chromium = load("chromium.bin")
    assert len(chromium) > 1500
    extensions = dict(extensions_of(handshake_message(chromium)))
    key_shares = extensions[51]
    pos = 2
    groups = {}
    while pos < len(key_shares):
        length = int.from_bytes(key_shares[pos + 2 : pos + 4])
        groups[int.from_bytes(key_shares[pos : pos + 2])] = length
        pos += 4 + length
    assert groups[0x11EC] == 1216  # X25519MLKEM768
    assert any(t & 0x0F0F == 0x0A0A and t >> 8 == t & 0xFF for t in extensions)  # GREASE
    assert 0xFE0D in extensions


@pytest.mark.parametrize("name", sorted(EXPECTED_HELLOS))
def test_every_prefix_needs_more_and_the_whole_hello_answers(name: str) -> None:
    capture = load(name)
    for end in range(len(capture)):
        assert parse_client_hello(capture[:end]) is NEED_MORE, end
    expected = EXPECTED_HELLOS[name]
    assert parse_client_hello(capture) == expected
    assert parse_client_hello(capture + b"\x17\x03\x03\x00\x05hello") == expected
    assert parse_client_hello(capture + b"\x00junk" * 100) == expected


def test_the_hello_may_end_inside_its_last_record() -> None:
    message = client_hello([sni_extension(b"example.com")])
    record = b"\x16\x03\x01" + u16(len(message) + 3) + message + b"\x14\x00\x00"
    assert parse_client_hello(record[: 5 + len(message)]) == TlsHello("example.com", (), False)


def assert_read_again_at_holds(data: bytes) -> None:
    """Every prefix of data the parser finds incomplete stays so up to read_again_at's
    answer for it: skipping the reads before that changes no answer."""
    answers = [parse_client_hello(data[:end]) for end in range(len(data) + 1)]
    for end, answer in enumerate(answers):
        if answer is NEED_MORE:
            again = read_again_at(data[:end])
            assert end < again <= SNIFF_BUFFER_LIMIT
            assert all(later is NEED_MORE for later in answers[end:again]), end


@pytest.mark.parametrize("name", sorted(EXPECTED_HELLOS))
def test_an_incomplete_capture_is_read_again_only_where_its_answer_may_change(name: str) -> None:
    assert_read_again_at_holds(load(name))


def test_a_hello_in_tiny_records_is_read_again_a_few_times_a_record() -> None:
    """Read at every byte, a hello of 256 tiny records and one long one walked the records
    once a byte: 1.4 s of the worker's loop for its 16 KiB."""
    message = client_hello([sni_extension(b"example.com"), extension(21, bytes(15500))])
    records = frame(message, [1] * 254)
    assert parse_client_hello(records) == NotThis("too_large")
    assert_read_again_at_holds(records[:2000])
    reads, end = 0, 1
    while parse_client_hello(records[:end]) is NEED_MORE:
        reads += 1
        end = read_again_at(records[:end])
    assert end == SNIFF_BUFFER_LIMIT
    assert reads <= 4 * 256, reads


@pytest.mark.parametrize("minor", [0x00, 0x10, 0xFF])
def test_a_first_record_of_any_tls_minor_version_is_read(minor: int) -> None:
    """OpenSSL reads a hello in a record of version 03 ff as any other: so does the sniffer,
    or its SNI would go unread."""
    message = client_hello([sni_extension(b"example.com")])
    record = bytes([0x16, 3, minor]) + u16(len(message)) + message
    assert parse_client_hello(record) == TlsHello("example.com", (), False)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"G", "not_tls"),
        (b"GET / HTTP/1.1\r\n\r\n", "not_tls"),
        (b"\x80\x2e\x01\x03\x01", "not_tls"),  # SSLv2-compatible ClientHello
        (b"\x16\x10", "not_tls"),  # version 16.x: Go's server calls that no TLS
        (b"\x15\x03\x03\x00\x02\x02\x28\x17\x03", "not_tls"),  # an alert, then data
        (b"\x15\x03\x03\x00\x03", "not_tls"),  # no alert is three bytes
        (b"\x16\x03\x01\x00\x00\x17\x03", "not_tls"),  # an empty record, then data
        (b"\x16\x03\x01\x48\x01\x02", "not_client_hello"),  # longer than any TLS takes
        (b"\x16\x03\x01\x48\x01\x01", "malformed_record_length"),  # and a hello in it
        (b"\x16\x03\x03\x00\x30\x02", "not_client_hello"),  # a ServerHello
    ],
)
def test_rejects_on_the_first_bytes(data: bytes, reason: str) -> None:
    assert parse_client_hello(data) == NotThis(reason)


def test_later_records_must_be_handshake_records() -> None:
    message = client_hello([sni_extension(b"example.com")])
    split = frame(message, [10])
    change_cipher_spec = split[:15] + b"\x14" + split[16:]
    assert parse_client_hello(change_cipher_spec) == NotThis("malformed_record")
    bad_version = split[:16] + b"\x10" + split[17:]
    assert parse_client_hello(bad_version) == NotThis("malformed_record")
    after_the_first = split[:15] + b"\x14\x03\x01\x00\x00" + split[15:]
    assert parse_client_hello(after_the_first) == NotThis("malformed_record")


WARNING_ALERT = b"\x15\x03\x01\x00\x02\x01\x5a"  # warning, user_canceled


def test_a_hello_behind_warning_alerts_is_read() -> None:
    """Go's TLS server drops warning alerts before the hello and Java's reads past one, so
    the name in a hello behind them is read: passed as opaque TCP, it went past host rules
    and --ech deny."""
    message = client_hello([sni_extension(b"example.com")])
    for data in (WARNING_ALERT + frame(message), WARNING_ALERT * 3 + frame(message, [10])):
        assert parse_client_hello(data) == TlsHello("example.com", (), False)
        assert sniff(data) == TlsHello("example.com", (), False)
        for cut in range(1, len(data)):
            assert parse_client_hello(data[:cut]) == NEED_MORE, cut
        assert_read_again_at_holds(data)
    after_the_hello_began = frame(message, [10])
    alert_inside = after_the_hello_began[:15] + WARNING_ALERT + after_the_hello_began[15:]
    assert parse_client_hello(alert_inside) == NotThis("malformed_record")


@pytest.mark.parametrize("major", [0x00, 0x02, 0x04, 0x0F])
def test_a_hello_in_records_of_any_version_below_16_is_read(major: int) -> None:
    """Go's server takes a first flight in records of any version below 16.0 and Java's in
    4.1: a name there went past host rules as opaque TCP (OpenSSL refuses the record)."""
    message = client_hello([sni_extension(b"example.com")])
    records = frame(message, [10])
    for start in (0, 15):
        records = records[: start + 1] + bytes([major]) + records[start + 2 :]
    assert parse_client_hello(records) == TlsHello("example.com", (), False)


def test_a_hello_in_a_record_longer_than_tls_allows_is_unreadable() -> None:
    """Go's and Java's servers read a hello in a record of up to 2^14 + 2048 bytes; such a
    hello no longer fits the sniffer's buffer, so it is one the sniffer cannot read (which
    the flow denies), not binary data before a hello (which it passes as opaque)."""
    # 16,605 bytes: past 2^14, within 2^14 + 2048
    message = client_hello([sni_extension(b"example.com"), extension(21, bytes(16500))])
    record = b"\x16\x03\x01" + u16(len(message)) + message
    assert parse_client_hello(record) == NotThis("too_large")
    assert parse_client_hello(record[:5]) == NEED_MORE  # its type byte decides


@pytest.mark.parametrize(
    ("record_length", "expected"),
    [
        ((1 << 14) + 2048, TlsHello("example.com", (), False)),
        ((1 << 14) + 2049, NotThis("malformed_record_length")),
    ],
    ids=["go-max-ciphertext", "one-byte-more"],
)
def test_a_short_hello_is_read_in_a_record_up_to_gos_longest(
    record_length: int, expected: TlsHello | NotThis
) -> None:
    """Go's server reads a hello in a record of up to 2^14 + 2048 bytes (maxCiphertext),
    the rest of the record being what comes after: refused there, a name Go serves went
    unseen by the policy; read one byte longer, a record no server reads passed as one."""
    message = client_hello([sni_extension(b"example.com")])
    record = b"\x16\x03\x01" + u16(record_length) + message + bytes(50)
    assert parse_client_hello(record) == expected


def test_a_lone_header_of_a_record_longer_than_any_server_reads_needs_more() -> None:
    """Its length is not yet a hello's: the first byte of the fragment decides whether a
    hello (malformed_record_length) or binary data that began as a record (opaque) came,
    and a flow answered malformed at the header denied data it should have passed."""
    header = b"\x16\x03\x01\xff\xff"
    assert parse_client_hello(header) is NEED_MORE
    assert parse_client_hello(header + b"\x02" + bytes(20)) == NotThis("not_client_hello")
    assert parse_client_hello(header + b"\x01" + bytes(20)) == NotThis("malformed_record_length")


EMPTY_RECORD = b"\x16\x03\x01\x00\x00"


def test_empty_records_are_skipped_as_openssl_skips_them() -> None:
    """RFC 8446 forbids empty handshake records, but OpenSSL reads a hello behind them (a
    server's SNI callback gets the name), so the name must not go unseen by the policy:
    they were a way to pass a denied SNI as TLS without one."""
    message = client_hello([sni_extension(b"example.com")])
    split = frame(message, [10])
    for data in (
        EMPTY_RECORD + frame(message),
        EMPTY_RECORD * 3 + frame(message),
        split[:15] + EMPTY_RECORD + split[15:],
        split[:15] + EMPTY_RECORD * 2 + split[15:],
    ):
        assert parse_client_hello(data) == TlsHello("example.com", (), False)
        assert parse_client_hello(data + EMPTY_RECORD) == TlsHello("example.com", (), False)
        for cut in range(len(data)):
            assert parse_client_hello(data[:cut]) == NEED_MORE, cut
        assert_read_again_at_holds(data)
    assert read_again_at(EMPTY_RECORD) == len(EMPTY_RECORD) + 1


def test_the_handshake_header_may_be_split_over_records() -> None:
    message = client_hello([sni_extension(b"split.example.com")])
    one_byte_records = frame(message, [1, 1, 1, 1, 1])
    assert parse_client_hello(one_byte_records) == TlsHello("split.example.com", (), False)


def test_too_many_records_is_refused_before_the_buffer_limit() -> None:
    message = client_hello([sni_extension(b"example.com"), extension(21, bytes(400))])
    tiny_records = frame(message, [1] * 300)
    assert parse_client_hello(tiny_records) == NotThis("too_many_records")


@pytest.mark.parametrize(
    ("records", "expected"),
    [(256, TlsHello("example.com", (), False)), (257, NotThis("too_many_records"))],
)
def test_a_hello_is_read_in_up_to_256_records(records: int, expected: TlsHello | NotThis) -> None:
    """The bound on the records walked: a hello split into 256 (tens in practice) is still
    read, one in 257 is refused; a bound moved by one changes which split hellos pass."""
    message = client_hello([sni_extension(b"example.com"), extension(21, bytes(400))])
    split = frame(message, [1] * (records - 1))
    assert split.count(b"\x16\x03\x01") == records
    assert parse_client_hello(split) == expected


def test_a_hello_that_does_not_fit_the_buffer_is_too_large() -> None:
    padding = extension(21, bytes(SNIFF_BUFFER_LIMIT))
    message = client_hello([sni_extension(b"example.com"), padding])
    records = frame(message, [16000])
    assert parse_client_hello(records[: SNIFF_BUFFER_LIMIT - 1]) is NEED_MORE
    assert parse_client_hello(records[:SNIFF_BUFFER_LIMIT]) == NotThis("too_large")
    assert parse_client_hello(records) == NotThis("too_large")


def test_a_hello_ending_exactly_at_the_buffer_limit_is_parsed() -> None:
    fixed = len(frame(client_hello([sni_extension(b"example.com"), extension(21, b"")])))
    padding = extension(21, bytes(SNIFF_BUFFER_LIMIT - fixed))
    records = frame(client_hello([sni_extension(b"example.com"), padding]))
    assert len(records) == SNIFF_BUFFER_LIMIT
    assert parse_client_hello(records) == TlsHello("example.com", (), False)


def test_a_hello_without_extensions() -> None:
    message = client_hello([])
    without_block = message[:-2]
    body = without_block[4:]
    assert parse_client_hello(frame(b"\x01" + len(body).to_bytes(3, "big") + body)) == TlsHello(
        None, (), False
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"Example.COM", "example.com"),
        (b"_acme-challenge.example.com", "_acme-challenge.example.com"),
        (b"example.com.", "example.com."),
        (b"192.0.2.7", "192.0.2.7"),
        (b"2001:DB8::1", "2001:db8::1"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_plausible_server_names(name: bytes, expected: str) -> None:
    hello = parse_client_hello(frame(client_hello([sni_extension(name)])))
    assert hello == TlsHello(sni=expected, alpn=(), ech=False)


@pytest.mark.parametrize(
    "name",
    [
        b"exa mple.com",
        b"example..com",
        b".example.com",
        b"b\xc3\xbccher.example",
        b"example.com\x00.evil.test",
        b"a" * 64 + b".example.com",
        b".".join([b"a" * 63] * 4),
        b"fe80::1%eth0",
        b"[2001:db8::1]",
        b"example.com:443",
    ],
)
def test_implausible_server_names(name: bytes) -> None:
    assert parse_client_hello(frame(client_hello([sni_extension(name)]))) == NotThis("bad_sni")


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([sni_extension(b"a.example"), sni_extension(b"b.example")], "duplicate_extension"),
        ([alpn_extension([b"h2"]), alpn_extension([b"http/1.1"])], "duplicate_extension"),
        ([extension(0, b"")], "sni"),
        ([extension(0, u16(0))], "sni"),
        ([extension(0, u16(3) + b"\x00" + u16(0))], "sni"),
        ([extension(0, u16(8) + b"\x01" + u16(5) + b"a.com")], "sni"),
        ([extension(0, u16(9) + b"\x00" + u16(6) + b"a.com")], "sni"),
        ([extension(0, u16(16) + (b"\x00" + u16(5) + b"a.com") * 2)], "sni"),
        ([extension(16, b"")], "alpn"),
        ([extension(16, u16(0))], "alpn"),
        ([extension(16, u16(1) + b"\x00")], "alpn"),
        ([extension(16, u16(3) + b"\x05h2")], "alpn"),
        ([extension(16, u16(4) + b"\x02h2")], "alpn"),
    ],
)
def test_malformed_extensions(extensions: list[bytes], reason: str) -> None:
    result = parse_client_hello(frame(client_hello(extensions)))
    assert result == NotThis(f"malformed_{reason}")


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([extension(0, u16(3) + b"\x00" + u16(12) + b"evil.example")], "malformed_sni"),
        ([extension(16, u16(3) + b"\x02h2\x08http/1.1")], "malformed_alpn"),
    ],
    ids=["sni", "alpn"],
)
def test_a_list_shorter_than_its_extension_is_malformed(
    extensions: list[bytes], reason: str
) -> None:
    """A list length that disagrees with its extension's, though the entries fill the
    extension: OpenSSL and BoringSSL refuse such a hello, so read anyway, the policy judged
    a name (or protocols) that no server reads."""
    assert parse_client_hello(frame(client_hello(extensions))) == NotThis(reason)


def test_a_hello_body_of_34_bytes_is_malformed_not_an_exception() -> None:
    """Version and random, then no session-id length: reading the byte past the body
    would raise IndexError in the worker's loop instead of answering malformed_hello."""
    body = b"\x03\x03" + bytes(range(32))
    assert len(body) == 34
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    assert parse_client_hello(frame(message)) == NotThis("malformed_hello")


def test_malformed_hello_bodies() -> None:
    message = client_hello([sni_extension(b"example.com")])

    def with_body(body: bytes) -> NotThis | TlsHello | NeedMore:
        return parse_client_hello(frame(b"\x01" + len(body).to_bytes(3, "big") + body))

    body = message[4:]
    assert with_body(body[:20]) == NotThis("malformed_hello")
    assert with_body(b"\x02" + body[1:]) == NotThis("malformed_hello")
    assert with_body(body[:34] + b"\x21" + body[35:]) == NotThis("malformed_session_id")
    ciphers_at = 35 + 32
    assert with_body(body[:ciphers_at] + u16(3) + body[ciphers_at + 2 :]) == NotThis(
        "malformed_cipher_suites"
    )
    assert with_body(body[:ciphers_at] + u16(0xFFF0) + body[ciphers_at + 2 :]) == NotThis(
        "malformed_cipher_suites"
    )
    compression_at = ciphers_at + 2 + 4
    assert with_body(body[:compression_at] + b"\x00" + body[compression_at + 1 :]) == NotThis(
        "malformed_compression_methods"
    )
    extensions_at = compression_at + 2
    assert with_body(body[: extensions_at + 1]) == NotThis("malformed_extensions")
    assert with_body(body + b"\x00") == NotThis("malformed_extensions")
    declared = int.from_bytes(body[extensions_at : extensions_at + 2])
    longer = body[:extensions_at] + u16(declared + 2) + body[extensions_at + 2 :] + b"\x00\x00"
    assert with_body(longer) == NotThis("malformed_extensions")
    overrun = body[:extensions_at] + u16(4) + u16(99) + u16(9)
    assert with_body(overrun) == NotThis("malformed_extensions")


def test_a_huge_declared_hello_waits_for_the_buffer_limit_then_gives_up() -> None:
    start = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"
    assert parse_client_hello(start) is NEED_MORE
    assert parse_client_hello(start + bytes(SNIFF_BUFFER_LIMIT)) == NotThis("too_large")


# -- properties -------------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_arbitrary_bytes_give_a_result(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), RESULT_TYPES)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_after_a_record_header_give_a_result(data: bytes) -> None:
    assert isinstance(parse_client_hello(b"\x16\x03\x01" + data), RESULT_TYPES)


@st.composite
def mutated_captures(draw: st.DrawFn) -> bytes:
    data = bytearray(load(draw(st.sampled_from(sorted(EXPECTED_HELLOS)))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@given(mutated_captures())
def test_mutated_captures_give_a_result(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), RESULT_TYPES)


@given(mutated_captures())
def test_mutated_captures_are_read_again_only_where_their_answer_may_change(data: bytes) -> None:
    assert_read_again_at_holds(data)


@given(
    st.lists(st.integers(1, 40), max_size=20),
    st.binary(max_size=3),
    st.integers(0, 0xFFFF),
)
def test_split_hellos_are_read_again_only_where_their_answer_may_change(
    fragment_sizes: list[int], junk: bytes, declared: int
) -> None:
    """Tiny records, the handshake header split across them, a hello ending mid-record,
    bytes after it, and a declared length that lies."""
    message = client_hello([sni_extension(b"example.com")])
    message = message[:2] + u16(declared) + message[4:] if declared % 3 == 0 else message
    assert_read_again_at_holds(frame(message, fragment_sizes) + junk)


dns_labels = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?", fullmatch=True)
server_names = st.lists(dns_labels, min_size=1, max_size=5).map(".".join)
alpn_lists = st.lists(st.binary(min_size=1, max_size=20), max_size=4)
extension_types = st.integers(0, 0xFFFF).filter(lambda t: t not in (0, 16, 0xFE0D))
other_extensions = st.dictionaries(extension_types, st.binary(max_size=40), max_size=12)


@given(
    sni=st.none() | server_names,
    alpn=alpn_lists,
    ech=st.booleans(),
    others=other_extensions,
    session_id=st.binary(max_size=32),
    order_seed=st.integers(0, 2**32),
    fragment_sizes=st.lists(st.integers(1, 200), max_size=12),
)
def test_generated_hellos_round_trip(
    sni: str | None,
    alpn: list[bytes],
    ech: bool,
    others: dict[int, bytes],
    session_id: bytes,
    order_seed: int,
    fragment_sizes: list[int],
) -> None:
    extensions = [extension(t, body) for t, body in others.items()]
    if sni is not None:
        extensions.append(sni_extension(sni.encode("ascii")))
    if alpn:
        extensions.append(alpn_extension(alpn))
    if ech:
        extensions.append(ECH_EXTENSION)
    random.Random(order_seed).shuffle(extensions)
    records = frame(client_hello(extensions, session_id), fragment_sizes)

    expected = TlsHello(
        sni=None if sni is None else sni.lower(),
        alpn=tuple(protocol.decode("latin-1") for protocol in alpn),
        ech=ech,
    )
    assert parse_client_hello(records) == expected
    assert parse_client_hello(records + b"\x16\x03\x03") == expected
    cut = order_seed % len(records)
    assert parse_client_hello(records[:cut]) is NEED_MORE
