"""Access log: one line per TCP/TLS connection or HTTP request, text or JSON, written off-loop."""

from __future__ import annotations

import dataclasses
import errno
import io
import ipaddress
import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressproxy import accesslog
from egressproxy.accesslog import (
    CONNECTION_KEYS,
    MAX_PENDING_LINES,
    REQUEST_KEYS,
    STOP_PATIENCE,
    AccessLog,
    LineFormatter,
    LineWriter,
    decision_word,
    route_text,
    setup_logging,
    shutdown_logging,
)
from egressproxy.policy.decision import (
    ConnectionFacts,
    Decision,
    Destination,
    Detected,
    RequestFacts,
    RouteProtocol,
)
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import load_policy, load_policy_text
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import LogFormat, Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
CLIENT_SETTINGS = Settings(namespace="egress-test")
EXTERNAL = ipaddress.ip_address("203.0.113.5")
CLIENT = "198.18.0.2:40000"
TEXT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
BLOCKED_WRITER_TIMEOUT = 5.0

AUDITED = """
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: audited
  annotations: {egressproxy.io/audit: "true"}
spec: {trafficPolicy: Deny}
"""


def guide_step(name: str) -> PolicyIndex:
    return compile_policy(load_policy(EXAMPLES / name), CLIENT_SETTINGS)


def tls_connection(index: PolicyIndex, sni: str, error: str = "") -> FlowRecord:
    destination = Destination(EXTERNAL, 443)
    return FlowRecord(
        client=CLIENT,
        destination=destination,
        detected=Detected.TLS,
        hostname=sni,
        sniff_outcome="tls",
        decision=index.decide_connection(ConnectionFacts(destination, Detected.TLS, sni)),
        error=error,
        bytes_from_client=517,
        bytes_from_upstream=4096,
        started=time.monotonic() - 1.5,
    )


def http_request(index: PolicyIndex, path: str, status: int) -> RequestRecord:
    facts = RequestFacts(Destination(EXTERNAL, 80), "httpbin.org", "GET", path, "", (), False)
    return RequestRecord(
        client=CLIENT,
        destination=facts.destination,
        protocol="http1",
        hostname="httpbin.org",
        method="GET",
        path=path,
        grpc=False,
        decision=index.decide_request(facts),
        status=status,
        bytes_from_client=80,
        bytes_from_upstream=300,
        started=time.monotonic() - 0.25,
    )


class Lines:
    """An AccessLog writing synchronously into memory, formatted as the proxy formats it."""

    def __init__(self, log_format: LogFormat) -> None:
        self.buffer = io.StringIO()
        handler = logging.StreamHandler(self.buffer)
        handler.setFormatter(LineFormatter(log_format))
        self.logger = logging.Logger(f"test-access-{log_format.value}")
        self.logger.addHandler(handler)
        self.access_log = AccessLog(self.logger)

    def lines(self) -> list[str]:
        return self.buffer.getvalue().splitlines()


def text_fields(line: str) -> tuple[str, dict[str, str]]:
    """The timestamp and key=value pairs of a text access line."""
    time_text, kind, rest = line.split(" ", 2)
    assert kind == "access"
    pairs = {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in TEXT_PAIR.findall(rest)
    }
    assert " ".join(f"{key}={value}" for key, value in TEXT_PAIR.findall(rest)) == rest
    return time_text, pairs


def assert_rfc3339(text: str) -> None:
    assert text.endswith("Z")
    assert datetime.fromisoformat(text.replace("Z", "+00:00")).utcoffset() is not None


def test_tls_connection_text_line() -> None:
    out = Lines(LogFormat.TEXT)
    out.access_log.connection_closed(
        tls_connection(guide_step("linkerd-4-tlsroute.yaml"), "httpbin.org")
    )
    (line,) = out.lines()
    time_text, fields = text_fields(line)
    assert_rfc3339(time_text)
    duration = float(fields.pop("duration"))
    assert 1.5 <= duration < 60
    assert fields == {
        "client": CLIENT,
        "destination": "203.0.113.5:443",
        "protocol": "tls",
        "hostname": "httpbin.org",
        "ech": "false",
        "route": "TLSRoute/egress-test/tls-egress",
        "decision": "allow",
        "status": "-",
        "error": "-",
        "bytes_sent": "517",
        "bytes_received": "4096",
    }


@pytest.mark.parametrize("log_format", [LogFormat.TEXT, LogFormat.JSON])
def test_a_duration_is_written_in_seconds_to_the_microsecond(log_format: LogFormat) -> None:
    """Six decimals on request and connection lines alike (README: the access log)."""
    out = Lines(log_format)
    out.access_log.request_finished(
        http_request(guide_step("linkerd-3-httproute.yaml"), "/get", 200)
    )
    out.access_log.connection_closed(
        tls_connection(guide_step("linkerd-4-tlsroute.yaml"), "httpbin.org")
    )
    ending = r"duration=\d+\.\d{6}" if log_format is LogFormat.TEXT else r'"duration":\d+\.\d{6}\}'
    for line in out.lines():
        assert re.search(ending + "$", line), line


