"""Http1Proxy on loopback: the real Flow, policy index and h11 handler between real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import http.client
import json
import logging
import re
import socket
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from egressproxy import http1_lean
from egressproxy.accesslog import AccessLog
from egressproxy.http1 import Http1Proxy, closing_head
from egressproxy.http1_lean import LeanRequest
from egressproxy.metrics import Metrics, exposition
from egressproxy.policy.decision import Decision, Detected
from egressproxy.policy.index import RequestDecider
from egressproxy.relay import WRITE_BUFFER_HIGH, abort_with_reset
from egressproxy.server import Reporting
from egressproxy.settings import LogFormat, VerifyDestination
from egressproxy.sniff.http import EMPTY_LINES_ALLOWED
from tests.e2e.http_servers import h1
from tests.unit.http_harness import (
    ALLOW_ALL,
    BLOCKED_HOST,
    LOOPBACK_NETWORK,
    OSM_HOST_CASES,
    OSM_HTTP_EGRESS,
    LoopbackProxy,
    Silent,
    closed_port,
    echo,
    local,
    loopback_proxy,
    names_never_resolve,
    origin,
    proxy_to_origin,
    request_statuses,
)
from tests.unit.test_accesslog import Lines, text_fields
from tests.unit.test_upstream_deadline import listener_that_never_answers
from tests.unit.test_verify import SystemResolver

POLICY = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: no-denied
    http:
    - pathPrefix: /denied
    action: deny
  - name: to-backend
    http:
    - pathPrefix: /routed
    action: route
    to: 127.0.0.1:{backend}
"""


@pytest_asyncio.fixture
async def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LoopbackProxy, int, int]]:
    async with origin(h1) as origin_port, origin(h1) as backend_port:
        destination = local(origin_port)
        async with loopback_proxy(
            tmp_path,
            monkeypatch,
            POLICY.format(backend=backend_port),
            destination,
            header_timeout=0.5,
        ) as proxy:
            yield proxy, origin_port, backend_port


async def read_response(
    reader: asyncio.StreamReader, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with Content-Length or chunked framing."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if head_only or status < 200 or status in (204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # a trailer field
                return status, headers, bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


def websocket_upgrade(path: str) -> bytes:
    """RFC 6455's sample handshake request (its accept key is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def document(body: bytes) -> Any:
    return json.loads(body)


@pytest.mark.asyncio
async def test_each_request_on_a_keep_alive_connection_is_decided_on_its_own(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for path, expected in [("/a", 200), ("/denied", 403), ("/b", 200), ("/denied/x", 403)]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
        status, _, body = await read_response(reader)
        assert status == expected, path
        if expected == 403:
            assert body == b"traffic not allowed\n"
        else:
            assert document(body)["target"] == path
    writer.close()
    await proxy.wait_closed_flows(1)
    statuses = [(record.path, record.status) for record in proxy.ledger.requests]
    assert statuses == [("/a", 200), ("/denied", 403), ("/b", 200), ("/denied/x", 403)]


GRPC_ONLY = (
    ALLOW_ALL
    + """\
  rules:
  - name: echo
    grpc:
    - service: test.Echo
      method: Echo
    action: allow
"""
)
"""A policy whose port is one of gRPC rules: every request on it is of the gRPC family."""

SWITCH_DENIED = POLICY.replace("pathPrefix: /denied", "pathPrefix: /switch")


async def reload_policy(proxy: LoopbackProxy, text: str) -> None:
    """Rewrite the proxy's policy file and put it in force, as a SIGHUP does."""
    Path(proxy.context.settings.policy_file).write_text(text)
    assert await proxy.context.policy.reload(force=True)


@pytest.mark.asyncio
async def test_a_reload_reaches_the_next_request_of_a_keep_alive_connection(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    """Linkerd routes each request by the routes it last heard of: a policy reloaded while
    a keep-alive connection is open decides its next requests, the same head sent again
    (served from what the connection remembers), one like it but for its query, and one
    h11 reads (absolute form), and a second reload back again."""
    proxy, _, backend_port = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    heads = [
        b"GET /switch HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET /switch?n=1 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET http://example.test/switch HTTP/1.1\r\nHost: example.test\r\n\r\n",
    ]
    policies = [
        POLICY.format(backend=backend_port),
        SWITCH_DENIED.format(backend=backend_port),
        POLICY.format(backend=backend_port),
    ]
    statuses = []
    for generation, text in enumerate(policies):
        if generation:
            await reload_policy(proxy, text)
        for head in [heads[0], *heads]:  # the first head twice: the second is remembered
            writer.write(head)
            statuses.append((await read_response(reader))[0])
    writer.close()
    await proxy.wait_closed_flows(1)
    assert statuses == [200] * 4 + [403] * 4 + [200] * 4
    assert [r.status for r in proxy.ledger.requests] == statuses
    assert len(proxy.ledger.flows) == 1


@pytest.mark.asyncio
async def test_open_connections_hold_no_policy_a_reload_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spliced connection and an idle keep-alive one, both open across a reload, let go
    of the policy they were decided by: a reload must not leave one large policy in
    memory for each long-lived connection."""
    async with (
        origin(h1) as http_port,
        proxy_to_origin(echo, tmp_path, monkeypatch, ALLOW_ALL) as proxy,
    ):
        replaced = weakref.ref(proxy.context.policy.current)
        spliced_reader, spliced_writer = await asyncio.open_connection(proxy.host, proxy.port)
        spliced_writer.write(b"\x00opaque")
        assert await spliced_reader.readexactly(7) == b"\x00opaque"
        proxy.destination[0] = local(http_port)
        http_reader, http_writer = await asyncio.open_connection(proxy.host, proxy.port)
        http_writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(http_reader))[0] == 200
        await reload_policy(proxy, ALLOW_ALL.replace("name: test", "name: reloaded"))
        gc.collect()
        held = replaced() is not None
        for writer in (spliced_writer, http_writer):
            writer.close()
        await proxy.wait_closed_flows(2)
    assert not held


@pytest.mark.asyncio
@pytest.mark.parametrize("reset", [False, True])
async def test_a_denied_upload_the_client_gives_up_is_counted_as_denied(
    setup: tuple[LoopbackProxy, int, int], reset: bool
) -> None:
    """curl and Go's net/http stop an upload once a final answer comes, and close: the
    403 went out whole, so the request is counted as a deny (no error) whether the client
    then closes or resets, as an upstream's early answer is, and as h2 counts it."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    head = b"POST /denied HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10000000\r\n\r\n"
    writer.write(head + b"x" * 65536)
    status, _, _ = await read_response(reader)
    if reset:
        abort_with_reset(writer.transport)
    else:
        writer.close()
    await proxy.wait_closed_flows(1)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(403, "")]
    assert (status, proxy.ledger.flows[0].error) == (403, "reset" if reset else "")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fields", "answer", "code"),
    [
        (f"x-big: {'a' * 5000}\r\nContent-Length: 0\r\n", 431, 8),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400, 13),
    ],
)
async def test_a_grpc_call_refused_for_its_head_over_http1_gets_the_code_of_that_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: str, answer: int, code: int
) -> None:
    """A call of the gRPC route family refused for its head is counted with the code a
    gRPC client gets for that cause (RESOURCE_EXHAUSTED for 431, INTERNAL for 400), as
    over h2 and as the proxy's other answers are; it was UNKNOWN, with no status logged."""
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, GRPC_ONLY, max_header_bytes=4096
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            (
                "POST /test.Echo/Echo HTTP/1.1\r\nHost: example.test\r\n"
                f"content-type: application/grpc\r\n{fields}\r\n0\r\n\r\n"
            ).encode()
        )
        status, _, _ = await read_response(reader)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert status == answer
    assert [(r.status, r.grpc_status) for r in proxy.ledger.requests] == [(answer, code)]


