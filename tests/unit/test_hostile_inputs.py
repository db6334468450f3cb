"""Hostile input (issue 8): the corpus of nasty inputs replayed, and the properties the
sniffer and loader tests (test_sniff_*.py, test_policy_loader.py) do not already cover.

tests/corpus/*.bin are first flights a client could send (lying lengths, overflowing
extensions, control bytes in names …); tests/corpus/*.yaml are policy files (nesting,
alias bombs, huge integers, invalid UTF-8 …). tests/corpus/README.md says what each
one is. Every .bin must give its recorded answer, never an exception, whatever prefix
has arrived; every .yaml a Model or a PolicyError pointing at a line of that file.
scripts/fuzz runs these properties (and the other suites') much longer.
"""

from __future__ import annotations

import ipaddress
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressproxy.policy.decision import ConnectionFacts, Destination, Detected, RequestFacts
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import compile_policy
from egressproxy.policy.loader import load_policy
from egressproxy.policy.model import Model
from egressproxy.settings import Settings
from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    H2Preface,
    HttpRequestHead,
    NeedMore,
    NotThis,
    Opaque,
    TlsHello,
)
from egressproxy.sniff.detect import sniff
from egressproxy.sniff.http import (
    H2_PREFACE,
    is_plausible_host,
    parse_h2_preface,
    parse_request_head,
)
from egressproxy.sniff.tls import parse_client_hello

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
CORPUS_TIME_LIMIT = 2.0
"""Seconds one corpus file may take: the slowest (an alias bomb) needs a third of that."""

SNI = "corpus.example.test"
EXPECTED_SNIFF: dict[str, object] = {
    "h2_preface_broken.bin": Opaque("unsupported_version"),
    "h2_preface_then_garbage.bin": H2Preface(),
    "http_09_shape_binary.bin": Opaque("not_http"),
    "http_2000_headers.bin": HttpRequestHead("GET", "/", "HTTP/1.1", SNI, None),
    "http_8000_empty_lines.bin": Opaque("bad_request_line"),
    "http_bare_cr.bin": Opaque("not_http"),
    "http_huge_port.bin": Opaque("bad_host"),
    "http_invalid_utf8_host.bin": Opaque("bad_host"),
    "http_method_then_no_newline_100k.bin": Opaque("too_large"),
    "http_no_newline_100k.bin": Opaque("too_large"),
    "http_nul_in_host.bin": Opaque("malformed_header"),
    "http_obs_fold_host.bin": Opaque("malformed_header"),
    "http_space_before_colon.bin": Opaque("malformed_header"),
    "http_target_16k.bin": Opaque("too_large"),
    "http_two_hosts.bin": Opaque("bad_host"),
    "http_userinfo_in_target.bin": Opaque("bad_host"),
    "http_version_2_0.bin": Opaque("unsupported_version"),
    "tls_16383_empty_extensions.bin": Opaque("too_large"),
    "tls_3000_empty_extensions.bin": TlsHello(SNI, (), ech=False),
    "tls_alert_between_records.bin": Opaque("malformed_record"),
    "tls_empty_alpn_protocol.bin": Opaque("malformed_alpn"),
    "tls_extension_length_overflow.bin": Opaque("malformed_extensions"),
    "tls_extensions_length_overflow.bin": Opaque("malformed_extensions"),
    "tls_extensions_length_short.bin": Opaque("malformed_extensions"),
    "tls_handshake_length_overflow.bin": NEED_MORE,
    "tls_handshake_length_short.bin": Opaque("malformed_hello"),
    "tls_not_a_client_hello.bin": Opaque("not_client_hello"),
    "tls_one_byte_records.bin": TlsHello(SNI, (), ech=False),
    "tls_record_length_lie_longer.bin": TlsHello(SNI, (), ech=False),
    "tls_record_length_lie_shorter.bin": Opaque("malformed_record"),
    "tls_record_length_over_limit.bin": Opaque("malformed_record_length"),
    "tls_record_length_zero.bin": TlsHello(SNI, (), ech=False),  # skipped, as OpenSSL does
    "tls_sni_300_bytes.bin": Opaque("bad_sni"),
    "tls_sni_invalid_utf8.bin": Opaque("bad_sni"),
    "tls_sni_list_length_overflow.bin": Opaque("malformed_sni"),
    "tls_sni_name_length_overflow.bin": Opaque("malformed_sni"),
    "tls_sni_nul_byte.bin": Opaque("bad_sni"),
    "tls_sslv2_compatible_hello.bin": Opaque("unknown_protocol"),
    "tls_two_sni_extensions.bin": Opaque("malformed_duplicate_extension"),
}
"""What sniff() answers for each whole file (NEED_MORE: it waits for the buffer limit)."""