def test_denied_tls_connection_json_line() -> None:
    out = Lines(LogFormat.JSON)
    index = guide_step("linkerd-4-tlsroute.yaml")
    out.access_log.connection_closed(tls_connection(index, "github.com", error="forbidden"))
    (line,) = out.lines()
    document = json.loads(line)
    assert_rfc3339(document.pop("time"))
    assert 1.5 <= document.pop("duration") < 60
    assert document == {
        "log": "access",
        "client": CLIENT,
        "destination": "203.0.113.5:443",
        "protocol": "tls",
        "hostname": "github.com",
        "ech": False,
        "route": "default/tls-egress-deny",
        "decision": "deny",
        "status": "",
        "error": "forbidden",
        "bytes_sent": 517,
        "bytes_received": 4096,
    }


def test_http_request_json_line() -> None:
    out = Lines(LogFormat.JSON)
    index = guide_step("linkerd-3-httproute.yaml")
    out.access_log.request_finished(http_request(index, "/get", 200))
    out.access_log.request_finished(http_request(index, "/post", 403))
    allowed, denied = (json.loads(line) for line in out.lines())
    for document in (allowed, denied):
        assert_rfc3339(document.pop("time"))
        assert 0.25 <= document.pop("duration") < 60
    common = {
        "log": "access",
        "client": CLIENT,
        "destination": "203.0.113.5:80",
        "protocol": "http1",
        "hostname": "httpbin.org",
        "method": "GET",
        "error": "",
        "bytes_sent": 80,
        "bytes_received": 300,
    }
    assert allowed == {
        **common,
        "route": "HTTPRoute/egress-test/httpbin-get",
        "decision": "allow",
        "path": "/get",
        "status": "200",
    }
    assert denied == {
        **common,
        "route": "default/http-egress-deny",
        "decision": "deny",
        "path": "/post",
        "status": "403",
    }


def test_routed_request_says_route() -> None:
    out = Lines(LogFormat.TEXT)
    index = guide_step("linkerd-5-redirect.yaml")
    out.access_log.request_finished(http_request(index, "/anything", 200))
    _, fields = text_fields(out.lines()[0])
    assert (fields["decision"], fields["route"]) == (
        "route",
        "HTTPRoute/egress-test/unencrypted-http",
    )


def test_audited_denial_is_would_deny() -> None:
    out = Lines(LogFormat.JSON)
    index = compile_policy(load_policy_text(AUDITED, "audited.yaml"), CLIENT_SETTINGS)
    out.access_log.request_finished(http_request(index, "/get", 200))
    out.access_log.connection_closed(tls_connection(index, "github.com"))
    request_line, connection_line = (json.loads(line) for line in out.lines())
    assert (request_line["decision"], request_line["route"]) == (
        "would_deny",
        "default/http-egress-deny",
    )
    assert (connection_line["decision"], connection_line["error"]) == ("would_deny", "")


def test_http_connections_log_per_request_and_one_without_requests_once() -> None:
    out = Lines(LogFormat.TEXT)
    index = guide_step("linkerd-3-httproute.yaml")
    destination = Destination(EXTERNAL, 80)
    facts = ConnectionFacts(destination, Detected.HTTP1, "httpbin.org")
    connection = FlowRecord(client=CLIENT, destination=destination, detected=Detected.HTTP1,
                            hostname="httpbin.org", sniff_outcome="http1",
                            decision=index.decide_connection(facts), requests=1)  # fmt: skip
    out.access_log.request_finished(http_request(index, "/get", 200))
    out.access_log.connection_closed(connection)
    assert len(out.lines()) == 1, "the request's line only"
    broken = FlowRecord(client=CLIENT, destination=destination, detected=Detected.H2,
                        sniff_outcome="h2", decision=connection.decision,
                        error="bad_request")  # fmt: skip
    out.access_log.connection_closed(broken)
    _, fields = text_fields(out.lines()[1])
    assert (fields["protocol"], fields["error"]) == ("h2", "bad_request")


def test_connection_refused_before_a_decision() -> None:
    out = Lines(LogFormat.TEXT)
    out.access_log.connection_closed(FlowRecord(client=CLIENT, error="loop"))
    _, fields = text_fields(out.lines()[0])
    assert (fields["destination"], fields["decision"], fields["route"], fields["error"]) == (
        "-",
        "-",
        "-",
        "loop",
    )


