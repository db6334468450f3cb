"""The sniff deadlines that start at the first byte (timeouts.TimeoutQueue in the flow):
a request head still incomplete gets 408 at --header-timeout, other bytes still
incomplete at the sniff-complete timeout go through as opaque TCP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from egressproxy import flow as flow_module
from egressproxy.sniff import SNIFF_BUFFER_LIMIT, detect
from tests.unit.http_harness import (
    ALLOW_ALL,
    Recording,
    echo,
    local,
    loopback_proxy,
    origin,
    proxy_to_origin,
)
from tests.unit.test_sniff_detect import IRREGULAR_REQUEST_LINES
from tests.unit.test_sniff_tls import client_hello, extension, frame, load, sni_extension, u16

T = TypeVar("T")
PARTIAL_TLS_RECORD = b"\x16\x03\x01\x02\x00\x01"
"""The start of a ClientHello record announcing 512 bytes that never come."""


@pytest.mark.asyncio
async def test_a_first_request_head_incomplete_at_the_header_timeout_gets_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_to_origin(echo, tmp_path, monkeypatch, ALLOW_ALL, header_timeout=0.4) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        started = time.monotonic()
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\nX-Slow: 1")
        async with asyncio.timeout(5):
            answer = await reader.read()
        waited = time.monotonic() - started
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.35 <= waited < 3
    assert proxy.ledger.flows[0].sniff_outcome == "header_timeout"
    (timed_out,) = proxy.ledger.requests
    assert (timed_out.status, timed_out.error) == (408, "header_timeout")
    assert abs(timed_out.started - started) < 0.1, "its duration counts from the head's start"


@pytest.mark.asyncio
async def test_a_request_head_the_client_ends_early_is_refused_not_relayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head cut short by EOF (no blank line yet) gets 400; as opaque bytes it would pass
    the HTTP rules, and some servers (Python's http.server) act on a head ending at EOF."""
    origin = Recording()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /admin HTTP/1.1\r\nHost: example.test\r\n")
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        await proxy.wait_closed_flows(1)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert origin.received == b""
    assert proxy.ledger.flows[0].sniff_outcome == "eof_in_head"