EXPECTED_POLICY: dict[str, str] = {
    "yaml_20000_documents.yaml": ":1: the policy has no documents",
    "yaml_bad_cidrs.yaml": ":8: EgressNetwork corpus/net.spec.networks[0].cidr: '0.0.0.0/-1'",
    "yaml_billion_laughs.yaml": ":1: YAML aliases expand the policy by more than",
    "yaml_binary_and_timestamp.yaml": ":5: EgressNetwork.metadata.name: expected a string",
    "yaml_deep_block_nesting.yaml": ":1: YAML nesting is too deep",
    "yaml_deep_flow_nesting.yaml": ":1: YAML nesting is too deep",
    "yaml_huge_int_port.yaml": ":13: YAML value '99999",
    "yaml_invalid_utf8.yaml": ":5: the policy is not valid UTF-8",
    "yaml_merge_keys.yaml": ":3: EgressNetwork corpus/n.spec: unknown field 'name'",
    "yaml_nan_port.yaml": ":13: TCPRoute corpus/r.spec.parentRefs[0].port: expected an integer",
    "yaml_non_mapping_documents.yaml": ":1: a policy document must be a mapping",
    "yaml_python_tag.yaml": ":1: a policy document must be a mapping",
    "yaml_recursive_alias.yaml": ":1: recursive YAML alias",
    "yaml_tabs_and_nul.yaml": ":2: YAML: unacceptable character #x0000",
    "yaml_utf16_bom.yaml": ":1: the policy is not valid UTF-8",
}
"""The start of the first problem after the file name ("" for a valid policy)."""

SNIFF_RESULTS = (TlsHello, HttpRequestHead, H2Preface, Opaque, NeedMore)
PARSER_RESULTS = (TlsHello, HttpRequestHead, H2Preface, NotThis, NeedMore)


def corpus_files(suffix: str) -> list[str]:
    return sorted(path.name for path in CORPUS.glob(f"*{suffix}"))


def test_every_corpus_file_has_an_expectation_and_a_description() -> None:
    assert corpus_files(".bin") == sorted(EXPECTED_SNIFF)
    assert corpus_files(".yaml") == sorted(EXPECTED_POLICY)
    readme = (CORPUS / "README.md").read_text()
    undescribed = [name for name in corpus_files("") if f"`{name}`" not in readme]
    assert undescribed == ["README.md"]


def prefix_lengths(size: int) -> list[int]:
    """Every length up to 2 KiB and around the buffer limit; a sample in between."""
    dense = set(range(min(size, 2048) + 1))
    edge = set(range(max(0, SNIFF_BUFFER_LIMIT - 64), min(size, SNIFF_BUFFER_LIMIT + 64) + 1))
    return sorted(dense | edge | set(range(0, size + 1, 997)) | {size})


@pytest.mark.parametrize("name", sorted(EXPECTED_SNIFF))
def test_corpus_first_flights(name: str) -> None:
    """The recorded answer, reached without an exception and never changed by more bytes."""
    data = (CORPUS / name).read_bytes()
    started = time.monotonic()
    answer = sniff(data)
    assert answer == EXPECTED_SNIFF[name]
    first_answer: object = None
    for length in prefix_lengths(len(data)):
        result = sniff(data[:length])
        assert isinstance(result, SNIFF_RESULTS)
        if first_answer is None and result is not NEED_MORE:
            first_answer = result
    if answer is not NEED_MORE:
        assert first_answer == answer
        assert sniff(data + b"\r\n\r\n" + bytes(range(256))) == answer
    for parser in (parse_client_hello, parse_request_head, parse_h2_preface):
        assert isinstance(parser(data), PARSER_RESULTS)
    assert time.monotonic() - started < CORPUS_TIME_LIMIT


def expect_model_or_located_error(path: Path) -> Model | PolicyError:
    """Loading gives a Model, or a PolicyError whose every problem points into the file
    (or just past its end: "found the end of the stream"). Lines as YAML counts them: CR,
    NEL and the Unicode separators end lines too."""
    lines = len(path.read_bytes().decode("utf-8", errors="replace").splitlines())
    try:
        model = load_policy(path)
    except PolicyError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.file == str(path)
            assert 1 <= problem.line <= lines + 1, problem
        return error
    compile_policy(model, Settings(namespace="corpus"))
    return model


@pytest.mark.parametrize("name", sorted(EXPECTED_POLICY))
def test_corpus_policies(name: str) -> None:
    path = CORPUS / name
    started = time.monotonic()
    outcome = expect_model_or_located_error(path)
    assert time.monotonic() - started < CORPUS_TIME_LIMIT
    if EXPECTED_POLICY[name]:
        assert isinstance(outcome, PolicyError)
        assert str(outcome.problems[0]).startswith(str(path) + EXPECTED_POLICY[name])
    else:
        assert isinstance(outcome, Model)