def test_text_values_with_spaces_are_quoted() -> None:
    out = Lines(LogFormat.TEXT)
    index = guide_step("linkerd-1-allow.yaml")
    record = http_request(index, "/a b=c", 200)
    out.access_log.request_finished(record)
    _, fields = text_fields(out.lines()[0])
    assert fields["path"] == "/a b=c"


def test_a_dash_is_quoted_where_a_bare_one_means_empty() -> None:
    """`- /allow` and `Host: -` reach the proxy as a method and a hostname of "-": written
    bare, they read as no method and no hostname."""
    out = Lines(LogFormat.TEXT)
    index = guide_step("linkerd-1-allow.yaml")
    record = dataclasses.replace(http_request(index, "/get", 200), method="-", hostname="-")
    out.access_log.request_finished(record)
    out.access_log.request_finished(dataclasses.replace(record, method="", hostname=None))
    quoted, bare = out.lines()
    assert ' hostname="-" ' in quoted and ' method="-" ' in quoted, quoted
    assert " hostname=- " in bare and " method=- " in bare, bare


def test_ipv6_destination() -> None:
    out = Lines(LogFormat.JSON)
    destination = Destination(ipaddress.ip_address("2001:db8::5"), 443)
    out.access_log.connection_closed(
        FlowRecord(client="[2001:db8::2]:5000", destination=destination, error="reset")
    )
    assert json.loads(out.lines()[0])["destination"] == "[2001:db8::5]:443"


STRINGS = st.text(max_size=12)
COUNTS = st.integers(min_value=0, max_value=2**40)
DESTINATIONS = st.sampled_from(
    [
        (Destination(EXTERNAL, 80), "203.0.113.5:80"),
        (Destination(ipaddress.ip_address("2001:db8::5"), 443), "[2001:db8::5]:443"),
    ]
)


def route_decision(path: str) -> Decision:
    facts = RequestFacts(Destination(EXTERNAL, 80), "httpbin.org", "GET", path, "", (), False)
    return guide_step("linkerd-3-httproute.yaml").decide_request(facts)


def tls_decision(sni: str) -> Decision:
    facts = ConnectionFacts(Destination(EXTERNAL, 443), Detected.TLS, sni)
    return guide_step("linkerd-4-tlsroute.yaml").decide_connection(facts)


REQUEST_DECISIONS = st.sampled_from(
    [
        (route_decision("/get"), "HTTPRoute/egress-test/httpbin-get", "allow"),
        (route_decision("/post"), "default/http-egress-deny", "deny"),
    ]
)
CONNECTION_DECISIONS = st.sampled_from(
    [
        (tls_decision("httpbin.org"), "TLSRoute/egress-test/tls-egress", "allow"),
        (tls_decision("github.com"), "default/tls-egress-deny", "deny"),
    ]
)


def read_back(out: Lines, log_format: LogFormat) -> dict[str, object]:
    """The last line's fields without time and duration (both checked for form)."""
    line = out.lines()[-1]
    if log_format is LogFormat.JSON:
        document: dict[str, object] = json.loads(line)
        assert list(document)[:2] == ["time", "log"]
        assert document.pop("log") == "access"
        assert_rfc3339(str(document.pop("time")))
    else:
        time_text, fields = text_fields(line)
        assert_rfc3339(time_text)
        document = dict(fields)
    assert float(str(document.pop("duration"))) >= 0
    return document


def as_written(fields: dict[str, object], log_format: LogFormat) -> dict[str, object]:
    """Fields as the format promises them: text makes every value a string and "" a dash."""
    if log_format is LogFormat.JSON:
        return fields
    return {
        key: ("true" if value else "false") if isinstance(value, bool) else str(value) or "-"
        for key, value in fields.items()
    }


@settings(max_examples=200, deadline=None)
@given(
    log_format=st.sampled_from(LogFormat),
    client=STRINGS,
    hostname=st.none() | STRINGS,
    method=STRINGS,
    path=STRINGS,
    error=STRINGS,
    status=st.none() | st.integers(min_value=0, max_value=599),
    grpc=st.booleans(),
    grpc_content_type=st.booleans(),
    decided=REQUEST_DECISIONS,
    destination=DESTINATIONS,
    sent=COUNTS,
    received=COUNTS,
)
def test_any_request_line_reads_back(
    log_format: LogFormat,
    client: str,
    hostname: str | None,
    method: str,
    path: str,
    error: str,
    status: int | None,
    grpc: bool,
    grpc_content_type: bool,
    decided: tuple[Decision, str, str],
    destination: tuple[Destination, str],
    sent: int,
    received: int,
) -> None:
    """Whatever text a request brings (quotes, blanks, =, control characters) reads back.
    A request in the gRPC route family is logged as grpc, as the metrics count it,
    whatever its content-type."""
    out = Lines(log_format)
    decision = decided[0]
    if grpc:
        decision = dataclasses.replace(decision, protocol=RouteProtocol.GRPC)
    out.access_log.request_finished(
        RequestRecord(client=client, destination=destination[0], protocol="h2",
                      hostname=hostname, method=method, path=path, grpc=grpc_content_type,
                      decision=decision, status=None if grpc else status,
                      grpc_status=status if grpc else None, error=error,
                      bytes_from_client=sent, bytes_from_upstream=received)
    )  # fmt: skip
    assert read_back(out, log_format) == as_written(
        {
            "client": client,
            "destination": destination[1],
            "protocol": "grpc" if grpc else "h2",
            "hostname": hostname or "",
            "route": decided[1],
            "decision": decided[2],
            "method": method,
            "path": path,
            "status": "" if status is None else str(status),
            "error": error,
            "bytes_sent": sent,
            "bytes_received": received,
        },
        log_format,
    )