@pytest.mark.asyncio
async def test_a_path_some_servers_read_as_a_denied_one_is_denied(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    """Tomcat reads `/a/..;/denied` and `/denied;x` as /denied, IIS `/a\\..\\denied`:
    denied on a keep-alive connection as first requests (the lean path) and after h11's."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    paths = ["/a/..;/denied", "/denied;x", "/a\\..\\denied", "/a;v=1"]
    for chunked in (False, True):
        for path in paths:
            body = b"Transfer-Encoding: chunked\r\n\r\n0\r\n" if chunked else b""
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: example.test\r\n%s\r\n" % (path.encode(), body)
            )
            status, _, _ = await read_response(reader)
            assert status == (200 if path == "/a;v=1" else 403), (path, chunked)
    writer.close()
    await proxy.wait_closed_flows(1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "target",
    ["/denied#", "/denied#/../a", "/a/..#/denied", "denied", "*", "ftp://example.test/denied"],
)
@pytest.mark.parametrize("after_a_request", [False, True])
async def test_a_target_no_server_reads_as_the_policy_does_is_refused(
    setup: tuple[LoopbackProxy, int, int], target: str, after_a_request: bool
) -> None:
    """nginx ends a path at `#` (`/denied#` is /denied there), some servers take `denied`
    for `/denied`, and `*` is OPTIONS' alone: 400, first on a connection or after an
    allowed request, never a decision on a path the upstream reads otherwise."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    if after_a_request:
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    writer.write(f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
    status, _, _ = await read_response(reader)
    assert status == 400, target
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [record.status for record in proxy.ledger.requests][-1] == 400


@pytest.mark.asyncio
async def test_options_asterisk_is_still_a_request(setup: tuple[LoopbackProxy, int, int]) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status != 400
    writer.close()
    await proxy.wait_closed_flows(1)


@pytest.mark.asyncio
async def test_each_request_is_decided_on_its_own_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allowed first request does not carry a denied Host through on the same connection,
    in the Host header or in an absolute-form target; an absolute form whose host or port is
    not the Host's is refused, since the upstream may read either (and a policy may read
    the port)."""
    async with (
        origin(h1) as origin_port,
        loopback_proxy(tmp_path, monkeypatch, BLOCKED_HOST, local(origin_port)) as proxy,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        heads = [
            ("GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n", 200),
            ("GET /b HTTP/1.1\r\nHost: blocked.test\r\n\r\n", 403),
            ("GET /c HTTP/1.1\r\nHost: example.test\r\n\r\n", 200),
            ("GET http://www.blocked.test/d HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n", 403),
            ("GET /e HTTP/1.1\r\nHost: EXAMPLE.test.\r\n\r\n", 200),
            ("GET http://example.test:80/f HTTP/1.1\r\nHost: example.test\r\n\r\n", 200),
            ("GET http://www.blocked.test/g HTTP/1.1\r\nHost: example.test\r\n\r\n", 400),
        ]
        for head, expected in heads:
            writer.write(head.encode())
            status, _, _ = await read_response(reader)
            assert status == expected, head
        writer.close()
        for other_port in [
            "GET http://example.test:81/h HTTP/1.1\r\nHost: example.test\r\n\r\n",
            "GET http://example.test/i HTTP/1.1\r\nHost: example.test:1\r\n\r\n",
        ]:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(other_port.encode())
            assert (await read_response(reader))[0] == 400, other_port
            writer.close()
        await proxy.wait_closed_flows(3)
    decided = [(record.hostname, record.status) for record in proxy.ledger.requests]
    assert decided == [
        ("example.test", 200),
        ("blocked.test", 403),
        ("example.test", 200),
        ("www.blocked.test", 403),
        ("example.test", 200),
        ("example.test", 200),
        ("www.blocked.test", 400),
        ("example.test", 400),
        ("example.test", 400),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("split", [False, True], ids=["whole", "line-first"])
async def test_a_method_of_any_length_is_http_decided_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    """A method is any token (h11, Go and nginx take a long one): a first request with a
    200-byte method is HTTP, not opaque bytes spliced past the host rules, and it and the
    request after it are each decided; nothing for blocked.test reaches the origin."""
    seen = bytearray()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.extend(await reader.read(65536))
        writer.close()

    async with (
        origin(recording) as origin_port,
        loopback_proxy(tmp_path, monkeypatch, BLOCKED_HOST, local(origin_port)) as proxy,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        line = b"X" * 200 + b" / HTTP/1.1\r\n"
        rest = b"Host: blocked.test\r\nContent-Length: 1\r\n\r\nx"
        if split:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write((b"" if split else line) + rest)
        writer.write(b"GET /admin HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        assert (await read_response(reader))[0] == 403
        assert (await read_response(reader))[0] == 403
        writer.close()
        await proxy.wait_closed_flows(1)
    assert seen == b""
    (flow,) = proxy.ledger.flows
    assert flow.detected is Detected.HTTP1
    assert [(record.method, record.status) for record in proxy.ledger.requests] == [
        ("X" * 200, 403),
        ("GET", 403),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("first", ["example.test", "blocked.test:"])
async def test_a_host_with_an_empty_or_malformed_port_gets_no_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """`blocked.test:` is blocked.test (an empty port is no port), on the connection's
    first request as on later ones; a Host that is not host[:port] is refused, since no
    rule could match it and it would get the default allow."""
    async with (
        origin(h1) as origin_port,
        loopback_proxy(tmp_path, monkeypatch, BLOCKED_HOST, local(origin_port)) as proxy,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        expected = {"example.test": 200, "blocked.test:": 403, "blocked.test.:": 403}
        for host, status in [(first, expected[first]), *expected.items()]:
            writer.write(f"GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert (await read_response(reader))[0] == status, host
        writer.write(b"GET /a HTTP/1.1\r\nHost: blocked.test:80:80\r\n\r\n")
        assert (await read_response(reader))[0] == 400
        writer.close()
        await proxy.wait_closed_flows(1)
    assert proxy.ledger.requests[-1].error == "bad_request"


@pytest.mark.asyncio
async def test_routed_request_goes_to_the_backend_and_keeps_its_host(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, backend_port = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /raw-head HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200
    writer.write(b"GET /routed HTTP/1.1\r\nHOST: example.test\r\n\r\n")
    status, _, body = await read_response(reader)
    assert ["host", "example.test"] in document(body)["headers"]
    writer.close()
    await proxy.wait_closed_flows(1)
    first, second = proxy.ledger.requests
    assert first.decision.backend is None
    assert second.decision.backend is not None
    assert second.decision.backend.port == backend_port


@pytest.mark.asyncio
async def test_request_head_reaches_the_upstream_byte_for_byte(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    head = (
        b"GET /raw-head HTTP/1.1\r\nX-Zeta: 1\r\nhOsT: Example.Test:80\r\n"
        b"X-Alpha: two words\r\nAccept: */*\r\nx-zeta: 2\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(head)
    status, _, body = await read_response(reader)
    assert (status, body) == (200, head)
    absolute = b"GET http://example.test/raw-head?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n"
    writer.write(absolute)
    status, _, body = await read_response(reader)
    assert (status, body) == (200, absolute)
    writer.close()


@pytest.mark.asyncio
async def test_empty_lines_before_a_request_are_skipped(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    """RFC 9112 2.2: empty lines before the first request and between keep-alive ones
    are ignored (they were answered 400), also when a CR and its LF come apart; the
    upstream gets each head as it is, without them, once."""
    proxy, _, _ = setup
    head = b"GET /raw-head HTTP/1.1\r\nHost: example.test\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for empty_lines, rest in ((b"\r\n\r\n", b""), (b"\n", b""), (b"\r", b"\n"), (b"\r\n\r", b"\n")):
        writer.write(empty_lines)
        await asyncio.sleep(0.01)
        writer.write(rest + head)
        async with asyncio.timeout(5):
            status, _, body = await read_response(reader)
        assert (status, body) == (200, head)
    writer.close()
    await proxy.wait_closed_flows(1)
    assert proxy.ledger.flows[0].hostname == "example.test"
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")] * 4


@pytest.mark.asyncio
async def test_more_empty_lines_than_allowed_before_a_request_are_refused(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    """At most EMPTY_LINES_ALLOWED empty lines are skipped before a request, as by the
    sniffer, also when they come one a read on a keep-alive connection: with one more the
    request is answered 400 and not sent upstream (it was, after any number of them)."""
    proxy, _, _ = setup
    head = b"GET /raw-head HTTP/1.1\r\nHost: example.test\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"\r\n" * (EMPTY_LINES_ALLOWED + 1) + head)
    async with asyncio.timeout(5):
        assert (await read_response(reader))[0] == 400
    writer.close()
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for empty_lines, expected in ((EMPTY_LINES_ALLOWED, 200), (EMPTY_LINES_ALLOWED + 1, 400)):
        writer.write(head)
        async with asyncio.timeout(5):
            assert (await read_response(reader))[0] == 200
        for _ in range(empty_lines):
            writer.write(b"\r\n")
            await asyncio.sleep(0.01)
        writer.write(head)
        async with asyncio.timeout(5):
            assert (await read_response(reader))[0] == expected
    writer.close()
    await proxy.wait_closed_flows(2)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [
        (400, "bad_request"),
        (200, ""),
        (200, ""),
        (200, ""),
        (400, "bad_request"),
    ]


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    paths = ["/one", "/denied", "/routed/two", "/three", "/denied", "/bytes/100000", "/four"]
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"".join(f"GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode() for path in paths)
    )
    for path in paths:
        status, _, body = await read_response(reader)
        if path == "/denied":
            assert status == 403
        elif path.startswith("/bytes/"):
            assert len(body) == 100000
        else:
            assert document(body)["target"] == path
    writer.close()


@pytest.mark.asyncio
async def test_requests_pipelined_faster_than_answered_wait_unread(
    setup: tuple[LoopbackProxy, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past WRITE_BUFFER_HIGH of pipelined bytes the proxy stops reading the client until
    they are served. It read again at the end of every exchange, so each exchange let one
    more read in: a client pipelining faster than the upstream answered grew the proxy's
    buffer without end (and its CPU, copying it for every request). Every request is still
    answered, in order."""
    proxy, _, _ = setup
    peak = [0]
    received = Http1Proxy.data_received

    def recording(handler: Http1Proxy, data: bytes) -> None:
        received(handler, data)
        peak[0] = max(peak[0], len(handler.inbox))

    monkeypatch.setattr(Http1Proxy, "data_received", recording)
    pad = "p" * 1400
    requests = [
        f"GET /{number} HTTP/1.1\r\nHost: example.test\r\nX-Pad: {pad}\r\n\r\n".encode()
        for number in range(1500)
    ]
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"".join(requests))
    async with asyncio.timeout(60):
        for number in range(len(requests)):
            status, _, body = await read_response(reader)
            assert (status, document(body)["target"]) == (200, f"/{number}")
    writer.close()
    await proxy.wait_closed_flows(1)
    assert sum(map(len, requests)) > 6 * WRITE_BUFFER_HIGH
    assert peak[0] <= 2 * WRITE_BUFFER_HIGH, f"{peak[0]} bytes of requests held"