# --- properties not covered by the sniffer and loader suites -------------------------------


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def hello_with_server_name(name: bytes) -> bytes:
    """A minimal ClientHello record carrying one server_name entry."""
    entry = b"\x00" + u16(len(name)) + name
    server_name = u16(0) + u16(len(entry) + 2) + u16(len(entry)) + entry
    body = (
        b"\x03\x03" + bytes(32) + b"\x00" + u16(2) + b"\x13\x01" + b"\x01\x00"
        + u16(len(server_name)) + server_name
    )  # fmt: skip
    message = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + u16(len(message)) + message


LENGTH_FIELDS = {
    "record": (3, 2),
    "handshake": (6, 3),
    "extensions": (50, 2),
    "extension": (54, 2),
    "server_name_list": (56, 2),
    "server_name": (59, 2),
}
"""(offset, size) of each length field in hello_with_server_name()."""


@given(
    st.binary(min_size=1, max_size=80),
    st.sampled_from(sorted(LENGTH_FIELDS)),
    st.integers(min_value=0, max_value=(1 << 24) - 1),
    st.integers(min_value=0, max_value=SNIFF_BUFFER_LIMIT),
)
def test_length_fields_that_lie_never_break_the_tls_sniffer(
    name: bytes, field: str, value: int, cut: int
) -> None:
    """Any length field set to any value, the flight cut anywhere: a result, never an
    exception, and an answer that more bytes do not change."""
    offset, size = LENGTH_FIELDS[field]
    data = bytearray(hello_with_server_name(name))
    data[offset : offset + size] = (value % (1 << (8 * size))).to_bytes(size, "big")
    flight = bytes(data)
    partial = parse_client_hello(flight[:cut])
    whole = parse_client_hello(flight)
    assert isinstance(partial, PARSER_RESULTS) and isinstance(whole, PARSER_RESULTS)
    if partial is not NEED_MORE:
        assert whole == partial


@given(st.binary(min_size=1, max_size=80))
def test_a_server_name_the_sniffer_returns_is_a_plausible_host(name: bytes) -> None:
    """Whatever bytes the SNI holds, the policy only ever sees a plausible host name."""
    result = parse_client_hello(hello_with_server_name(name))
    if isinstance(result, TlsHello) and result.sni is not None:
        assert is_plausible_host(result.sni), result.sni
        assert result.sni.isascii() and not any(ch in result.sni for ch in "\x00\r\n\t /@")


@given(st.binary(max_size=60), st.sampled_from([b"", b":80", b":65536", b"\r\n x: y"]))
def test_a_host_the_sniffer_returns_is_a_plausible_host(value: bytes, suffix: bytes) -> None:
    """Control bytes, spaces, folding or userinfo in Host never reach the policy as a name."""
    head = b"GET / HTTP/1.1\r\nHost: " + value + suffix + b"\r\n\r\n"
    result = parse_request_head(head)
    if isinstance(result, HttpRequestHead) and result.host is not None:
        assert is_plausible_host(result.host) or is_ip_address(result.host), result.host
        assert not any(ch in result.host for ch in "\x00\r\n\t /@")


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@given(st.binary(max_size=120))
def test_h2_preface_sniffing(tail: bytes) -> None:
    """The preface answers whatever follows it; anything else is never taken for h2."""
    assert parse_h2_preface(H2_PREFACE + tail) == H2Preface()
    assert sniff(H2_PREFACE + tail) == H2Preface()
    result = parse_h2_preface(tail)
    if tail.startswith(H2_PREFACE):
        assert result == H2Preface()
    elif H2_PREFACE.startswith(tail):
        assert result is NEED_MORE
    else:
        assert isinstance(result, NotThis)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_as_a_policy_file(data: bytes) -> None:
    """A file on disk (invalid UTF-8, NULs, BOMs included) gives a Model or located errors."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "policy.yaml")
        path.write_bytes(data)
        expect_model_or_located_error(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(EXPECTED_POLICY)),
    st.integers(min_value=0, max_value=4096),
    st.binary(max_size=8),
)
def test_corpus_policies_corrupted(name: str, position: int, junk: bytes) -> None:
    """The corpus files with a few bytes overwritten anywhere: still no other exception."""
    data = bytearray((CORPUS / name).read_bytes())
    position %= len(data) + 1
    data[position : position + len(junk)] = junk
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "policy.yaml")
        path.write_bytes(bytes(data))
        outcome = expect_model_or_located_error(path)
    if isinstance(outcome, Model):
        index = compile_policy(outcome, Settings(namespace="corpus"))
        destination = Destination(ipaddress.ip_address("203.0.113.9"), 443)
        index.decide_connection(ConnectionFacts(destination, Detected.TLS, SNI))
        index.decide_request(RequestFacts(destination, SNI, "GET", "/", "", (), grpc=False))