@settings(max_examples=200, deadline=None)
@given(
    log_format=st.sampled_from(LogFormat),
    client=STRINGS,
    hostname=st.none() | STRINGS,
    error=STRINGS,
    status=st.none() | st.sampled_from([403, 421, 502, 504]),
    ech=st.booleans(),
    detected=st.none() | st.sampled_from(Detected),
    decided=st.none() | CONNECTION_DECISIONS,
    destination=st.none() | DESTINATIONS,
    sent=COUNTS,
    received=COUNTS,
)
def test_any_connection_line_reads_back(
    log_format: LogFormat,
    client: str,
    hostname: str | None,
    error: str,
    status: int | None,
    ech: bool,
    detected: Detected | None,
    decided: tuple[Decision, str, str] | None,
    destination: tuple[Destination, str] | None,
    sent: int,
    received: int,
) -> None:
    """The same for connections, with the fields a connection may not have yet, and the
    status of the proxy's own answer to an HTTP/1 client of one decided whole."""
    out = Lines(log_format)
    out.access_log.connection_closed(
        FlowRecord(client=client, destination=destination and destination[0],
                   detected=detected, hostname=hostname, ech=ech,
                   decision=decided and decided[0], error=error, status=status,
                   bytes_from_client=sent, bytes_from_upstream=received)
    )  # fmt: skip
    assert read_back(out, log_format) == as_written(
        {
            "client": client,
            "destination": destination[1] if destination else "",
            "protocol": detected.value if detected else "",
            "hostname": hostname or "",
            "ech": ech,
            "route": decided[1] if decided else "",
            "decision": decided[2] if decided else "",
            "status": "" if status is None else str(status),
            "error": error,
            "bytes_sent": sent,
            "bytes_received": received,
        },
        log_format,
    )


@pytest.mark.parametrize("stale", ["destination", "decision"])
def test_a_remembered_text_is_never_another_objects(stale: str) -> None:
    """Texts are remembered by object ids; an id reused by a new object must not reuse them."""
    formatter = LineFormatter(LogFormat.TEXT)
    denied = route_decision("/post")
    here = Destination(EXTERNAL, 80)
    remembered = (
        (Destination(EXTERNAL, 81), denied)
        if stale == "destination"
        else (here, route_decision("/get"))
    )
    key = (id(here), id(denied), "http1", "httpbin.org", None)
    formatter.decided[key] = (*remembered, "destination=203.0.113.5:81 route=stale")
    head_key = (CLIENT, id(here), id(denied), "http1", "httpbin.org", "GET")
    formatter.request_heads[head_key] = (*remembered, "client=x destination=203.0.113.5:81")
    record = RequestRecord(client=CLIENT, destination=here, protocol="http1",
                           hostname="httpbin.org", method="GET", path="/post", grpc=False,
                           decision=denied, status=403)  # fmt: skip
    line = formatter.access_line(record, time.time(), 0.5)
    _, fields = text_fields(line)
    assert (fields["route"], fields["decision"], fields["destination"]) == (
        "default/http-egress-deny",
        "deny",
        "203.0.113.5:80",
    )


SHARED_DECISIONS = {
    "/get": route_decision("/get"),
    "/post": route_decision("/post"),
    **{sni: tls_decision(sni) for sni in ("httpbin.org", "github.com", "")},
}
"""Decided once, so that lines share decisions as the policy's lines do."""