BODILESS_ANSWERS = {
    b"/204": b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"/after": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood",
}


async def bodiless_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request by its path from BODILESS_ANSWERS."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while head := await reader.readuntil(b"\r\n\r\n"):
            writer.write(BODILESS_ANSWERS[head.split(b" ", 2)[1]])
    writer.close()


def http_client_statuses(port: int, paths: list[str]) -> list[tuple[int, bytes]]:
    """Python's http.client on one keep-alive connection: each path's status and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answers = []
    try:
        for path in paths:
            connection.request("GET", path, headers={"Host": "example.test"})
            response = connection.getresponse()
            answers.append((response.status, response.read()))
    finally:
        connection.close()
    return answers


@pytest.mark.asyncio
async def test_a_204_or_304_goes_out_without_the_transfer_encoding_it_has_no_body_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 204 (which RFC 9112 6.1 forbids it on) or a 304 saying Transfer-Encoding: chunked
    had its head forwarded as written, but not the zero chunk past it (no body): Python's
    http.client, and requests and botocore on it, let chunked win and waited for a chunk
    that never came. The field is dropped, as nginx does; the next request is answered."""
    async with proxy_to_origin(bodiless_origin, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        answers = await asyncio.to_thread(
            http_client_statuses, proxy.port, ["/204", "/after", "/304", "/after"]
        )
        await proxy.wait_closed_flows(1)
    assert answers == [(204, b""), (200, b"good"), (304, b""), (200, b"good")]


class GarbageSecond:
    """Answers a connection's first request, then its second with bytes that are no
    response and an EOF; keeps each request line it read."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"SSH-2.0-x"):
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n", 1)[0])
                if b"Content-Length: 4" in head:
                    await reader.readexactly(4)
                writer.write(answer)
        writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("second", ["GET /2", "POST /2"], ids=["lean", "h11"])
async def test_bytes_that_are_no_response_before_an_eof_are_a_bad_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    """An upstream that answered with bytes that make no response head, then closed, was
    counted `reset`, and a GET on a kept connection was sent again (RFC 9110 9.2.2 allows
    that only for a connection closed before any answer; nginx does not retry a bad
    header): 502 bad_response, the request sent once."""
    origin = GarbageSecond()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /1 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(5):
            first = await read_response(reader)
        body = b"Content-Length: 4\r\n\r\nbody" if second.startswith("POST") else b"\r\n"
        writer.write(second.encode() + b" HTTP/1.1\r\nHost: example.test\r\n" + body)
        async with asyncio.timeout(5):
            status, _, text = await read_response(reader)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert (first[0], status, text) == (200, 502, b"upstream bad_response\n")
    assert origin.requests == [b"GET /1 HTTP/1.1", second.encode() + b" HTTP/1.1"]
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/1", 200, ""),
        ("/2", 502, "bad_response"),
    ]


def head_of(size: int) -> bytes:
    """A 200 head of about size bytes (1 KiB fields), and its 2-byte body."""
    fields = b"".join(b"X-Field-%d: %s\r\n" % (n, b"v" * 1000) for n in range(size // 1024))
    return b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"


@pytest.mark.asyncio
@pytest.mark.parametrize(("size", "status"), [(60 * 1024, 200), (128 * 1024, 502)])
async def test_a_response_head_over_64_kib_is_refused_however_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, status: int
) -> None:
    """h11 bounds only a head still incomplete: a 128 KiB head whose first 64 KiB came
    alone, then the rest, was forwarded (the same head in one write got 502)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = head_of(size)
        writer.write(head[:65536])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(head[65536:])
        await writer.drain()
        writer.close()

    async with proxy_to_origin(answer, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port, limit=1 << 20)
        writer.write(b"POST /big HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n")
        async with asyncio.timeout(5):
            answered, _, _ = await read_response(reader)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answered == status


TINY_CHUNKS = 5000
"""Well past MAX_BODY_EVENTS_PER_TURN body pieces in one body."""


async def tiny_chunks_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each GET with TINY_CHUNKS chunks of one byte each, in one write."""
    body = b"".join(b"1\r\n%c\r\n" % (65 + n % 26) for n in range(TINY_CHUNKS))
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while await reader.readuntil(b"\r\n\r\n"):
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + body + b"0\r\n\r\n")
    writer.close()


@pytest.mark.asyncio
async def test_a_body_of_tiny_chunks_is_relayed_in_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked response of 1-byte chunks is one h11 event a byte: 40,000 of them in one
    read held the worker's loop 250 ms while every other connection waited. They are
    handled MAX_BODY_EVENTS_PER_TURN at a time, the upstream unread in between; the body
    arrives whole, and the upstream kept after it answers the next request."""
    turns = [0]
    next_turn = Http1Proxy._next_upstream_turn

    def counting(handler: Http1Proxy, upstream: Any) -> None:
        turns[0] += 1
        next_turn(handler, upstream)

    monkeypatch.setattr(Http1Proxy, "_next_upstream_turn", counting)
    expected = bytes(65 + n % 26 for n in range(TINY_CHUNKS))
    async with proxy_to_origin(tiny_chunks_origin, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        answers = await asyncio.to_thread(http_client_statuses, proxy.port, ["/a", "/b"])
        await proxy.wait_closed_flows(1)
    assert answers == [(200, expected), (200, expected)]
    assert turns[0] >= 2 * (TINY_CHUNKS // 1024)


@pytest.mark.asyncio
async def test_an_upload_of_tiny_chunks_is_forwarded_in_turns(
    setup: tuple[LoopbackProxy, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a client's chunked request body: the client is not read while the
    rest of what it sent waits for a later turn; the origin gets the body whole."""
    proxy, _, _ = setup
    turns = [0]
    next_turn = Http1Proxy._next_client_turn

    def counting(handler: Http1Proxy) -> None:
        turns[0] += 1
        next_turn(handler)

    monkeypatch.setattr(Http1Proxy, "_next_client_turn", counting)
    payload = bytes(65 + n % 26 for n in range(TINY_CHUNKS))
    chunks = b"".join(b"1\r\n%c\r\n" % byte for byte in payload)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    async with asyncio.timeout(10):
        status, _, body = await read_response(reader)
    writer.close()
    await proxy.wait_closed_flows(1)
    assert status == 200
    assert document(body)["body"] == {
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert turns[0] >= TINY_CHUNKS // 1024


@pytest.mark.asyncio
async def test_bodies_stream_both_ways(setup: tuple[LoopbackProxy, int, int]) -> None:
    proxy, _, _ = setup
    payload = bytes(range(256)) * 40000
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % len(payload)
    )
    writer.write(payload)
    status, _, body = await read_response(reader)
    assert document(body)["body"] == {
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    writer.write(
        b"POST /chunked HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for start in range(0, len(payload), 300000):
        piece = payload[start : start + 300000]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    writer.write(b"0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert document(body)["body"]["sha256"] == hashlib.sha256(payload).hexdigest()
    writer.write(b"GET /close-delimited/300000 HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, len(body), headers.get("transfer-encoding")) == (200, 300000, "chunked")
    writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200
    writer.close()


@pytest.mark.asyncio
async def test_100_continue(setup: tuple[LoopbackProxy, int, int]) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    status, _, _ = await read_response(reader)
    assert status == 100
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    assert document(body)["body"]["length"] == 5
    writer.write(
        b"POST /denied HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (403, "close")
    assert await reader.read() == b""
    writer.close()


@pytest.mark.asyncio
async def test_denied_request_body_is_dropped_and_the_connection_stays_usable(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST /denied HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\n")
    writer.write(b"x" * 100000)
    writer.write(b"HEAD /denied HTTP/1.1\r\nHost: example.test\r\n\r\n")
    writer.write(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (await read_response(reader))[0] == 403
    status, headers, _ = await read_response(reader, head_only=True)
    assert (status, headers["content-length"]) == (403, "20")
    status, _, body = await read_response(reader)
    assert document(body)["target"] == "/after"
    writer.close()


@pytest.mark.asyncio
async def test_upgrade_and_connect_are_spliced(setup: tuple[LoopbackProxy, int, int]) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(websocket_upgrade("/chat") + b"early")
    status, headers, _ = await read_response(reader)
    assert (status, headers["sec-websocket-accept"]) == (101, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    assert await reader.readexactly(5) == b"early"
    writer.write(b"GET /not-http-anymore\r\n")
    assert await reader.readexactly(23) == b"GET /not-http-anymore\r\n"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
    status, _, _ = await read_response(reader, head_only=True)
    assert status == 200
    writer.write(b"\x16\x03\x01opaque")
    assert await reader.readexactly(9) == b"\x16\x03\x01opaque"
    writer.close()
    await proxy.wait_closed_flows(2)
    tunnels = [(r.status, r.bytes_from_client, r.bytes_from_upstream, r.error)
               for r in proxy.ledger.requests]  # fmt: skip
    assert tunnels == [(101, 28, 28, ""), (200, 9, 9, "")], "reported as the tunnels end"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("Host: example.test:443\r\nContent-Length: 0\r\n", 200),
        ("Host: example.test:443\r\nContent-Length: 38\r\n", 400),
        ("Host: example.test:443\r\nTransfer-Encoding: chunked\r\n", 400),
        ("Host: example.test\r\n", 200),  # Java's, for its scheme's default port
        ("Host: 127.0.0.1:3128\r\n", 200),  # Node's default: the proxy's own
        ("Host: 2001:db8::1:443\r\n", 200),  # CPython's set_tunnel to an IPv6 literal
    ],
)
async def test_a_connect_with_a_body_gets_400_whatever_its_host(
    setup: tuple[LoopbackProxy, int, int], head: str, status: int
) -> None:
    """A CONNECT has no content (RFC 9110 9.3.6): an upstream that refuses the tunnel and
    keeps the connection (a forward proxy's 407) reads a body as its next request, one the
    policy never decided. Its Host is not checked: it is decided on its target, as forward
    proxies tunnel, and common clients send a Host that is not the target."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    smuggled = b"GET http://blocked.test/ HTTP/1.1\r\n\r\n"
    writer.write(f"CONNECT example.test:443 HTTP/1.1\r\n{head}\r\n".encode() + smuggled)
    answer = await asyncio.wait_for(read_response(reader, head_only=True), 5.0)
    assert answer[0] == status
    if status == 400:
        assert await asyncio.wait_for(reader.read(), 5.0) == b"bad request\n"  # then closed
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [record.status for record in proxy.ledger.requests] == [status]


async def urgent_in_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin whose 5-byte body has its middle byte sent as TCP urgent data."""
    await reader.readuntil(b"\r\n\r\n")
    descriptor = writer.get_extra_info("socket").fileno()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    await writer.drain()
    await asyncio.sleep(0.05)
    with socket.fromfd(descriptor, socket.AF_INET, socket.SOCK_STREAM) as same_socket:
        same_socket.send(b"c", socket.MSG_OOB)
    await asyncio.sleep(0.05)
    writer.write(b"de")
    await writer.drain()
    await reader.read()
    writer.close()


@pytest.mark.asyncio
async def test_an_urgent_byte_in_a_response_stays_in_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without SO_OOBINLINE on the upstream socket, the urgent byte would be dropped from
    the body, and the client would wait for it."""
    async with proxy_to_origin(urgent_in_the_body, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
    assert (status, body) == (200, b"abcde")


SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


async def switches_with_a_greeting(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An origin that sends its first tunnel bytes in the write of its 101, then echoes."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(SWITCHED + b"hello")
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


@pytest.mark.asyncio
async def test_a_tunnel_connection_counts_each_byte_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection's record counts every byte either way once: those the handler read
    past the heads before the switch (the tunnel's first bytes) and those the tunnel
    relayed after it."""
    async with proxy_to_origin(switches_with_a_greeting, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        sent = websocket_upgrade("/chat") + b"early"
        writer.write(sent)
        received = await reader.readexactly(len(SWITCHED) + len(b"hello"))
        assert received == SWITCHED + b"hello"
        writer.write(b"later")
        sent += b"later"
        writer.write_eof()
        received += await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert received.endswith(b"earlylater")
    (flow,) = proxy.ledger.flows
    assert (flow.bytes_from_client, flow.bytes_from_upstream) == (len(sent), len(received))


@pytest.mark.asyncio
async def test_a_tunnel_cut_by_the_drain_timeout_is_counted_as_drained(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    """The drain timeout's abort resets the tunnel's client side; its request must not be
    counted as a tunnel that ended well."""
    proxy, _, _ = setup
    registry = CollectorRegistry()
    proxy.context.accounting = Reporting(
        Metrics(registry, max_hostnames=10), AccessLog(logging.getLogger("test.access"))
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(websocket_upgrade("/chat"))
    assert (await read_response(reader))[0] == 101
    (tunnel,) = proxy.context.open_flows.flows
    tunnel.abort()
    async with asyncio.timeout(5):
        while proxy.context.open_flows.flows:
            await asyncio.sleep(0.01)
        with pytest.raises(ConnectionResetError):
            await reader.read()
    writer.close()
    body, _ = exposition(registry, "")
    statuses = [
        (sample.labels["http_status"], sample.labels["error"], sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "outbound_http_route_request_statuses_total"
    ]
    assert statuses == [("101", "drain", 1.0)]


@pytest.mark.asyncio
async def test_a_denied_upgrade_is_answered_and_the_connection_stays_http(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(websocket_upgrade("/denied/chat"))
    status, _, body = await read_response(reader)
    assert (status, body) == (403, b"traffic not allowed\n")
    writer.write(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, document(body)["target"]) == (200, "/after")
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [(r.path, r.status) for r in proxy.ledger.requests] == [
        ("/denied/chat", 403),
        ("/after", 200),
    ]


@pytest.mark.asyncio
async def test_a_request_cut_by_the_drain_timeout_says_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = Silent()
    async with proxy_to_origin(silent, tmp_path, monkeypatch, POLICY.format(backend=1)) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(5):
            await silent.arrived.wait()
        for flow in list(proxy.context.open_flows.flows):
            flow.abort()  # what the drain timeout does to what is left
        with pytest.raises(ConnectionResetError):  # not an end to take for an answer's
            await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [(r.path, r.error) for r in proxy.ledger.requests] == [("/slow", "drain")]
    assert [f.error for f in proxy.ledger.flows] == ["drain"]


class AnswersWhenTold:
    """An origin that reads a request and answers it, nginx-like (Connection: keep-alive),
    once `go` is set; `arrived` is set when the request is in."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if b"chunked" in head:
                await reader.readuntil(b"0\r\n\r\n")
            self.arrived.set()
            await self.go.wait()
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()
            await reader.read()
        writer.close()


def connection_fields(head: bytes) -> list[bytes]:
    return [
        line.partition(b":")[2].strip().lower()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"connection:")
    ]


@pytest.mark.parametrize(
    ("head", "closing"),
    [
        (
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: Keep-Alive\r\n"
            b"Content-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
        ),
        (
            b"HTTP/1.1 204 No Content\r\nconnection: x-trace\r\nX-Trace: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nconnection: x-trace\r\nX-Trace: 1\r\n"
            b"Connection: close\r\n\r\n",
        ),
    ],
)
def test_closing_head_says_close_and_keeps_the_rest(head: bytes, closing: bytes) -> None:
    assert closing_head(head) == closing
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(closing)
    response = client.next_event()
    assert isinstance(response, h11.Response), "h11 reads it"
    assert [value for name, value in response.headers if name == b"connection"][-1] == b"close"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["lean", "h11"],
)
async def test_the_answer_in_flight_at_a_drain_says_connection_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_bytes: bytes
) -> None:
    """A drain closes the connection after the exchange in flight; its answer said
    keep-alive, so a client could send its next request into the close (lost, and not
    retried when it is not idempotent). hyper says close on a graceful shutdown."""
    origin = AnswersWhenTold()
    async with proxy_to_origin(origin, tmp_path, monkeypatch, POLICY.format(backend=1)) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(request_bytes)
        async with asyncio.timeout(5):
            await origin.arrived.wait()
            for flow in list(proxy.context.open_flows.flows):
                flow.drain()
            origin.go.set()
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(2)
            assert await reader.read() == b"", "closed after the answer"
        writer.close()
        await proxy.wait_closed_flows(1)
    assert (connection_fields(head), body) == ([b"close"], b"ok")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /denied HTTP/1.1\r\nHost: example.test\r\n\r\n", 403),
        (b"HEAD /denied HTTP/1.1\r\nHost: example.test\r\n\r\n", 403),
        (
            b"POST /denied HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            403,
        ),
        (b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n", 502),
    ],
    ids=["lean 403", "lean 403 to HEAD", "h11 403", "502"],
)
async def test_the_proxys_own_answer_during_a_drain_says_connection_close(
    setup: tuple[LoopbackProxy, int, int], request_bytes: bytes, status: int
) -> None:
    """As the upstream's answers do during a drain: the connection closes after it, and a
    client told keep-alive may send its next request into the close."""
    proxy, _, _ = setup
    if status == 502:
        proxy.destination[0] = local(closed_port())
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    async with asyncio.timeout(5):
        proxy.context.draining = True  # the connection is still being sniffed, as serve() does
        writer.write(request_bytes)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()
    writer.close()
    await proxy.wait_closed_flows(1)
    assert head.split(b" ", 2)[1] == str(status).encode()
    assert connection_fields(head) == [b"close"]


@pytest.mark.asyncio
@pytest.mark.parametrize("first", [b"", b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"])
async def test_an_absolute_target_with_an_unbalanced_bracket_gets_400(
    setup: tuple[LoopbackProxy, int, int], first: bytes
) -> None:
    """urlsplit raises on `http://example.test]/`: the handler failed in its callback, the
    client got no answer (after a first request, the connection hung until the idle
    timeout)."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(first + b"GET http://example.test]/ HTTP/1.1\r\nHost: example.test\r\n\r\n")
    async with asyncio.timeout(5):
        if first:
            assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 400
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests][-1][1:] == (
        400,
        "bad_request",
    )


async def answers_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that reads what it is sent and answers nothing, until the proxy closes."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "head",
    [
        b"GET /plain HTTP/1.1\r\nHost: example.test\r\n\r\n",
        websocket_upgrade("/chat"),
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    ],
    ids=["request", "upgrade", "connect"],
)
async def test_bytes_after_a_head_waiting_for_its_answer_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: bytes
) -> None:
    """What a client sends after an Upgrade or CONNECT head, before the upstream's answer,
    was read on without end (64 MiB in 8 s, and the idle timeout never came, the client
    sending): it is held back like what follows any request."""
    async with proxy_to_origin(answers_nothing, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))
        client.setblocking(False)
        client.sendall(head)
        loop = asyncio.get_running_loop()
        deadline, sent, refused = loop.time() + 8.0, 0, 0
        chunk = bytes(65536)
        while sent < 64 << 20 and refused < 50 and loop.time() < deadline:
            try:
                sent += client.send(chunk)
                refused = 0
            except BlockingIOError:  # 0.5 s of this: the proxy reads no more
                refused += 1
                await asyncio.sleep(0.01)
                continue
            await asyncio.sleep(0)
        client.close()
        for flow in list(proxy.context.open_flows.flows):  # paused, it would see no close
            flow.abort()
        await proxy.wait_closed_flows(1)
    assert sent < 16 << 20


@pytest.mark.asyncio
async def test_unreachable_upstream_gets_502_and_the_cause(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    with __import__("socket").socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    proxy.destination[0] = local(closed_port)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, body) == (502, b"upstream connect_refused\n")
    writer.write(b"GET /routed HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [
        (502, "connect_refused"),
        (200, ""),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GET /a HTTP/1.1\r\nHost: example.test\r\nBad Header\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: denied.test\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX:" + b" " * 60000 + b"\0\r\n\r\n", 400, "bad_request"),
        (
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
            431,
            "header_too_large",
        ),
        (b"GET /a HTTP/1.1\r\nHost: example.test\r\nX-Slow: 1", 408, "header_timeout"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
async def test_bad_request_heads(
    setup: tuple[LoopbackProxy, int, int], request_bytes: bytes, status: int, error: str
) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.write(request_bytes)
    got, _, _ = await read_response(reader)
    assert got == status
    assert await reader.read() == b""
    writer.close()
    await proxy.wait_closed_flows(1)
    assert (proxy.ledger.requests[-1].status, proxy.ledger.requests[-1].error) == (status, error)


@pytest.mark.asyncio
@pytest.mark.parametrize("first", [False, True], ids=["first", "keep_alive"])
@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET /admin\r\n"],
        [b"GET /adm", b"in\n"],
        [b"GET /a HTTP/1.1", b" \r\nHost: example.test\r\n"],
        [b"GET  /a  HTTP/1.1\r\nHost: example.test", b"\r\n"],
    ],
    ids=["http09", "http09-in-pieces", "trailing-space", "doubled-spaces"],
)
async def test_a_bad_request_line_is_answered_400_before_its_head_ends(
    setup: tuple[LoopbackProxy, int, int], pieces: list[bytes], first: bool
) -> None:
    """HTTP/0.9's `GET /path` is all its client sends: waiting for the rest of a head that
    never comes, it was answered 408 after --header-timeout, and held the connection."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    if first:
        writer.write(b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.02)
    async with asyncio.timeout(0.3):  # the header timeout is 0.5 s
        assert (await read_response(reader))[0] == 400
        assert await reader.read() == b""
    writer.close()
    await proxy.wait_closed_flows(1)
    assert (proxy.ledger.requests[-1].status, proxy.ledger.requests[-1].error) == (
        400,
        "bad_request",
    )


@pytest.mark.asyncio
async def test_a_request_line_that_comes_in_pieces_is_not_refused(
    setup: tuple[LoopbackProxy, int, int],
) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for piece in [b"GET /a HT", b"TP/1.1\r", b"\nHost: example.test\r\n", b"\r\n"]:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.02)
    assert (await read_response(reader))[0] == 200
    writer.close()
    await proxy.wait_closed_flows(1)


async def send_in_pieces(writer: asyncio.StreamWriter) -> None:
    """5,000 bytes of a field value, 50 at a time, each its own read as far as timing goes."""
    for _ in range(100):
        writer.write(b"v" * 50)
        await writer.drain()
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["first", "keep_alive"])
async def test_a_head_that_comes_in_pieces_is_not_parsed_again_at_every_one(
    setup: tuple[LoopbackProxy, int, int], monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """A request head sent a few bytes at a time is parsed when a line end comes, not whole
    again at every read: a 64 KiB keep-alive head sent a byte at a time took 4.6 s of the
    worker's loop (the first head, read while sniffing, a fraction of that for 16 KiB)."""
    proxy, _, _ = setup
    parses: list[int] = []
    parse_request = http1_lean.parse_request

    def counted(buffer: bytes, limit: int) -> object:
        parses.append(len(buffer))
        return parse_request(buffer, limit)

    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    if which == "keep_alive":
        writer.write(b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    monkeypatch.setattr(http1_lean, "parse_request", counted)
    writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\nX-Long: ")
    await send_in_pieces(writer)
    writer.write(b"\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()
    await proxy.wait_closed_flows(1)
    assert len(parses) <= 3, parses


@pytest.mark.asyncio
async def test_a_response_head_that_comes_in_pieces_is_not_parsed_again_at_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What holds for a client's head holds for an upstream's: a response head up to 64 KiB
    sent a few bytes at a time is parsed when a line end comes."""
    parses: list[int] = []
    parse_response = http1_lean.parse_response

    def counted(buffer: bytes, method: bytes) -> object:
        parses.append(len(buffer))
        return parse_response(buffer, method)

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Long: ")
        await send_in_pieces(writer)
        writer.write(b"\r\n\r\nok")
        await writer.drain()
        writer.close()

    monkeypatch.setattr(http1_lean, "parse_response", counted)
    async with proxy_to_origin(trickle, tmp_path, monkeypatch, POLICY.format(backend=1)) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[2] == b"ok"
        writer.close()
        await proxy.wait_closed_flows(1)
    assert len(parses) <= 3, parses


@pytest.mark.asyncio
async def test_a_head_sent_again_is_read_and_decided_once(
    setup: tuple[LoopbackProxy, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sends its last head again, byte for byte, gets the answer that head
    got, allowed or denied, without the head being parsed or decided again; another head
    with the same field lines is read by its request line alone, and any other head whole."""
    proxy, _, _ = setup
    parses: list[bytes] = []
    by_request_line: list[bytes] = []
    parse_request = http1_lean.parse_request
    parse_request_like = http1_lean.parse_request_like

    def counted(buffer: bytes, limit: int) -> object:
        parses.append(buffer[: buffer.find(b"\r\n\r\n") + 4])
        return parse_request(buffer, limit)

    def counted_like(buffer: bytes, like: LeanRequest, fields: bytes, limit: int) -> object:
        found = parse_request_like(buffer, like, fields, limit)
        if found is not None:
            by_request_line.append(found.head)
        return found

    monkeypatch.setattr(http1_lean, "parse_request", counted)
    monkeypatch.setattr(http1_lean, "parse_request_like", counted_like)
    allowed = b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"
    denied = b"GET /denied HTTP/1.1\r\nHost: example.test\r\n\r\n"
    longer = b"GET /a HTTP/1.1\r\nHost: example.test\r\nX-More: 1\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    sent = [allowed, allowed, allowed, denied, denied, longer, allowed]
    for head in sent:
        writer.write(head)
        assert (await read_response(reader))[0] == (403 if head == denied else 200)
    writer.write(allowed + allowed + denied + denied)  # pipelined
    for expected in (200, 200, 403, 403):
        assert (await read_response(reader))[0] == expected
    writer.close()
    await proxy.wait_closed_flows(1)
    statuses = [(record.path, record.status) for record in proxy.ledger.requests]
    assert (
        statuses
        == [("/a", 200)] * 3 + [("/denied", 403)] * 2 + [("/a", 200)] * 4 + [("/denied", 403)] * 2
    )
    assert parses == [allowed, longer, allowed]
    assert by_request_line == [denied, denied]


NO_DELETES_NO_B = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: no-deletes
    http:
    - methods: [DELETE]
    action: deny
  - name: no-b
    http:
    - pathPrefix: /b
    action: deny
"""


@pytest.mark.asyncio
async def test_a_request_like_the_last_but_for_its_query_keeps_the_last_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heads with the same field lines as the last differ only in their request line: where
    the method and path are the last's too and the policy reads no query, the last decision
    stands; another method or path is decided again."""
    decided: list[tuple[str, str]] = []
    decide = RequestDecider.decide

    def counted(
        decider: RequestDecider, hostname: str | None, method: str, path: str, *rest: Any
    ) -> Decision:
        decided.append((method, path))
        return decide(decider, hostname, method, path, *rest)

    monkeypatch.setattr(RequestDecider, "decide", counted)
    sent = [
        ("GET", "/a?n=1", 200),
        ("GET", "/a?n=2", 200),
        ("DELETE", "/a?n=3", 403),
        ("DELETE", "/a?n=4", 403),
        ("GET", "/a?n=5", 200),
        ("GET", "/b?n=6", 403),
        ("GET", "/b?n=7", 403),
        ("GET", "/a", 200),
    ]
    async with (
        origin(h1) as origin_port,
        loopback_proxy(tmp_path, monkeypatch, NO_DELETES_NO_B, local(origin_port)) as proxy,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for method, target, expected in sent:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
            assert (await read_response(reader))[0] == expected, (method, target)
        writer.close()
        await proxy.wait_closed_flows(1)
    records = [(record.method, record.path, record.status) for record in proxy.ledger.requests]
    assert records == [
        (method, target.partition("?")[0], status) for method, target, status in sent
    ]
    routes = [
        record.decision.route and record.decision.route.name for record in proxy.ledger.requests
    ]
    allowed, no_deletes, no_b = "http-egress-allow", "test.no-deletes", "test.no-b"
    assert routes == [allowed] * 2 + [no_deletes] * 2 + [allowed] + [no_b] * 2 + [allowed]
    connection = ("GET", "/")  # the connection's own decision (PolicyIndex.decide_connection)
    again = [("GET", "/a"), ("DELETE", "/a"), ("GET", "/a"), ("GET", "/b"), ("GET", "/a")]
    assert decided == [connection, *again]


async def answer_by_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """/long gets a 25-byte body, anything else 2 bytes; HEAD the same head without it."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"a quarter of a hundred ok" if head.startswith(b"GET /long ") else b"ok"
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            writer.write(answer if head.startswith(b"HEAD ") else answer + body)
            await writer.drain()
    writer.close()


@pytest.mark.asyncio
async def test_a_response_head_sent_again_frames_its_body_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that answers with its last head again, to a request of the same method,
    gets that head read once; the same head answering HEAD, or a head that only starts
    alike, is read anew, and every body is framed right."""
    parses: list[bytes] = []
    parse_response = http1_lean.parse_response

    def counted(buffer: bytes, method: bytes) -> object:
        parses.append(method)
        return parse_response(buffer, method)

    monkeypatch.setattr(http1_lean, "parse_response", counted)
    async with proxy_to_origin(
        answer_by_path, tmp_path, monkeypatch, POLICY.format(backend=1)
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for method, path, body in [
            ("GET", "/a", b"ok"),
            ("GET", "/b", b"ok"),
            ("HEAD", "/a", b""),
            ("GET", "/a", b"ok"),
            ("GET", "/long", b"a quarter of a hundred ok"),
            ("GET", "/a", b"ok"),
        ]:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
            status, headers, received = await read_response(reader, head_only=method == "HEAD")
            assert (status, received) == (200, body), (method, path)
            assert headers["content-length"] == str(len(body) or 2)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert parses == [b"GET", b"HEAD", b"GET", b"GET", b"GET"]


async def answer_once_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the first request of a connection; on the second it closes without a word
    (what a keep-alive timeout racing a new request looks like to the proxy)."""
    with contextlib.suppress(asyncio.IncompleteReadError):
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "first",
    [
        b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"POST /form HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nhi",
    ],
)
async def test_request_on_a_reused_upstream_that_closed_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bytes
) -> None:
    """A GET after a POST with a body is as retriable as one after a GET."""
    async with proxy_to_origin(
        answer_once_then_drop, tmp_path, monkeypatch, POLICY.format(backend=1)
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(first)
        assert await read_response(reader) == (200, {"content-length": "2"}, b"ok")
        for _ in range(2):
            writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
            assert await read_response(reader) == (200, {"content-length": "2"}, b"ok")
        writer.close()
        await proxy.wait_closed_flows(1)
        assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")] * 3


@pytest.mark.asyncio
async def test_a_non_idempotent_request_is_never_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9110 9.2.2: a proxy must not retry a non-idempotent request on its own. The
    upstream may have acted on the POST before it closed: the client gets the 502."""
    heads: list[bytes] = []

    async def record_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async with proxy_to_origin(
        record_then_drop, tmp_path, monkeypatch, POLICY.format(backend=1)
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(b"POST /pay HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n")
        assert (await read_response(reader))[0] == 502
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [head.split(b" ", 2)[:2] for head in heads] == [[b"GET", b"/a"], [b"POST", b"/pay"]]


@pytest.mark.asyncio
async def test_idle_keep_alive_connection_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, POLICY.format(backend=1), idle_timeout=0.3
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
        assert proxy.ledger.flows[0].error == "idle_timeout"


@pytest.mark.asyncio
@pytest.mark.parametrize("waiting_for", ["connect", "verification"])
async def test_idle_timeout_while_the_upstream_is_not_ready_is_answered_504(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waiting_for: str
) -> None:
    """--idle-timeout shorter than the connect (or the Host's verification): the request
    gets 504 idle_timeout, as one whose upstream is silent does and as h2 answers it; the
    client was reset with no answer at all."""
    with contextlib.ExitStack() as stack:
        if waiting_for == "connect":
            destination = local(stack.enter_context(listener_that_never_answers()))
            settings: dict[str, Any] = {}
        else:
            stack.enter_context(names_never_resolve(monkeypatch))
            destination = local(closed_port())
            settings = {"verify_destination": VerifyDestination.ENFORCE}
        async with loopback_proxy(
            tmp_path,
            monkeypatch,
            ALLOW_ALL,
            destination,
            idle_timeout=0.4,
            connect_timeout=3.0,
            **settings,
        ) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
            async with asyncio.timeout(2):
                status, _, body = await read_response(reader)
            writer.close()
            await proxy.wait_closed_flows(1)
    assert (status, body) == (504, b"upstream idle_timeout\n")
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(504, "idle_timeout")]


@pytest.mark.asyncio
async def test_a_slow_steady_reader_is_not_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response leaving the proxy as fast as the client takes it is traffic: the idle
    timeout counted only bytes read, and cut a reader slower than the write buffer's span
    (high- to low-water mark, and the socket's) per timeout."""
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, POLICY.format(backend=1), idle_timeout=0.2
    ) as proxy:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, (proxy.host, proxy.port))
        size = 512 * 1024
        await loop.sock_sendall(client, f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        async with asyncio.timeout(10):
            while len(received.partition(b"\r\n\r\n")[2]) < size:
                with contextlib.suppress(BlockingIOError):
                    data = client.recv(4096)
                    assert data, f"closed after {len(received)} bytes"
                    received += data
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_connection(sock=client)
        writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            again = await read_response(reader)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert again[0] == 200, "the connection was cut as idle"
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")] * 2
    assert proxy.ledger.flows[0].error == ""


@pytest.mark.asyncio
async def test_h2c_upgrade_is_not_offered_upstream(setup: tuple[LoopbackProxy, int, int]) -> None:
    """After a 101 to h2c the requests would pass unseen: the upgrade is dropped instead."""
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"GET /raw-head HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade, HTTP2-Settings"
        b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    status, _, body = await read_response(reader)
    assert (status, body) == (
        200,
        b"GET /raw-head HTTP/1.1\r\nHost: example.test\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\n\r\n",
    )
    writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.asyncio
async def test_http_1_0_request_without_host(setup: tuple[LoopbackProxy, int, int]) -> None:
    proxy, _, _ = setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /raw-head HTTP/1.0\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await reader.read() == b"GET /raw-head HTTP/1.0\r\n\r\n"
    writer.close()
    await proxy.wait_closed_flows(1)
    assert proxy.ledger.requests[0].hostname is None


@pytest.mark.asyncio
@pytest.mark.parametrize(("mode", "elsewhere_status"), [("enforce", 421), ("log", 200)])
async def test_verify_destination_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, elsewhere_status: int
) -> None:
    async with proxy_to_origin(
        h1,
        tmp_path,
        monkeypatch,
        POLICY.format(backend=1),
        verify_destination=VerifyDestination(mode),
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for host, expected in [
            ("localhost", 200),
            ("nowhere.invalid", elsewhere_status),
            ("127.0.0.1", 200),
        ]:
            writer.write(f"GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status, _, body = await read_response(reader)
            assert status == expected, host
            if status == 421:
                assert body == b"destination does not match the host\n"
        await proxy.wait_unconfirmed(1)
        writer.close()
        await proxy.wait_closed_flows(1)
    errors = [(r.hostname, r.error) for r in proxy.ledger.requests]
    assert errors == [
        ("localhost", ""),
        ("nowhere.invalid", "destination_mismatch" if mode == "enforce" else ""),
        ("127.0.0.1", ""),
    ]
    assert proxy.ledger.unconfirmed == [("destination_mismatch", "nowhere.invalid", mode, 1)]


GRPC_PORT_POLICY = (
    LOOPBACK_NETWORK
    + """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo
  namespace: linkerd-egress
spec:
  parentRefs:
  - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io, port: {origin}}}
  - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io, port: {closed}}}
  rules:
  - matches:
    - method: {{service: test.Echo}}
"""
)
"""Ports whose routes are GRPCRoutes: every request on them is in the gRPC route family."""


async def grpc_over_http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers /test.Echo/Status with grpc-status 5 in its head, /test.Echo/Trailer with
    grpc-status 0 in a chunked body's trailers, anything else without a grpc-status."""
    connection, path = h11.Connection(h11.SERVER), b""
    with contextlib.suppress(ConnectionError, h11.RemoteProtocolError):
        while not isinstance(event := connection.next_event(), h11.ConnectionClosed):
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                path = event.target
            elif isinstance(event, h11.EndOfMessage):
                head, end = [(b"content-length", b"0")], h11.EndOfMessage()
                if path == b"/test.Echo/Status":
                    head.append((b"grpc-status", b"5"))
                elif path == b"/test.Echo/Trailer":
                    head = [(b"transfer-encoding", b"chunked")]
                    end = h11.EndOfMessage(headers=[(b"grpc-status", b"0")])
                response = h11.Response(status_code=200, headers=head)
                writer.write(b"".join(connection.send(part) or b"" for part in (response, end)))
                connection.start_next_cycle()
    writer.close()


@pytest.mark.asyncio
async def test_requests_on_a_grpc_port_are_grpc_calls_in_metrics_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linkerd routes every request on a port of GRPCRoutes as a gRPC call, whatever its
    content-type: its status is the response's grpc-status (head or trailers), UNKNOWN
    without one, and the proxy's own answers carry the code a gRPC client would get."""
    closed = closed_port()
    async with origin(grpc_over_http1) as origin_port:
        policy = GRPC_PORT_POLICY.format(origin=origin_port, closed=closed)
        async with loopback_proxy(tmp_path, monkeypatch, policy, local(origin_port)) as proxy:
            registry = CollectorRegistry()
            lines = Lines(LogFormat.JSON)
            proxy.context.accounting = Reporting(
                Metrics(registry, max_hostnames=10), lines.access_log
            )
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            answers = []
            for method, path in [
                ("GET", "/denied"),
                ("POST", "/test.Echo/Status"),
                ("POST", "/test.Echo/Trailer"),
                ("POST", "/test.Echo/Plain"),
            ]:
                writer.write(
                    f"{method} {path} HTTP/1.1\r\nHost: example.test\r\n"
                    "content-length: 0\r\n\r\n".encode()
                )
                answers.append((await read_response(reader))[0])
            writer.close()
            proxy.destination[0] = local(closed)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(
                b"POST /test.Echo/Echo HTTP/1.1\r\nHost: a.test\r\ncontent-length: 0\r\n\r\n"
            )
            answers.append((await read_response(reader))[0])
            writer.close()
            async with asyncio.timeout(5):
                while proxy.context.open_flows.flows:
                    await asyncio.sleep(0.01)
    assert answers == [403, 200, 200, 200, 502]
    assert request_statuses(registry, "grpc") == [
        ("echo", "NOT_FOUND", "", 1.0),
        ("echo", "OK", "", 1.0),
        ("echo", "UNAVAILABLE", "connect_refused", 1.0),
        ("echo", "UNKNOWN", "", 1.0),
        ("grpc-egress-deny", "PERMISSION_DENIED", "", 1.0),
    ]
    logged = [json.loads(line) for line in lines.lines()]
    requests = [(entry["protocol"], entry["path"], entry["status"], entry["error"])
                for entry in logged if "method" in entry]  # fmt: skip
    assert requests == [
        ("grpc", "/denied", "7", ""),
        ("grpc", "/test.Echo/Status", "5", ""),
        ("grpc", "/test.Echo/Trailer", "0", ""),
        ("grpc", "/test.Echo/Plain", "", ""),
        ("grpc", "/test.Echo/Echo", "14", "connect_refused"),
    ]


TCP_ROUTE_TO_A_NAME = (
    LOOPBACK_NETWORK
    + """\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: elsewhere
  namespace: linkerd-egress
spec:
  parentRefs:
  - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io, port: {port}}}
  rules:
  - backendRefs:
    - {{kind: Service, name: nowhere, port: 80}}
"""
)


@pytest.mark.asyncio
async def test_a_backend_lookup_that_times_out_gets_504(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTERFACE: upstream unreachable 502, 504 on timeout; a lookup timing out is one.
    Per request (the HTTP/1 handler) and for a connection spliced whole (a TCPRoute)."""
    closed = closed_port()
    with names_never_resolve(monkeypatch):
        policy = POLICY.format(backend=1).replace("127.0.0.1:1", "backend.example.test:80")
        async with loopback_proxy(
            tmp_path, monkeypatch, policy, local(closed), connect_timeout=0.3
        ) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"GET /routed HTTP/1.1\r\nHost: example.test\r\n\r\n")
            status, _, body = await read_response(reader)
            writer.close()
            await proxy.wait_closed_flows(1)
        assert (status, body) == (504, b"upstream dns_timeout\n")
        assert [(r.status, r.error) for r in proxy.ledger.requests] == [(504, "dns_timeout")]
        policy = TCP_ROUTE_TO_A_NAME.format(port=closed)
        async with loopback_proxy(
            tmp_path, monkeypatch, policy, local(closed), connect_timeout=0.3
        ) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
            status, _, body = await read_response(reader)
            writer.close()
            await proxy.wait_closed_flows(1)
        assert (status, body) == (504, b"dns_timeout\n")
        assert [(f.status, f.error) for f in proxy.ledger.flows] == [(504, "dns_timeout")]


TLS_ROUTE_PORT = (
    LOOPBACK_NETWORK
    + """\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: tls-only
  namespace: linkerd-egress
spec:
  hostnames: [allowed.test]
  parentRefs:
  - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io, port: {port}}}
  rules:
  - backendRefs:
    - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io}}
"""
)
"""A port of TLSRoutes: HTTP/1 there is decided for the connection, tls-egress-deny."""
TCP_ROUTE_PORT = TLS_ROUTE_PORT.replace("kind: TLSRoute", "kind: TCPRoute").replace(
    "  hostnames: [allowed.test]\n", ""
)
"""A port of one TCPRoute to the original destination: HTTP/1 there is spliced whole."""


@pytest.mark.asyncio
@pytest.mark.parametrize("log_format", [LogFormat.TEXT, LogFormat.JSON])
@pytest.mark.parametrize(
    ("policy", "verify", "answer", "error"),
    [
        (TLS_ROUTE_PORT, VerifyDestination.OFF, 403, "forbidden"),
        (TCP_ROUTE_PORT, VerifyDestination.OFF, 502, "connect_refused"),
        (TCP_ROUTE_PORT, VerifyDestination.ENFORCE, 421, "destination_mismatch"),
    ],
    ids=["denied", "unreachable", "mismatch"],
)
async def test_the_proxys_answer_on_a_connection_decided_whole_is_its_lines_status(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_format: LogFormat,
    policy: str,
    verify: VerifyDestination,
    answer: int,
    error: str,
) -> None:
    """HTTP/1 on a port of TLS or TCP routes has no request lines, only its connection's;
    when the proxy answers the client itself (a deny, an unreachable upstream, a
    destination mismatch), that line's status is the answer's, in text and JSON alike."""
    monkeypatch.setattr(socket, "getaddrinfo", SystemResolver())  # every name elsewhere
    closed = closed_port()
    async with loopback_proxy(
        tmp_path, monkeypatch, policy.format(port=closed), local(closed), verify_destination=verify
    ) as proxy:
        lines = Lines(log_format)
        proxy.context.accounting = Reporting(
            Metrics(CollectorRegistry(), max_hostnames=10), lines.access_log
        )
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        async with asyncio.timeout(5):
            while proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    (line,) = lines.lines()
    fields = json.loads(line) if log_format is LogFormat.JSON else text_fields(line)[1]
    assert status == answer
    assert (fields["protocol"], fields["status"], fields["error"]) == ("http1", str(answer), error)


@pytest.mark.asyncio
async def test_a_connection_lingering_after_an_error_answer_is_still_counted_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a 400 the proxy keeps reading (and dropping) the client's bytes for a while:
    the connection is open until then, for --max-connections and the open-connections
    gauge alike, and is reported once when its socket closes."""
    async with proxy_to_origin(h1, tmp_path, monkeypatch, POLICY.format(backend=1)) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\nmore bytes")
        assert (await read_response(reader))[0] == 400
        assert await reader.read() == b""
        await asyncio.sleep(0.1)
        lingering = (len(proxy.context.open_flows), len(proxy.ledger.flows))
        writer.close()
        await proxy.wait_closed_flows(1)
        assert not proxy.context.open_flows.flows
    assert lingering == (1, 0)
    assert [flow.error for flow in proxy.ledger.flows] == ["bad_request"]


@pytest.mark.asyncio
async def test_an_answer_that_ends_the_connection_closes_its_idle_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A denied request waiting for 100 Continue is answered 403 and the connection ends;
    the upstream connection kept from the request before must end with it."""
    upstream_ended = asyncio.Event()

    async def h1_noting_the_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await h1(reader, writer)
        upstream_ended.set()

    async with proxy_to_origin(
        h1_noting_the_end, tmp_path, monkeypatch, POLICY.format(backend=1)
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(
            b"POST /denied HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        assert (await read_response(reader))[0] == 403
        assert await reader.read() == b""
        await asyncio.wait_for(upstream_ended.wait(), 2)
        writer.close()
        await proxy.wait_closed_flows(1)


async def client_that_never_reads(proxy: LoopbackProxy) -> socket.socket:
    """A client connection whose bytes the proxy cannot send: both socket buffers small,
    and nothing ever read."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (proxy.host, proxy.port))
    async with asyncio.timeout(2):
        while not proxy.context.open_flows.flows:
            await asyncio.sleep(0.01)
    (flow,) = proxy.context.open_flows.flows
    flow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return client


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("requests", "error"),
    [
        (
            b"GET /bytes/131072 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
            "idle_timeout",
        ),
        (
            b"GET /bytes/131072 HTTP/1.1\r\nHost: example.test\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "bad_request",
        ),
    ],
    ids=["connection-close", "error-answer-lingering"],
)
async def test_a_closing_connection_whose_client_reads_nothing_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requests: bytes, error: str
) -> None:
    """The last answer is complete but the client reads nothing: closing would wait for it
    for ever, holding its place against --max-connections; it is cut after the idle
    timeout (or when the linger after an error answer ends)."""
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, POLICY.format(backend=1), idle_timeout=0.4
    ) as proxy:
        client = await client_that_never_reads(proxy)
        client.send(requests)
        await proxy.wait_requests(1)
        await proxy.wait_closed_flows(1, timeout=4.0)
        client.close()
    assert proxy.ledger.requests[0].status == 200
    assert [flow.error for flow in proxy.ledger.flows] == [error]


def statuses_of_hosts(proxy: LoopbackProxy, hosts: list[str]) -> list[int]:
    """http.client's GET / with each Host in turn, on one keep-alive connection."""
    connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5.0)
    statuses = []
    try:
        for host in hosts:
            connection.request("GET", "/", headers={"Host": host})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


@pytest.mark.asyncio
@pytest.mark.parametrize("matches", OSM_HOST_CASES, ids=["hosts", "host-header-match"])
async def test_an_osm_egress_takes_a_host_naming_its_port_and_refuses_another_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matches: str
) -> None:
    """OSM's Envoy domains for an http Egress host are HOST and HOST:PORT: a Host naming
    another port is refused as a host no Egress lists is (403), over keep-alive."""
    async with origin(h1) as port:
        policy = OSM_HTTP_EGRESS.format(port=port, matches=matches)
        async with loopback_proxy(tmp_path, monkeypatch, policy, local(port)) as proxy:
            hosts = [host.format(port=port) for host in OSM_HOST_CASES[matches]]
            statuses = await asyncio.to_thread(statuses_of_hosts, proxy, hosts)
            await proxy.wait_closed_flows(1)
    assert statuses == list(OSM_HOST_CASES[matches].values())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("flags", "status"),
    [
        ("", 200),
        ("  featureFlags: {enableEgressPolicy: true}\n", 200),
        ("  featureFlags: {enableEgressPolicy: false}\n", 403),
    ],
    ids=["absent", "true", "false"],
)
async def test_the_osm_egress_policy_feature_flag_gates_egress_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, status: int
) -> None:
    """With enableEgress false, an Egress-allowed host passes while OSM's Egress policy
    feature flag is on or unset (the install's default), and is denied (403) when it is
    false: OSM then applies no Egress policy."""
    async with origin(h1) as port:
        policy = OSM_HTTP_EGRESS.format(port=port, matches="").replace(
            "  traffic: {enableEgress: false}\n", "  traffic: {enableEgress: false}\n" + flags
        )
        async with loopback_proxy(tmp_path, monkeypatch, policy, local(port)) as proxy:
            statuses = await asyncio.to_thread(statuses_of_hosts, proxy, ["example.test"])
            await proxy.wait_closed_flows(1)
    assert statuses == [status]


@pytest.mark.asyncio
async def test_a_response_head_read_in_parts_is_let_go_after_its_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean path keeps the first part of a response head until the head is whole, and
    no longer: a keep-alive connection idle between requests holds no response bytes."""

    async def head_in_two_parts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()
        writer.close()

    async with proxy_to_origin(head_in_two_parts, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(5):
            status, _, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        (flow,) = proxy.context.open_flows.flows
        handler = flow.transport.get_protocol()
        assert isinstance(handler, Http1Proxy) and handler.exchange is None
        assert handler.response_received == b""
        writer.close()