async def daytime(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that speaks first (daytime, a banner) and then waits for the client's end."""
    writer.write(DAYTIME)
    await writer.drain()
    await reader.read()
    writer.close()


DAYTIME = b"Tue Jan  1 00:00:00 2030\r\n"


@pytest.mark.asyncio
async def test_a_client_that_ends_before_its_first_byte_is_relayed_opaque(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nc -N host 13 < /dev/null`: no byte is no head; it was taken for HTTP cut short,
    and the client got nothing of the server's answer."""
    async with proxy_to_origin(daytime, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer == DAYTIME
    assert proxy.ledger.flows[0].sniff_outcome == "eof"


OSM_TCP_EGRESS = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{name: osm-mesh-config, namespace: osm-system}}
spec:
  traffic: {{enableEgress: false}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: banner, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  ipAddresses: [127.0.0.0/8]
  ports: [{{number: {port}, protocol: {protocol}}}]
"""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("protocol", "outcome"), [("tcp-server-first", "opaque_port"), ("tcp", "timeout")]
)
async def test_an_osm_tcp_server_first_port_is_not_sniffed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str, outcome: str
) -> None:
    """OSM turns Envoy's TLS and HTTP inspectors off on a tcp-server-first port: the
    server speaks first at once. It was sniffed like tcp, so the banner waited for the
    sniff timeout."""
    async with origin(daytime) as port:
        policy = OSM_TCP_EGRESS.format(port=port, protocol=protocol)
        settings = {"sniff_timeout": 0.5}
        async with loopback_proxy(tmp_path, monkeypatch, policy, local(port), **settings) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            started = time.monotonic()
            async with asyncio.timeout(5):
                banner = await reader.readexactly(len(DAYTIME))
            waited = time.monotonic() - started
            writer.close()
            await proxy.wait_closed_flows(1)
    assert banner == DAYTIME
    (flow,) = proxy.ledger.flows
    assert (flow.sniff_outcome, flow.error) == (outcome, "")
    assert (waited < 0.4) == (protocol == "tcp-server-first"), waited


@pytest.mark.asyncio
async def test_bytes_still_incomplete_at_the_sniff_complete_timeout_go_through_opaque(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTERFACE: a ClientHello still incomplete at its deadline is opaque TCP."""
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, sniff_complete_timeout=0.4
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        started = time.monotonic()
        writer.write(PARTIAL_TLS_RECORD)
        async with asyncio.timeout(5):
            echoed = await reader.readexactly(len(PARTIAL_TLS_RECORD))
        waited = time.monotonic() - started
        writer.close()
        await proxy.wait_closed_flows(1)
    assert echoed == PARTIAL_TLS_RECORD
    assert 0.35 <= waited < 3
    assert proxy.ledger.flows[0].sniff_outcome == "incomplete"


DENY_TRACKER = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - hosts: [tracker.example.net]
    action: deny
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("line", IRREGULAR_REQUEST_LINES)
async def test_an_irregular_head_does_not_slip_past_a_host_rule(
    line: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx serves most of these; spliced as opaque bytes, they reached it past the deny."""
    origin = Recording()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, DENY_TRACKER) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(line + b"\r\nHost: tracker.example.net\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await proxy.wait_closed_flows(1)
    assert head.split(b" ", 2)[1] in (b"400", b"403"), head
    assert origin.received == b""


@pytest.mark.asyncio
async def test_a_payload_shaped_like_a_line_without_a_version_is_relayed_opaque(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A letter, CR, `/`, visible bytes, LF: HTTP/0.9's shape but for its method, which only
    GET has; about one random 8 KiB payload in 100,000 begins so, and it was refused 400."""
    payload = b"A\r/\x8a%\xf0k~\n" + bytes(range(256)) * 32
    async with proxy_to_origin(echo, tmp_path, monkeypatch, DENY_TRACKER) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(payload)
        async with asyncio.timeout(5):
            echoed = await reader.readexactly(len(payload))
        writer.close()
        await proxy.wait_closed_flows(1)
    assert echoed == payload
    assert proxy.ledger.flows[0].sniff_outcome == "not_http"


def _name_list(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([kind]) + u16(len(name)) + name for kind, name in entries)
    return extension(0, u16(len(names)) + names)


UNREADABLE_HELLOS = {
    "one-byte-records": frame(load("curl_tls13.bin")[5:], [1] * 600),
    "over-16-KiB": frame(
        client_hello([extension(21, bytes(17_000)), sni_extension(b"tracker.example.net")]),
        [16_384],
    ),
    "sni-with-a-port": frame(client_hello([sni_extension(b"tracker.example.net:443")])),
    "unknown-name-type-first": frame(
        client_hello([_name_list((1, b"x"), (0, b"tracker.example.net"))])
    ),
}
"""Hellos OpenSSL (or Go's crypto/tls, which skips unknown name types) reads a name in:
one-byte records are legal (RFC 8446 5.1) and go past the records the sniffer walks."""


UNREADABLE_OUTCOMES = {
    "one-byte-records": "too_many_records",
    "over-16-KiB": "too_large",
    "sni-with-a-port": "bad_sni",
    "unknown-name-type-first": "malformed_sni",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(UNREADABLE_HELLOS))
async def test_a_hello_the_proxy_cannot_read_is_denied(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As TLS without a name it passed every host rule of an allowing policy: denied,
    whatever the policy says."""
    origin = Recording()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, DENY_TRACKER) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(UNREADABLE_HELLOS[name])
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
    (flow,) = proxy.ledger.flows
    assert (flow.sniff_outcome, flow.error) == (UNREADABLE_OUTCOMES[name], "forbidden"), flow
    assert origin.received == b""


TRACKER_HELLO = client_hello([sni_extension(b"tracker.example.net")])
EMPTY_RECORD = b"\x16\x03\x01\x00\x00"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data",
    [
        EMPTY_RECORD + frame(TRACKER_HELLO),
        frame(TRACKER_HELLO, [10])[:15] + EMPTY_RECORD + frame(TRACKER_HELLO, [10])[15:],
    ],
    ids=["before", "between-fragments"],
)
async def test_an_empty_record_does_not_hide_the_name(
    data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL skips empty handshake records and reads the name behind them; taken for
    TLS without a name, the hello passed the host rule."""
    origin = Recording()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, DENY_TRACKER) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(data)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
    (flow,) = proxy.ledger.flows
    assert (flow.hostname, flow.error) == ("tracker.example.net", "forbidden"), flow
    assert origin.received == b""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x05\x02abcd",
        b"\x16\x03\xff\x00\x00xyz",
        b"\x16\x03\x03\xff\xff" + bytes(9),
    ],
    ids=["not-a-client-hello", "empty-record", "record-too-long"],
)
async def test_bytes_that_only_begin_like_a_tls_record_still_pass(
    data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binary data may begin 16 03: what shows no ClientHello is not denied as a hidden one
    (the soak's random payloads met it)."""
    async with proxy_to_origin(echo, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(data)
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(data)) == data
        writer.close()
        await proxy.wait_closed_flows(1)
    assert proxy.ledger.flows[0].error in ("", "reset"), proxy.ledger.flows[0]


@pytest.mark.asyncio
async def test_a_hello_that_comes_in_pieces_is_not_read_again_at_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read of a hello walks its records from the start: read again at every piece,
    254 tiny records then a long one, sent a byte at a time, took 1.4 s of the worker's
    loop for 16 KiB. A hello is read again only where a record or the hello could end."""
    sniffs: list[int] = []
    sniff = flow_module.sniff

    def counted(buffer: bytes, *args: Any) -> object:
        sniffs.append(len(buffer))
        return sniff(buffer, *args)

    monkeypatch.setattr(flow_module, "sniff", counted)
    monkeypatch.setattr(detect, "sniff", counted)  # the flow's Sniffer's, after the first read
    message = client_hello([sni_extension(b"example.com"), extension(21, bytes(15500))])
    records = frame(message, [1] * 254)[:SNIFF_BUFFER_LIMIT]
    tiny = records.index(b"\x16\x03\x01", 254 * 6)
    origin = Recording()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(records[:tiny])
        for start in range(tiny, len(records), 64):
            writer.write(records[start : start + 64])
            await writer.drain()
            await asyncio.sleep(0.001)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
    (flow,) = proxy.ledger.flows
    assert (flow.sniff_outcome, flow.error) == ("too_large", "forbidden"), flow
    assert origin.received == b""
    assert len(sniffs) <= 10, len(sniffs)


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that answers a request head 200, and closes."""
    with contextlib.suppress(asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    writer.close()


HEADS_IN_PIECES = {
    "short-header-lines": (
        b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"X: y\r\n" * 2600 + b"\r\n",
        ("http1", "a.test"),
    ),
    "irregular-line": (
        b"GET  /" + b"a" * 15000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ("bad_request_line", None),
    ),
    "text": (b"hello world " * 1300 + b"\n", ("not_http", None)),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(HEADS_IN_PIECES))
async def test_a_head_that_comes_in_pieces_is_not_read_whole_at_every_one(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sniffer read the whole buffer again at every read, and the lean head at every
    read with a line end: 16 KiB in 32-byte pieces cost about 4 MiB of parsing, a head sent
    a byte at a time 0.06 to 0.4 s of the worker's loop. A read is now read only as far as
    the answer could change with it: a few readings of the whole head in all."""
    handed: list[int] = []

    def counted(parse: Callable[..., T]) -> Callable[..., T]:
        def counting(buffer: bytes, *args: Any) -> T:
            handed.append(len(buffer))
            return parse(buffer, *args)

        return counting

    for module, name_of in ((flow_module, "sniff"), (flow_module, "lean_head")):
        monkeypatch.setattr(module, name_of, counted(getattr(module, name_of)))
    for name_of in ("sniff", "hold"):
        monkeypatch.setattr(detect, name_of, counted(getattr(detect, name_of)))
    flight, (outcome, hostname) = HEADS_IN_PIECES[name]
    async with proxy_to_origin(answer_ok, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for start in range(0, len(flight), 32):
            writer.write(flight[start : start + 32])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write_eof()
        async with asyncio.timeout(5):
            await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    (flow,) = proxy.ledger.flows
    assert (flow.sniff_outcome, flow.hostname) == (outcome, hostname), flow
    assert sum(handed) <= 8 * SNIFF_BUFFER_LIMIT, (sum(handed), len(handed))