@settings(max_examples=100, deadline=None)
@given(
    log_format=st.sampled_from(LogFormat),
    lines=st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(["httpbin.org", "github.com", ""]),
            st.sampled_from(["http1", "h2"]),
            st.booleans(),
            DESTINATIONS,
            st.sampled_from(["/get", "/post"]),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_lines_sharing_remembered_texts_read_back(
    log_format: LogFormat,
    lines: list[tuple[bool, str, str, bool, tuple[Destination, str], str]],
) -> None:
    """Lines of one formatter that share destinations, decisions and hostnames each still
    say their own: a remembered text is never another line's."""
    out = Lines(log_format)
    for number, (request, hostname, protocol, ech, destination, path) in enumerate(lines):
        decision = SHARED_DECISIONS[path if request else hostname]
        if request:
            out.access_log.request_finished(
                RequestRecord(client=CLIENT, destination=destination[0], protocol=protocol,
                              hostname=hostname or None, method="GET", path=path, grpc=False,
                              decision=decision, status=200 + number)
            )  # fmt: skip
            expected: dict[str, object] = {
                "protocol": protocol,
                "method": "GET",
                "path": path,
                "status": str(200 + number),
            }
        else:
            out.access_log.connection_closed(
                FlowRecord(client=CLIENT, destination=destination[0], detected=Detected.TLS,
                           hostname=hostname or None, ech=ech, decision=decision)
            )  # fmt: skip
            expected = {"protocol": "tls", "ech": ech, "status": ""}
        expected |= {
            "client": CLIENT,
            "destination": destination[1],
            "hostname": hostname,
            "route": route_text(decision),
            "decision": decision_word(decision),
            "error": "",
            "bytes_sent": 0,
            "bytes_received": 0,
        }
        fields = read_back(out, log_format)
        assert fields == as_written(expected, log_format)
        assert list(fields) == [
            key for key in (REQUEST_KEYS if request else CONNECTION_KEYS) if key != "duration"
        ]


@settings(max_examples=300, deadline=None)
@given(created=st.floats(min_value=0, max_value=4e9) | st.just(1_700_000_000.9999996))
def test_timestamp_is_datetimes_to_the_millisecond(created: float) -> None:
    """The second's text is kept between lines; the time still reads as datetime reads it."""
    formatter = LineFormatter(LogFormat.TEXT)
    for moment in (max(created - later, 0) for later in (1, 0.0004, 0, 0)):
        expected = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
        assert formatter.timestamp(moment) == expected.replace("+00:00", "Z"), moment


# --- the process's log output -------------------------------------------------------------


class BlockingStream(io.StringIO):
    """A stderr whose writes wait until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if not self.release.wait(BLOCKED_WRITER_TIMEOUT):
            raise TimeoutError("the test never released the stream")
        return super().write(text)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    shutdown_logging()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_logging_never_waits_for_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = BlockingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(Settings(log_format=LogFormat.JSON, log_level="info"))
    started = time.monotonic()
    logging.getLogger("egressproxy.test").warning("first %s", "line")
    AccessLog().connection_closed(FlowRecord(client=CLIENT, error="loop"))
    logging.getLogger("egressproxy.test").debug("below the level")
    assert time.monotonic() - started < 1.0
    assert stream.getvalue() == ""
    stream.release.set()
    shutdown_logging()
    first, access = (json.loads(line) for line in stream.getvalue().splitlines())
    assert_rfc3339(first.pop("time"))
    assert first == {
        "level": "warning",
        "logger": "egressproxy.test",
        "message": "first line",
    }
    assert (access["log"], access["error"], access["client"]) == ("access", "loop", CLIENT)


@pytest.mark.usefixtures("restore_logging")
def test_text_log_line_with_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(Settings(log_format=LogFormat.TEXT, log_level="warning"))
    AccessLog().connection_closed(FlowRecord(client=CLIENT, error="loop"))
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("egressproxy.test").exception("failed")
    shutdown_logging()
    first, *traceback = stream.getvalue().splitlines()
    time_text, level, name, message = first.split(" ", 3)
    assert_rfc3339(time_text)
    assert (level, name, message) == ("ERROR", "egressproxy.test", "failed")
    assert traceback[-1] == "ValueError: broken"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    "quoted",
    ["v\n2026-01-01T00:00:00.000Z access client=6.6.6.6:1", "a\x00b\x1b[2J\rc\x85", "plain"],
)
def test_a_diagnostic_quoting_a_peers_bytes_stays_one_printable_line(
    monkeypatch: pytest.MonkeyPatch, quoted: str
) -> None:
    """h2's error for a header value with a newline in it quotes the value: logged as it
    came, the rest began a line of its own (one that could pass for an access line), and
    NUL, ESC or CR went to stderr raw. Unprintable characters are escaped in text (JSON
    escapes them already); a traceback still follows on lines of its own."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(Settings(log_format=LogFormat.TEXT, log_level="info"))
    logging.getLogger("egressproxy.http2").info("bad h2 request: %s", quoted)
    try:
        raise ValueError(quoted)
    except ValueError:
        logging.getLogger("egressproxy.http2").exception("failed on %s", quoted)
    shutdown_logging()
    first, second, *traceback = stream.getvalue().splitlines()
    escaped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in quoted)
    assert first.endswith(f" INFO egressproxy.http2 bad h2 request: {escaped}"), first
    assert second.endswith(f" ERROR egressproxy.http2 failed on {escaped}"), second
    assert traceback[0] == "Traceback (most recent call last):"
    assert first.isprintable() and second.isprintable()


@pytest.mark.usefixtures("restore_logging")
def test_debug_logging_writes_no_header_hpack_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """At --log-level debug, hpack logged every header it decoded, an h2 client's
    Authorization among them; the proxy's own debug lines still come."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(Settings(log_format=LogFormat.TEXT, log_level="debug"))
    encoded = hpack.Encoder().encode([(b"authorization", b"Bearer SECRET")])
    assert hpack.Decoder().decode(encoded) == [("authorization", "Bearer SECRET")]
    logging.getLogger("egressproxy.http2").debug("a debug line")
    shutdown_logging()
    assert "a debug line" in stream.getvalue()
    assert "SECRET" not in stream.getvalue()


def read_all(descriptor: int, into: list[bytes]) -> None:
    while chunk := os.read(descriptor, 1 << 16):
        into.append(chunk)


@pytest.mark.usefixtures("restore_logging")
def test_lines_a_stderr_nobody_reads_waits_for_are_bounded_and_the_dropped_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipe nobody reads: memory stays bounded, and every line is written or counted."""
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(Settings(log_format=LogFormat.TEXT, log_level="info"))
    writer = accesslog._writer
    assert writer is not None
    lines = MAX_PENDING_LINES + 20_000
    access_log = AccessLog()
    for _ in range(lines):
        access_log.connection_closed(FlowRecord(client=CLIENT, error="loop"))
        assert writer.queue.qsize() <= MAX_PENDING_LINES
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(read_end, chunks))
    reader.start()
    shutdown_logging()
    stream.close()
    reader.join(BLOCKED_WRITER_TIMEOUT)
    os.close(read_end)
    written = b"".join(chunks).decode().splitlines()
    access = [line for line in written if " access " in line]
    reports = [line for line in written if " access " not in line]
    assert len(reports) == 1, reports
    report = re.fullmatch(
        r"\S+ WARNING egressproxy\.log (\d+) log lines were dropped: "
        rf"{MAX_PENDING_LINES} were already waiting for stderr",
        reports[0],
    )
    assert report is not None, reports[0]
    dropped = int(report.group(1))
    assert dropped > 0
    assert len(access) + dropped == lines


EXIT_WITH_STDERR_UNREAD = """
from egressproxy.accesslog import AccessLog, setup_logging, shutdown_logging
from egressproxy.records import FlowRecord
from egressproxy.settings import Settings
setup_logging(Settings(log_level="info"))
for _ in range(50_000):
    AccessLog().connection_closed(FlowRecord(client="198.18.0.2:40000", error="loop"))
shutdown_logging()
print("stopped", flush=True)
"""


def test_a_stderr_nobody_reads_keeps_no_process_from_exiting() -> None:
    read_end, write_end = os.pipe()
    package_root = Path(accesslog.__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", EXIT_WITH_STDERR_UNREAD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=write_end,
        env={"PYTHONPATH": str(package_root), "PATH": os.environ.get("PATH", "")},
    )
    os.close(write_end)
    try:
        output, _ = process.communicate(timeout=STOP_PATIENCE + 20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        chunks: list[bytes] = []
        read_all(read_end, chunks)
        os.close(read_end)
    assert b"Fatal Python error" not in b"".join(chunks)
    assert (process.returncode, output) == (0, b"stopped\n")


def writer_to(write_end: int) -> LineWriter:
    stream = os.fdopen(write_end, "w", closefd=False)
    writer = LineWriter(stream, LineFormatter(LogFormat.JSON))
    writer.start()
    return writer


def logged_lines(writer: LineWriter, count: int) -> None:
    for number in range(count):
        writer.put(
            logging.LogRecord("egressproxy.test", logging.WARNING, __file__, 0,
                              "line %d %s", (number, "x" * 200), None)
        )  # fmt: skip


def numbers_in(data: bytes) -> list[int]:
    return [int(json.loads(line)["message"].split()[1]) for line in data.decode().splitlines()]


def test_a_slow_reader_that_takes_bytes_all_along_gets_every_line_at_exit() -> None:
    """A batch (up to a megabyte) was one write, which a slow reader (journald under load)
    took for longer than the patience at exit: that counted as no progress, the writer
    was given up on, and the lines still queued were lost with a line cut in half."""
    read_end, write_end = os.pipe()
    writer = writer_to(write_end)
    chunks: list[bytes] = []

    def read_slowly() -> None:
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
            time.sleep(0.005)  # about 800 KB/s

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        logged_lines(writer, 3000)  # about 900 KB: a second for the reader
        writer.stop(patience=0.25)
    finally:
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert numbers_in(b"".join(chunks)) == list(range(3000))


def test_a_non_blocking_stderr_that_fills_is_waited_for_not_dropped() -> None:
    """Another process sharing stderr's open file can make it non-blocking: a full pipe
    raised EAGAIN, which the writer took for a broken stderr, dropping the rest of the
    batch without counting it and cutting a line in two."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    writer = writer_to(write_end)
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(read_end, chunks))
    try:
        logged_lines(writer, 2000)  # about 600 KB: the pipe holds 64 KiB
        time.sleep(0.3)
        reader.start()
        writer.stop(patience=10)
    finally:
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert numbers_in(b"".join(chunks)) == list(range(2000))
    assert writer.dropped == 0


def test_workers_sharing_a_pipe_write_whole_lines_at_most_pipe_buf_at_once() -> None:
    """With --workers N every worker writes to one stderr. A write to a pipe or a stream
    socket is atomic only up to PIPE_BUF: a batch of lines written at once had another
    worker's lines land in the middle of its own (broken JSON lines for a log parser).
    A socket that keeps each write a message of its own shows where each one ends."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(10)
    stream = os.fdopen(ours.fileno(), "w", closefd=False)
    writer = LineWriter(stream, LineFormatter(LogFormat.JSON), shared=True)
    messages: list[bytes] = []

    def read_out() -> None:
        while message := theirs.recv(1 << 20):
            messages.append(message)

    reader = threading.Thread(target=read_out)
    reader.start()
    writer.start()
    try:
        for number in range(3000):
            writer.put(
                logging.LogRecord("egressproxy.test", logging.WARNING, __file__, 0,
                                  "line %d %s", (number, "x" * (number % 300)), None)
            )  # fmt: skip
        writer.stop(patience=10)
    finally:
        ours.shutdown(socket.SHUT_WR)
        reader.join(10)
        ours.close()
        theirs.close()
    assert all(len(message) <= select.PIPE_BUF for message in messages)
    assert all(message.endswith(b"\n") for message in messages)
    lines = b"".join(messages).decode().splitlines()
    assert [json.loads(line)["message"].split()[1] for line in lines] == [
        str(number) for number in range(3000)
    ]


def test_a_line_longer_than_pipe_buf_is_written_alone_and_whole() -> None:
    long_line = b"x" * (select.PIPE_BUF + 10) + b"\n"
    data = b"a\n" + long_line + b"b\n" * 3000
    chunks = accesslog._line_chunks(data, select.PIPE_BUF)
    assert b"".join(chunks) == data
    assert chunks[:2] == [b"a\n", long_line]
    assert all(len(chunk) <= select.PIPE_BUF and chunk.endswith(b"\n") for chunk in chunks[2:])


LONG_LINES_WORKER = """
import logging, os, sys
from egressproxy.accesslog import LineFormatter, LineWriter
from egressproxy.settings import LogFormat
worker, lock_path = sys.argv[1], sys.argv[2]
writer = LineWriter(os.fdopen(2, "w", closefd=False), LineFormatter(LogFormat.JSON), shared=True)
writer.write_lock = (lock_path, 0, -1)
writer.start()
for number in range(60):
    length = 6000 if number % 2 else 100  # longer than PIPE_BUF, and short ones between
    message = "%s %d " + worker * length
    writer.put(logging.LogRecord("egressproxy.test", logging.WARNING, "", 0, message,
                                 (worker, number), None))
writer.stop(patience=20)
"""


def test_workers_lines_longer_than_pipe_buf_are_never_cut_by_another_workers(
    tmp_path: Path,
) -> None:
    """A line longer than PIPE_BUF goes to a pipe in pieces when the pipe fills: another
    worker's lines landed between them (two broken lines for a log parser). The workers of
    a run take turns at stderr, each holding the run's lock file while it writes."""
    read_end, write_end = os.pipe()
    package_root = Path(accesslog.__file__).resolve().parents[1]
    environment = {"PYTHONPATH": str(package_root), "PATH": os.environ.get("PATH", "")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", LONG_LINES_WORKER, worker, str(tmp_path / "stderr.lock")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=environment,
        )
        for worker in "ab"
    ]
    os.close(write_end)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(read_end, 1024):  # slowly, so that the pipe fills
            chunks.append(chunk)
            time.sleep(0.0005)
    finally:
        for worker in workers:
            worker.wait(30)
        os.close(read_end)
    lines = b"".join(chunks).decode().splitlines()
    messages = [json.loads(line)["message"] for line in lines]
    for worker in "ab":
        own = [message for message in messages if message.startswith(worker)]
        assert own == [
            f"{worker} {number} " + worker * (6000 if number % 2 else 100) for number in range(60)
        ]
    assert [worker.returncode for worker in workers] == [0, 0]


FILE_WORKER = """
import logging, os, sys, time
from egressproxy.accesslog import LineFormatter, LineWriter
from egressproxy.settings import LogFormat
worker, start = sys.argv[1], float(sys.argv[2])
writer = LineWriter(os.fdopen(2, "w", closefd=False), LineFormatter(LogFormat.JSON), shared=True)
time.sleep(max(0.0, start - time.time()))  # the workers write at the same time
writer.start()
for number in range(LINES):
    deadline = time.monotonic() + 20
    while number % 4000 == 0 and writer.queue.qsize() > 4000 and time.monotonic() < deadline:
        time.sleep(0.001)  # none dropped: fewer than MAX_PENDING_LINES wait
    writer.put(logging.LogRecord("egressproxy.test", logging.WARNING, "", 0,
                                 "%s %d " + worker * 500, (worker, number), None))
writer.stop(patience=20)
"""


def test_workers_sharing_a_regular_file_write_whole_lines(tmp_path: Path) -> None:
    """`2>>proxy.log`, or systemd's StandardError=append:. A batch of lines went to a file
    in 64 KiB slices cut anywhere, and another worker's slices landed between them: lines
    torn in two, broken JSON for a log parser. Now each write is whole lines."""
    package_root = Path(accesslog.__file__).resolve().parents[1]
    environment = {"PYTHONPATH": str(package_root), "PATH": os.environ.get("PATH", "")}
    log_path = tmp_path / "proxy.log"
    start = str(time.time() + 1.0)
    with log_path.open("ab") as log_file:
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", FILE_WORKER.replace("LINES", "24000"), worker, start],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=environment,
            )
            for worker in "abc"
        ]
        for worker in workers:
            worker.wait(60)
    assert [worker.returncode for worker in workers] == [0, 0, 0]
    messages = [json.loads(line)["message"] for line in log_path.read_text().splitlines()]
    for worker in "abc":
        own = [message for message in messages if message.startswith(worker)]
        assert own == [f"{worker} {number} " + worker * 500 for number in range(24000)]


TURN_WORKER = """
import logging, os, sys, time
from egressproxy.accesslog import STOP_PATIENCE, LineFormatter, LineWriter
from egressproxy.settings import LogFormat
worker, lock_path, count, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
writer = LineWriter(os.fdopen(2, "w", closefd=False), LineFormatter(LogFormat.JSON), shared=True)
writer.write_lock = (lock_path, 0, -1)
time.sleep(wait)
for number in range(count):
    writer.put(logging.LogRecord("egressproxy.test", logging.WARNING, "", 0,
                                 "%s %d " + "x" * 2000, (worker, number), None))
writer.start()
time.sleep(0.1)
writer.stop(STOP_PATIENCE)
"""


def test_a_worker_waiting_its_turn_at_a_slow_stderr_is_not_given_up_on(tmp_path: Path) -> None:
    """One worker writes 900 KB to a stderr read at 256 KiB/s, holding the run's write lock;
    another stops meanwhile with a few lines: waiting for its turn made no progress of its
    own, so its writer was given up on after STOP_PATIENCE and its lines lost."""
    read_end, write_end = os.pipe()
    package_root = Path(accesslog.__file__).resolve().parents[1]
    environment = {"PYTHONPATH": str(package_root), "PATH": os.environ.get("PATH", "")}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TURN_WORKER,
                worker,
                str(tmp_path / "stderr.lock"),
                str(count),
                str(wait),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=environment,
        )
        for worker, count, wait in (("a", 450, 0.0), ("b", 5, 0.5))
    ]
    os.close(write_end)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
            time.sleep(4096 / (256 * 1024))
    finally:
        for worker in workers:
            worker.wait(30)
        os.close(read_end)
    messages = [json.loads(line)["message"] for line in b"".join(chunks).decode().splitlines()]
    assert [message.split()[1] for message in messages if message.startswith("b")] == [
        str(number) for number in range(5)
    ]
    assert sum(message.startswith("a") for message in messages) == 450


def test_lines_go_out_when_the_write_lock_cannot_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock the kernel will not give (ENOLCK: lock records used up, lockd gone on NFS)
    lost the whole batch, uncounted: the lines go out unlocked instead."""

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(accesslog.fcntl, "flock", no_locks)
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", closefd=False)
    writer = LineWriter(stream, LineFormatter(LogFormat.JSON), shared=True)
    writer.write_lock = (str(tmp_path / "stderr.lock"), 0, -1)
    writer.start()
    logged_lines(writer, 3)
    writer.stop(patience=5)
    os.close(write_end)
    chunks: list[bytes] = []
    read_all(read_end, chunks)
    os.close(read_end)
    assert numbers_in(b"".join(chunks)) == [0, 1, 2]
