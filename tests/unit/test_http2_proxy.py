"""H2Proxy on loopback: h2c prior knowledge and gRPC through the real Flow and policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.client
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hpack.huffman
import hpack.huffman_constants
import hpack.huffman_table
import hyperframe.frame
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import egressproxy.http2
from egressproxy.http2 import (
    CLIENT_CONNECTION_WINDOW,
    CLIENT_STREAM_WINDOW,
    MAX_ENCODER_TABLE,
    MAX_NEW_STREAMS_PER_READ,
    REPLAY_LIMIT,
    STREAM_WINDOW,
    STREAMS_BEFORE_RESETS_COUNT,
    UPSTREAM_STREAM_WINDOW,
    GoawayFilter,
    LinearHuffmanEncoder,
    deadline_ran_out,
)
from egressproxy.metrics import Metrics
from egressproxy.server import Reporting
from egressproxy.settings import LogFormat, VerifyDestination
from egressproxy.sniff.http import H2_PREFACE
from tests.e2e.http_servers import H2Server, grpc_server, h1
from tests.e2e.servers import deterministic_chunks
from tests.unit.http_harness import (
    ALLOW_ALL,
    BLOCKED_HOST,
    OSM_HOST_CASES,
    OSM_HTTP_EGRESS,
    LoopbackProxy,
    Silent,
    closed_port,
    local,
    loopback_proxy,
    names_never_resolve,
    origin,
    proxy_to_origin,
    request_statuses,
)
from tests.unit.test_accesslog import Lines
from tests.unit.test_http1_proxy import GRPC_PORT_POLICY, client_that_never_reads, read_response

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
  - name: no-fail
    grpc:
    - service: test.Echo
      method: Fail
    action: deny
  - name: echo
    grpc:
    - service: test.Echo
      method: Echo
    action: allow
"""

TIMEOUT = 10.0


@dataclass
class Answer:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False
    reset_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client(asyncio.Protocol):
    """A small h2c prior-knowledge client that reads every stream as fast as it arrives."""

    def __init__(self) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
        self.transport: asyncio.Transport
        self.answers: dict[int, Answer] = {}
        self.uploads: dict[int, memoryview] = {}
        self.goaway = False
        self.lost = asyncio.Event()
        self.lost_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        authority: str = "example.test",
    ) -> Answer:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", authority),
                (":path", path),
                *(headers or {}).items(),
            ],
            end_stream=not body,
        )
        self.answers[stream_id] = Answer()
        if body:
            self.uploads[stream_id] = memoryview(body)
            self._upload()
        self.transport.write(self.h2.data_to_send())
        return self.answers[stream_id]

    def open_stream(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Answer]:
        """A stream whose head is sent and whose body is still to come (upload ends it)."""
        stream_id = self.h2.get_next_available_stream_id()
        block = [(":method", method), (":scheme", "http"), (":authority", "example.test"),
                 (":path", path), *(headers or {}).items()]  # fmt: skip
        self.h2.send_headers(stream_id, block)
        answer = self.answers[stream_id] = Answer()
        self.transport.write(self.h2.data_to_send())
        return stream_id, answer

    def upload(self, stream_id: int, body: bytes) -> None:
        """The body of an open stream, sent as the windows allow, and its end."""
        self.uploads[stream_id] = memoryview(body)
        self._upload()
        self.transport.write(self.h2.data_to_send())

    def _upload(self) -> None:
        for stream_id, rest in list(self.uploads.items()):
            while rest:
                size = min(self.h2.local_flow_control_window(stream_id), 16384, len(rest))
                if size <= 0:
                    break
                self.h2.send_data(stream_id, bytes(rest[:size]))
                rest = rest[size:]
            self.uploads[stream_id] = rest
            if not rest:
                del self.uploads[stream_id]
                self.h2.end_stream(stream_id)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.answers[event.stream_id].headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self.answers[event.stream_id].body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.answers[event.stream_id].trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded):
                self.answers[event.stream_id].done.set()
            elif isinstance(event, h2.events.StreamReset):
                answer = self.answers[event.stream_id]
                answer.reset, answer.reset_code = True, event.error_code
                answer.done.set()
            elif isinstance(event, h2.events.WindowUpdated):
                self._upload()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_at = asyncio.get_running_loop().time()
        self.lost.set()


ClientT = TypeVar("ClientT", bound=H2Client)


@pytest_asyncio.fixture
async def h2_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LoopbackProxy, int]]:
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(tmp_path, monkeypatch, POLICY, local(port)) as proxy:
            yield proxy, port
    finally:
        origin.close()


@pytest.fixture
def grpc_origin() -> Iterator[int]:
    server, port = grpc_server("127.0.0.1:0")
    try:
        yield port
    finally:
        server.stop(None)


@contextlib.asynccontextmanager
async def proxy_to_h2_origin(
    factory: Callable[[], asyncio.BaseProtocol],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    **settings: object,
) -> AsyncIterator[LoopbackProxy]:
    """A loopback proxy (with these settings) whose every connection was meant for an h2
    origin made by factory."""
    origin = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        port = origin.sockets[0].getsockname()[1]
        async with loopback_proxy(tmp_path, monkeypatch, POLICY, local(port), **settings) as proxy:
            yield proxy
    finally:
        origin.close()


async def connect_h2(proxy: LoopbackProxy, kind: type[ClientT] = H2Client) -> ClientT:
    """A client of kind (H2Client by default) connected to the proxy."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(kind, proxy.host, proxy.port)
    return client


async def all_answered(answers: Iterable[Answer]) -> None:
    """Until every one of answers is complete, TIMEOUT for them all."""
    async with asyncio.timeout(TIMEOUT):
        for answer in answers:
            await answer.done.wait()


async def only_handler(proxy: LoopbackProxy) -> Any:
    """The H2Proxy of the proxy's one open connection, once there is one."""
    async with asyncio.timeout(TIMEOUT):
        while not any(flow.handler for flow in proxy.context.open_flows.flows):
            await asyncio.sleep(0.01)
    (flow,) = proxy.context.open_flows.flows
    return flow.handler


def frames_of(buffer: bytearray) -> Iterator[tuple[int, bytes]]:
    """The whole frames at the start of buffer as (type, bytes), taken out of it."""
    while len(buffer) >= 9:
        size = 9 + int.from_bytes(buffer[:3], "big")
        if len(buffer) < size:
            return
        frame = bytes(buffer[:size])
        del buffer[:size]
        yield frame[3], frame


@pytest.mark.asyncio
async def test_idle_connection_ends_with_goaway_and_a_busy_one_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's idle sweep ends an h2 connection that moved no byte for the idle
    timeout (within a quarter more), and leaves alone one that keeps asking."""
    idle_timeout = 0.4
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(
            tmp_path, monkeypatch, POLICY, local(port), idle_timeout=idle_timeout
        ) as proxy:
            idle, busy = await connect_h2(proxy), await connect_h2(proxy)
            for client in (idle, busy):
                async with asyncio.timeout(TIMEOUT):
                    await client.request("GET", "/a").done.wait()
            quiet_since = loop.time()
            for _ in range(20):  # one second of requests: more than two idle timeouts
                async with asyncio.timeout(TIMEOUT):
                    await busy.request("GET", "/a").done.wait()
                await asyncio.sleep(0.05)
            async with asyncio.timeout(TIMEOUT):
                await idle.lost.wait()
            busy_alive = not busy.lost.is_set()
            busy.transport.close()
            await proxy.wait_closed_flows(2)
    finally:
        origin.close()
    assert idle.goaway, "the idle connection got a GOAWAY before it was closed"
    assert busy_alive, "the busy connection stayed open"
    # The proxy's last byte on it went out a little before the client read it (quiet_since).
    assert idle_timeout - 0.05 <= idle.lost_at - quiet_since < idle_timeout * 1.25 + 0.6
    assert sorted(flow.error for flow in proxy.ledger.flows) == ["", "idle_timeout"]


@pytest.mark.asyncio
async def test_streams_are_decided_and_multiplexed(h2_setup: tuple[LoopbackProxy, int]) -> None:
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    total = 5 << 20
    upload = bytes(range(256)) * 12000
    allowed = client.request("GET", "/a?x=1", headers={"x-test": "kept"})
    denied = client.request("GET", "/denied/thing")
    download = client.request("GET", f"/bytes/{total}")
    posted = client.request("POST", "/upload", upload)
    await all_answered((allowed, denied, download, posted))
    assert allowed.headers[":status"] == "200"
    echoed = json.loads(allowed.body)
    assert ["x-test", "kept"] in echoed["headers"]
    assert [":path", "/a?x=1"] in echoed["headers"]
    assert (denied.headers[":status"], bytes(denied.body)) == ("403", b"traffic not allowed\n")
    expected = hashlib.sha256(b"".join(deterministic_chunks(total))).hexdigest()
    assert hashlib.sha256(download.body).hexdigest() == expected
    assert json.loads(posted.body)["body"] == {
        "length": len(upload),
        "sha256": hashlib.sha256(upload).hexdigest(),
    }
    client.transport.close()
    await proxy.wait_closed_flows(1)
    statuses = sorted((r.path, r.status) for r in proxy.ledger.requests)
    assert statuses == [
        ("/a", 200),
        (f"/bytes/{total}", 200),
        ("/denied/thing", 403),
        ("/upload", 200),
    ]


@pytest.mark.asyncio
async def test_a_reload_reaches_the_next_stream_of_an_open_connection(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """Each stream is decided by the policy in force when it opens, as Linkerd routes
    each request by the routes it last heard of: a reload reaches an open connection."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    statuses = []
    for text in (POLICY, POLICY.replace("pathPrefix: /denied", "pathPrefix: /switch"), POLICY):
        if statuses:
            Path(proxy.context.settings.policy_file).write_text(text)
            assert await proxy.context.policy.reload(force=True)
        answer = client.request("GET", "/switch")
        async with asyncio.timeout(TIMEOUT):
            await answer.done.wait()
        statuses.append(answer.headers[":status"])
    client.transport.close()
    await proxy.wait_closed_flows(1)
    assert statuses == ["200", "403", "200"]
    assert [r.status for r in proxy.ledger.requests] == [200, 403, 200]


@pytest.mark.asyncio
async def test_unreachable_upstream_gives_502(h2_setup: tuple[LoopbackProxy, int]) -> None:
    proxy, _ = h2_setup
    proxy.destination[0] = local(closed_port())
    client = await connect_h2(proxy)
    answers = [client.request("GET", path) for path in ("/a", "/b", "/c")]
    await all_answered(answers)
    for answer in answers:
        assert (answer.headers[":status"], bytes(answer.body)) == (
            "502",
            b"upstream connect_refused\n",
        )
    client.transport.close()
    await proxy.wait_closed_flows(1)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(502, "connect_refused")] * 3
    assert proxy.ledger.connect_failures == ["connect_refused"], "one connect, counted once"


@pytest.mark.asyncio
async def test_a_body_no_upstream_took_is_not_counted_as_sent(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """egress_sent_bytes_total counts bytes sent towards an upstream: a body held while
    the connect failed went nowhere (HTTP/1 counted 0, h2 counted it all)."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    sent = client.request("POST", "/sent", bytes(1000))
    async with asyncio.timeout(TIMEOUT):
        await sent.done.wait()
    client.transport.close()
    proxy.destination[0] = local(closed_port())
    client = await connect_h2(proxy)
    refused = client.request("POST", "/refused", bytes(1000))
    async with asyncio.timeout(TIMEOUT):
        await refused.done.wait()
    client.transport.close()
    await proxy.wait_closed_flows(2)
    assert sorted((r.path, r.status, r.bytes_from_client) for r in proxy.ledger.requests) == [
        ("/refused", 502, 0),
        ("/sent", 200, 1000),
    ]


class ClosedWindowClient(H2Client):
    """Gives the server no window for stream data (SETTINGS_INITIAL_WINDOW_SIZE 0) until
    it opens one stream's window itself."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        )
        super().connection_made(transport)

    def open_window(self, stream_id: int, size: int) -> None:
        self.h2.increment_flow_control_window(size, stream_id)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_local_answer_waits_for_the_clients_window(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """A 403 whose body the client has no window for yet is sent once the window opens;
    the connection and the client's other streams carry on meanwhile."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy, ClosedWindowClient)
    denied = client.request("GET", "/denied/thing")
    async with asyncio.timeout(TIMEOUT):
        while ":status" not in denied.headers:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert (denied.headers[":status"], bytes(denied.body)) == ("403", b"")
    assert not denied.done.is_set() and not client.lost.is_set()
    client.open_window(1, 64)
    async with asyncio.timeout(TIMEOUT):
        await denied.done.wait()
    assert (bytes(denied.body), denied.reset) == (b"traffic not allowed\n", False)
    allowed = client.request("GET", "/a")
    async with asyncio.timeout(TIMEOUT):
        while ":status" not in allowed.headers:
            await asyncio.sleep(0.01)
    assert allowed.headers[":status"] == "200"
    client.transport.close()
    await proxy.wait_closed_flows(1)
    assert ("/denied/thing", 403, "") in [
        (r.path, r.status, r.error) for r in proxy.ledger.requests
    ]


@pytest.mark.asyncio
async def test_streams_waiting_when_the_connection_goes_idle_are_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing moved for --idle-timeout: each waiting stream gets 504 (a gRPC call
    UNAVAILABLE) with error=idle_timeout, as HTTP/1 answers, then the GOAWAY."""
    async with proxy_to_origin(Silent(), tmp_path, monkeypatch, POLICY, idle_timeout=0.4) as proxy:
        client = await connect_h2(proxy)
        plain = client.request("GET", "/a")
        call = client.request(
            "POST", "/test.Echo/Echo", headers={"content-type": "application/grpc"}
        )
        async with asyncio.timeout(TIMEOUT):
            await plain.done.wait()
            await call.done.wait()
            await client.lost.wait()
        await proxy.wait_closed_flows(1)
    assert (plain.headers[":status"], bytes(plain.body)) == ("504", b"upstream idle_timeout\n")
    assert call.headers["grpc-status"] == "14"
    assert client.goaway
    outcomes = sorted((r.path, r.status, r.grpc_status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [
        ("/a", 504, None, "idle_timeout"),
        ("/test.Echo/Echo", 504, 14, "idle_timeout"),
    ]


@pytest.mark.asyncio
async def test_a_stream_times_out_alone_while_its_connection_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--idle-timeout was the connection's alone: a client sending PINGs (gRPC keepalive)
    or using other streams kept a stream its upstream never answers waiting for ever. The
    stream gets 504 idle_timeout once none of its bytes moved for the timeout, and the
    connection goes on."""
    async with proxy_to_origin(Silent(), tmp_path, monkeypatch, POLICY, idle_timeout=0.4) as proxy:
        client = await connect_h2(proxy)
        hung = client.request("GET", "/a")
        async with asyncio.timeout(TIMEOUT):
            while not hung.done.is_set():
                client.h2.ping(b"keepbusy")
                client.transport.write(client.h2.data_to_send())
                await asyncio.sleep(0.1)
        assert not (client.lost.is_set() or client.goaway)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (hung.headers[":status"], bytes(hung.body)) == ("504", b"upstream idle_timeout\n")
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/a", 504, "idle_timeout")
    ]


@pytest.mark.asyncio
async def test_streams_cut_by_the_drain_timeout_say_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = Silent()
    async with proxy_to_origin(silent, tmp_path, monkeypatch, POLICY) as proxy:
        client = await connect_h2(proxy)
        waiting = client.request("GET", "/slow")
        async with asyncio.timeout(TIMEOUT):
            await silent.arrived.wait()
        for flow in list(proxy.context.open_flows.flows):
            flow.abort()  # what the drain timeout does to what is left
        async with asyncio.timeout(TIMEOUT):
            await client.lost.wait()
        await proxy.wait_closed_flows(1)
    assert not waiting.done.is_set()
    assert [(r.path, r.error) for r in proxy.ledger.requests] == [("/slow", "drain")]
    assert [f.error for f in proxy.ledger.flows] == ["drain"]


class SlowH2Origin(asyncio.Protocol):
    """An h2 origin that answers each stream 200 "late" after DELAY, and says SETTINGS with
    a limit of LIMIT concurrent streams."""

    DELAY = 0.3
    LIMIT = 2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.LIMIT},
        )
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                asyncio.get_running_loop().call_later(self.DELAY, self.answer, event.stream_id)
        self.transport.write(self.h2.data_to_send())

    def answer(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "4")])
            self.h2.send_data(stream_id, b"late", end_stream=True)
        self.transport.write(self.h2.data_to_send())

    def answer_and_close(self, stream_id: int) -> None:
        self.answer(stream_id)
        self.transport.close()


@pytest_asyncio.fixture
async def slow_h2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LoopbackProxy]:
    async with proxy_to_h2_origin(SlowH2Origin, tmp_path, monkeypatch) as proxy:
        yield proxy


@pytest.mark.asyncio
async def test_a_burst_waits_for_the_upstreams_stream_limit(slow_h2: LoopbackProxy) -> None:
    """Ten streams at once on a new upstream that takes two at a time: none is sent before
    its SETTINGS say so, so none is refused, and all ten are answered."""
    client = await connect_h2(slow_h2)
    answers = [client.request("GET", f"/{number}") for number in range(10)]
    await all_answered(answers)
    assert [(a.headers[":status"], bytes(a.body)) for a in answers] == [("200", b"late")] * 10
    client.transport.close()
    await slow_h2.wait_closed_flows(1)


@pytest.mark.asyncio
async def test_drain_lets_streams_in_flight_finish(slow_h2: LoopbackProxy) -> None:
    """A graceful stop: the client gets a GOAWAY at once and still gets the answer of the
    stream in flight, then the connection closes. (curl: the h2 library itself accepts no
    frame after a GOAWAY, so its client cannot show this.)"""
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "--http2-prior-knowledge",
        f"http://{slow_h2.host}:{slow_h2.port}/slow",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(TIMEOUT):
        while not any(flow.handler for flow in slow_h2.context.open_flows.flows):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        for flow in list(slow_h2.context.open_flows.flows):
            flow.drain()
        out, err = await curl.communicate()
    assert (curl.returncode, out) == (0, b"late"), err
    await slow_h2.wait_closed_flows(1)
    assert [(r.path, r.status, r.error) for r in slow_h2.ledger.requests] == [("/slow", 200, "")]


def request_bytes(split_head: bool) -> bytes:
    """A client's preface, SETTINGS and one GET's head: one HEADERS frame, or (split_head)
    a HEADERS frame without END_HEADERS and a CONTINUATION that ends the block."""
    client = h2.connection.H2Connection()
    client.initiate_connection()
    start = client.data_to_send()
    head = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test"),
            (":path", "/bytes/10"), ("x-padding", "p" * 64)]  # fmt: skip
    client.send_headers(1, head, end_stream=True)
    headers = client.data_to_send()
    if not split_head:
        return start + headers
    block = headers[9:]
    first = hyperframe.frame.HeadersFrame(1, data=block[:10], flags=["END_STREAM"])
    rest = hyperframe.frame.ContinuationFrame(1, data=block[10:], flags=["END_HEADERS"])
    return start + first.serialize() + rest.serialize()


@pytest.mark.asyncio
@pytest.mark.parametrize("split_head", [False, True], ids=["headers", "continuation"])
async def test_a_request_head_trickled_past_the_header_timeout_ends_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split_head: bool
) -> None:
    """--header-timeout held for HTTP/1 heads only: an h2 client trickling its HEADERS (or
    its CONTINUATIONs) a byte now and then kept its connection, and a few hundred such
    took every place against --max-connections. With no stream to answer 408 on, the
    connection gets a GOAWAY and ends; a head that comes whole in time is answered."""
    async with proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, header_timeout=0.5) as proxy:
        loop = asyncio.get_running_loop()
        data = request_bytes(split_head)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(data[:-5])
        started = loop.time()
        async with asyncio.timeout(TIMEOUT):
            for byte in data[-5:-1]:  # a byte every 0.2 s, never the last
                await asyncio.sleep(0.2)
                writer.write(bytes([byte]))
            answer = bytearray(await reader.read())
        ended = loop.time() - started
        kinds = [kind for kind, _ in frames_of(answer)]
        writer.close()
        await proxy.wait_closed_flows(1)
        assert hyperframe.frame.GoAwayFrame.type in kinds
        assert 0.5 <= ended < 3.5, ended
        assert [flow.error for flow in proxy.ledger.flows] == ["header_timeout"]
        assert proxy.ledger.requests == []

        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(data[:-5])
        await asyncio.sleep(0.3)
        writer.write(data[-5:])
        async with asyncio.timeout(TIMEOUT):
            while not proxy.ledger.requests:
                await asyncio.sleep(0.01)
        writer.close()
        assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")]


class GoawayReadingClient(H2Client):
    """Reads on after a GOAWAY from the proxy: the h2 library would refuse every frame after
    it, the answers of streams in flight too, so GOAWAY frames are taken out here."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.unread = bytearray()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.unread += data
        for kind, frame in frames_of(self.unread):
            if kind == hyperframe.frame.GoAwayFrame.type:
                self.goaway = True
            else:
                super().data_received(frame)


class SlowReadingClient(GoawayReadingClient):
    """Reads a little at a time (a small receive buffer, a pause after each read), and
    acknowledges each DATA frame as it reads it, as h2's and Go's clients do: WINDOW_UPDATEs
    keep coming until its last frame is read. lost_with: how its connection ended."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_with: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.h2.increment_flow_control_window(1 << 20)
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(0.002, self.transport.resume_reading)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_with = exc
        super().connection_lost(exc)


@pytest.mark.asyncio
async def test_a_stream_the_drain_lets_finish_keeps_its_end_for_a_slow_reader(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """The drain let a download finish, then closed the connection with the slow client's
    WINDOW_UPDATEs unread: the kernel reset it, and the reset dropped the stream's last
    frames not yet sent, its END_STREAM with them, while the log said 200 and no error.
    Our FIN now follows them, and the client is read until it closes."""
    proxy, _ = h2_setup
    size = 4 << 20
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (proxy.host, proxy.port))
    _, client = await loop.create_connection(SlowReadingClient, sock=sock)
    answer = client.request("GET", f"/bytes/{size}")
    async with asyncio.timeout(TIMEOUT):
        while len(answer.body) < 256 * 1024:
            await asyncio.sleep(0.01)
        for flow in list(proxy.context.open_flows.flows):
            flow.drain()
        await client.lost.wait()
    assert (len(answer.body), answer.done.is_set(), answer.reset) == (size, True, False)
    assert client.lost_with is None, "the connection was reset"
    await proxy.wait_closed_flows(1)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")]


def goaway(last_stream_id: int) -> bytes:
    """A GOAWAY frame (NO_ERROR), written past the h2 library: its own close_connection()
    would make it refuse every frame after, the answers of streams in flight too."""
    return hyperframe.frame.GoAwayFrame(0, last_stream_id=last_stream_id).serialize()


def test_goaway_filter_takes_out_goaways_however_the_bytes_are_cut() -> None:
    """Every cut of a preface and frames into two reads, and one byte a read: h2 gets all
    but the GOAWAYs, in order, and each GOAWAY comes out once, whole."""
    frame = hyperframe.frame
    before = frame.SettingsFrame(0).serialize() + frame.DataFrame(1, b"x" * 40).serialize()
    inside = frame.HeadersFrame(3, b"abc").serialize()  # no END_HEADERS: a block is open
    after = frame.ContinuationFrame(3, b"d", flags=["END_HEADERS"]).serialize() + goaway(9)[:9]
    wire = H2_PREFACE + before + goaway(3) + inside + goaway(5) + after
    expected = H2_PREFACE + before + inside + goaway(5) + after
    cuts = [[wire[:cut], wire[cut:]] for cut in range(len(wire) + 1)]
    for reads in [*cuts, [wire[i : i + 1] for i in range(len(wire))]]:
        goaways = GoawayFilter(len(H2_PREFACE))
        kept, found = b"", []
        for data in reads:
            part, frames = goaways.split(data, 16384)
            kept += part
            found += frames
        kept += goaways.held  # a header that is not whole yet is held back, not lost
        assert kept == expected
        assert [f.last_stream_id for f in found] == [3]


@pytest.mark.asyncio
async def test_a_client_goaway_lets_its_streams_in_flight_finish(
    slow_h2: LoopbackProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's GOAWAY says it opens no more streams, not that it wants no more answers
    (RFC 9113 6.8): the stream it opened before is still answered, the proxy says GOAWAY
    in turn, and the connection closes once nothing is in flight."""
    client = await connect_h2(slow_h2, GoawayReadingClient)
    answer = client.request("GET", "/slow")
    await only_handler(slow_h2)
    client.transport.write(goaway(0))
    async with asyncio.timeout(TIMEOUT):
        await answer.done.wait()
        await client.lost.wait()
    await slow_h2.wait_closed_flows(1)
    assert (answer.headers[":status"], bytes(answer.body), answer.reset) == ("200", b"late", False)
    assert client.goaway
    assert [(r.path, r.status, r.error) for r in slow_h2.ledger.requests] == [("/slow", 200, "")]
    assert [f.error for f in slow_h2.ledger.flows] == [""]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


BAD_PING = b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc"
"""A PING frame three bytes long (RFC 9113 6.7: eight): h2 fails the connection on it."""


@pytest.mark.asyncio
async def test_a_client_reset_on_a_failed_upstream_ends_only_its_stream(
    slow_h2: LoopbackProxy,
) -> None:
    """An upstream that broke the protocol is cut, and h2 refuses every frame to it from
    the error on. A client's RST_STREAM read on the same turn, for a stream on that
    upstream (already answered 502, as the upstream is lost at once), must not raise out
    of data_received and take the client's connection down with it."""
    client = await connect_h2(slow_h2)
    client.request("GET", "/first")
    second = client.request("GET", "/second")
    client.transport.write(client.h2.data_to_send())
    handler = await only_handler(slow_h2)
    first_id, second_id = sorted(client.answers)
    async with asyncio.timeout(TIMEOUT):
        while not all(
            stream_id in handler.streams and handler.streams[stream_id].upstream_id
            for stream_id in (first_id, second_id)
        ):
            await asyncio.sleep(0.01)
    upstream = handler.streams[first_id].upstream
    handler.upstream_data(upstream, BAD_PING)
    client.h2.reset_stream(first_id, h2.errors.ErrorCodes.CANCEL)
    handler.data_received(client.h2.data_to_send())
    async with asyncio.timeout(TIMEOUT):
        await second.done.wait()
    assert second.headers[":status"] == "502"
    assert not client.lost.is_set(), "the client's connection outlives its upstream"
    client.transport.close()
    await slow_h2.wait_closed_flows(1)
    errors = sorted((record.path, record.error) for record in slow_h2.ledger.requests)
    assert errors == [("/first", "bad_response"), ("/second", "bad_response")]


@pytest.mark.asyncio
@pytest.mark.parametrize("frame", ["new stream", "body data"])
async def test_client_frames_read_on_the_turn_an_upstream_fails_do_not_reach_it(
    slow_h2: LoopbackProxy, frame: str
) -> None:
    """An upstream that broke the protocol is lost at once, not on the later turn of the
    loop its connection_lost comes on: a new stream read on the same turn goes on a new
    upstream connection, and an upload's next DATA frame is dropped with its stream's 502,
    instead of reaching the closed h2 connection (a ProtocolError out of data_received
    would take the client's whole connection down)."""
    client = await connect_h2(slow_h2)
    upload_id, upload = client.open_stream("POST", "/upload")
    handler = await only_handler(slow_h2)
    async with asyncio.timeout(TIMEOUT):
        while upload_id not in handler.streams or not handler.streams[upload_id].upstream_id:
            await asyncio.sleep(0.01)
    handler.upstream_data(handler.streams[upload_id].upstream, BAD_PING)
    if frame == "new stream":
        later_id = client.h2.get_next_available_stream_id()
        block = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test"),
                 (":path", "/later")]  # fmt: skip
        client.h2.send_headers(later_id, block, end_stream=True)
        later = client.answers[later_id] = Answer()
    else:
        client.h2.send_data(upload_id, b"the rest", end_stream=True)
    handler.data_received(client.h2.data_to_send())
    async with asyncio.timeout(TIMEOUT):
        await upload.done.wait()
        if frame == "new stream":
            await later.done.wait()
    assert upload.headers[":status"] == "502"
    if frame == "new stream":
        assert (later.headers[":status"], bytes(later.body)) == ("200", b"late")
    assert not client.lost.is_set(), "the client's connection outlives its upstream"
    client.transport.close()
    await slow_h2.wait_closed_flows(1)
    errors = {record.path: record.error for record in slow_h2.ledger.requests}
    assert errors["/upload"] == "bad_response"


@pytest.mark.asyncio
async def test_a_window_opened_by_settings_restarts_a_download(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """The client raises SETTINGS_INITIAL_WINDOW_SIZE instead of sending WINDOW_UPDATEs."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy, ClosedWindowClient)
    download = client.request("GET", "/bytes/50000")
    async with asyncio.timeout(TIMEOUT):
        while ":status" not in download.headers:
            await asyncio.sleep(0.01)
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        client.transport.write(client.h2.data_to_send())
        await download.done.wait()
    assert len(download.body) == 50000
    client.transport.close()
    await proxy.wait_closed_flows(1)


class WatchedH2Server(H2Server):
    """H2Server, kept in `connections`, noting the largest window the proxy gave it on any
    stream."""

    def __init__(self, connections: list[WatchedH2Server]) -> None:
        super().__init__()
        connections.append(self)
        self.largest_window = 0

    def _pump(self, stream_id: int) -> None:
        window = self.h2.local_flow_control_window(stream_id)
        self.largest_window = max(self.largest_window, window)
        super()._pump(stream_id)

    def blocked(self, streams: int) -> bool:
        """Whether it has this many answers begun and no window to send more of any."""
        pending = list(self.pending)
        return len(pending) == streams and not any(map(self.h2.local_flow_control_window, pending))


def held(handler: Any) -> int:
    """What the proxy holds for the client of an H2Proxy."""
    return sum(len(stream.to_client) for stream in handler.streams.values())


UPSTREAM_CONNECTION_WINDOW = (
    egressproxy.http2.MAX_CONCURRENT_STREAMS + 1
) * UPSTREAM_STREAM_WINDOW + egressproxy.http2.UPSTREAM_GROWTH_POOL


@pytest.mark.asyncio
async def test_downloads_the_client_resets_give_back_the_upstream_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the proxy held for a reset stream is given back upstream: the upstream's
    connection window is whole again (but for less than one stream's window, its
    WINDOW_UPDATEs going in batches), not short of it for good."""
    connections: list[WatchedH2Server] = []
    factory = lambda: WatchedH2Server(connections)  # noqa: E731
    async with proxy_to_h2_origin(factory, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, ClosedWindowClient)
        for _ in range(17):
            client.request("GET", "/bytes/3000000")
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while (
                not (connections and connections[0].blocked(17))
                or held(handler) < 17 * UPSTREAM_STREAM_WINDOW
            ):
                await asyncio.sleep(0.01)
            for stream_id in list(client.answers):
                client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.transport.write(client.h2.data_to_send())
            while handler.streams:
                await asyncio.sleep(0.01)
            last = client.request("GET", "/bytes/1000")
            client.open_window(max(client.answers), 5000)
            await last.done.wait()
            window = connections[0].h2.outbound_flow_control_window
            while window <= UPSTREAM_CONNECTION_WINDOW - UPSTREAM_STREAM_WINDOW:
                await asyncio.sleep(0.01)
                window = connections[0].h2.outbound_flow_control_window
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert len(last.body) == 1000
    assert window <= UPSTREAM_CONNECTION_WINDOW


@pytest.mark.asyncio
async def test_streams_a_client_leaves_unread_leave_the_upstream_window_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty downloads the client reads nothing of: each holds its stream's first window
    (64 KiB) in the proxy, and a further request on the connection is answered at once.
    Each stream's window was 1 MiB in a 16 MiB connection window, so sixteen of them took
    all of it and the upstream could send nothing more on any stream (forty unread grpcio
    server streams: a 41st call ran into its deadline)."""
    connections: list[WatchedH2Server] = []
    factory = lambda: WatchedH2Server(connections)  # noqa: E731
    async with proxy_to_h2_origin(factory, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, ClosedWindowClient)
        for _ in range(40):
            client.request("GET", "/bytes/2000000")
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while (
                not (connections and connections[0].blocked(40))
                or held(handler) < 40 * UPSTREAM_STREAM_WINDOW
            ):
                await asyncio.sleep(0.01)
        each = [len(stream.to_client) for stream in handler.streams.values()]
        last = client.request("GET", "/bytes/1000")
        client.open_window(max(client.answers), 5000)
        async with asyncio.timeout(TIMEOUT):
            await last.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert len(last.body) == 1000
    assert each == [UPSTREAM_STREAM_WINDOW] * 40


class WideOpenClient(H2Client):
    """Reads every stream as it comes, through windows of 16 MiB: never the bottleneck."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 << 20}
        )
        super().connection_made(transport)
        self.h2.increment_flow_control_window(16 << 20)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_download_the_client_keeps_up_with_grows_its_upstream_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream starts with a 64 KiB window upstream; as its client takes what comes at
    once, the window grows to STREAM_WINDOW (1 MiB), which keeps a download's speed over
    a long round trip, and no further."""
    connections: list[WatchedH2Server] = []
    factory = lambda: WatchedH2Server(connections)  # noqa: E731
    total = 8 << 20
    async with proxy_to_h2_origin(factory, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, WideOpenClient)
        download = client.request("GET", f"/bytes/{total}")
        async with asyncio.timeout(TIMEOUT):
            await download.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    expected = hashlib.sha256(b"".join(deterministic_chunks(total))).hexdigest()
    assert hashlib.sha256(download.body).hexdigest() == expected
    assert STREAM_WINDOW // 2 < connections[0].largest_window <= STREAM_WINDOW


class UnreadClient(H2Client):
    """Offers each stream 256 KiB and its connection 64 MiB, and acknowledges nothing: a
    client that takes the first bytes of its downloads at once, then stops reading."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 256 << 10}
        )
        super().connection_made(transport)
        self.h2.increment_flow_control_window(64 << 20)
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.answers[event.stream_id].headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self.answers[event.stream_id].body += event.data
        self.transport.write(self.h2.data_to_send())

    def open_window(self, stream_id: int, size: int) -> None:
        self.h2.increment_flow_control_window(size, stream_id)
        self.transport.write(self.h2.data_to_send())


def held_by_all(proxy: LoopbackProxy) -> int:
    """What the proxy holds for all its h2 clients."""
    return sum(held(flow.handler) for flow in proxy.context.open_flows.flows if flow.handler)


async def until_blocked(proxy: LoopbackProxy, origins: list[WatchedH2Server], streams: int) -> int:
    """Until each origin has `streams` answers begun and no window left on any, and what
    the proxy holds has stopped changing; what it holds then."""
    async with asyncio.timeout(TIMEOUT):
        last = -1
        while True:
            await asyncio.sleep(0.2)
            now = held_by_all(proxy)
            if now == last and all(origin.blocked(streams) for origin in origins):
                return now
            last = now


@pytest.mark.asyncio
async def test_what_unread_clients_make_a_worker_hold_is_bounded_worker_wide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six clients each take the first bytes of sixteen downloads at once, so each stream
    grows its window, then read nothing more. Each upstream connection had its own 16 MiB
    growth pool, so each client made the worker hold 16 MiB past the streams' reserves,
    and more clients more, without bound (96 MiB here). The growth past the reserves is
    drawn from one budget for the whole worker, and given back as the streams end."""
    origins: list[WatchedH2Server] = []
    factory = lambda: WatchedH2Server(origins)  # noqa: E731
    clients, streams = 6, 16
    async with proxy_to_h2_origin(factory, tmp_path, monkeypatch) as proxy:
        readers = [await connect_h2(proxy, UnreadClient) for _ in range(clients)]
        for client in readers:
            for _ in range(streams):
                client.request("GET", "/bytes/4000000")
        total = await until_blocked(proxy, origins, streams)
        for client in readers:
            client.transport.close()
        await proxy.wait_closed_flows(clients)
    budget = egressproxy.http2.WORKER_GROWTH_BUDGET
    assert total <= clients * streams * UPSTREAM_STREAM_WINDOW + budget
    assert egressproxy.http2.GROWTH_BUDGET.free == budget, "all of it given back"


@pytest.mark.asyncio
async def test_a_stream_whose_client_reads_slowly_gives_its_growth_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download grew its window to 1 MiB while its client kept up; then the client
    took nothing for over a second, and now takes its data a piece at a time. What it
    takes is no longer sent for again past the stream's reserve: the proxy holds less and
    less for it, and what the stream drew goes back to the worker's budget. It was sent
    for again at once, so the proxy kept holding 1 MiB for a client that slow."""
    origins: list[WatchedH2Server] = []
    factory = lambda: WatchedH2Server(origins)  # noqa: E731
    piece = 256 << 10
    async with proxy_to_h2_origin(factory, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, UnreadClient)
        download = client.request("GET", "/bytes/8000000")
        (stream_id,) = client.answers
        before = await until_blocked(proxy, origins, 1)
        assert before > STREAM_WINDOW - STREAM_WINDOW // 16, "it grew, and its client stopped"
        await asyncio.sleep(1.1)
        for taken in range(1, 4):
            client.open_window(stream_id, piece)
            async with asyncio.timeout(TIMEOUT):
                while len(download.body) < (taken + 1) * piece:
                    await asyncio.sleep(0.01)
        after = await until_blocked(proxy, origins, 1)
        handler = await only_handler(proxy)
        (stream,) = handler.streams.values()
        limit = stream.upstream_window.limit
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert after == before - 3 * piece
    assert limit == after
    assert egressproxy.http2.GROWTH_BUDGET.free == egressproxy.http2.WORKER_GROWTH_BUDGET


class EarlyH2Origin(SlowH2Origin):
    """Answers each request as its HEADERS come, without waiting for the body (RFC 9113
    8.1 allows it), with a limit of 2 concurrent streams."""

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.h2.send_headers(event.stream_id, [(":status", "200")])
                self.h2.send_data(event.stream_id, b"early", end_stream=True)
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_an_answer_before_the_request_ends_frees_the_upstream_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four uploads in turn that the upstream answers early, against its limit of two: each
    frees its upstream stream, so none waits for a slot that never comes."""
    async with proxy_to_h2_origin(EarlyH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        for number in range(4):
            stream_id, answer = client.open_stream("POST", f"/up{number}")
            client.h2.send_data(stream_id, b"partial")
            client.transport.write(client.h2.data_to_send())
            async with asyncio.timeout(TIMEOUT):
                await answer.done.wait()
            assert (answer.headers[":status"], bytes(answer.body)) == ("200", b"early")
        client.transport.close()
        await proxy.wait_closed_flows(1)


class ResettingH2Origin(SlowH2Origin):
    """Answers /reset/<code> with a 200 and some data, then resets the stream with that code."""

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                self.h2.send_headers(event.stream_id, [(":status", "200")])
                self.h2.send_data(event.stream_id, b"part")
                self.h2.reset_stream(event.stream_id, int(path.rpartition(b"/")[2]))
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_an_upstream_reset_keeps_its_error_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream the upstream resets after its response began is reset toward the client
    with the upstream's own code: INTERNAL_ERROR is not the same news as CANCEL."""
    codes = [h2.errors.ErrorCodes.INTERNAL_ERROR, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    async with proxy_to_h2_origin(ResettingH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        answers = [client.request("GET", f"/reset/{int(code)}") for code in codes]
        await all_answered(answers)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert [(a.headers[":status"], a.reset_code) for a in answers] == [
        ("200", code) for code in codes
    ]
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "reset")] * 2


WHOLE_BODY = bytes(range(256)) * 240
"""61,440 bytes: within an upstream stream's first window, more than a SmallWindowClient's,
so the proxy holds some of it."""


class SmallWindowClient(H2Client):
    """Reads every stream as it comes, through windows of 16 KiB."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384}
        )
        super().connection_made(transport)


class CompleteThenGoneH2Origin(asyncio.Protocol):
    """Answers each request at once with WHOLE_BODY and END_STREAM, then closes its
    connection (GOAWAY and FIN, as a graceful shutdown does), or with `reset`, resets the
    stream with NO_ERROR (RFC 9113 8.1: the whole answer came before the request's end).
    One stream at a time."""

    reset = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}
        )
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                stream_id = event.stream_id
                length = str(len(WHOLE_BODY))
                self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", length)])
                rest = memoryview(WHOLE_BODY)
                while rest:
                    size = min(self.h2.local_flow_control_window(stream_id), 16384, len(rest))
                    assert size > 0, "the proxy offers a window larger than the body"
                    self.h2.send_data(stream_id, bytes(rest[:size]))
                    rest = rest[size:]
                self.h2.end_stream(stream_id)
                if self.reset:
                    if event.stream_ended is None:
                        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
                else:
                    self.h2.close_connection()
                    self.transport.write(self.h2.data_to_send())
                    self.transport.close()
                    return
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.transport.write(self.h2.data_to_send())


class ResetAfterWholeAnswerH2Origin(CompleteThenGoneH2Origin):
    reset = True


@pytest.mark.asyncio
async def test_a_whole_answer_outlives_its_upstreams_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream sent all of its answer and closed; what the client's window still
    held back was reset as INTERNAL_ERROR (for gRPC: its last messages and its status)."""
    async with proxy_to_h2_origin(CompleteThenGoneH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, SmallWindowClient)
        answer = client.request("GET", "/whole")
        async with asyncio.timeout(TIMEOUT):
            await answer.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (answer.reset, bytes(answer.body) == WHOLE_BODY) == (False, True)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")]


@pytest.mark.asyncio
async def test_a_whole_answer_outlives_an_upstream_reset_with_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1: after a whole answer, a server may reset a request still being sent
    with NO_ERROR, and a client MUST NOT discard the answer for it. The proxy passed the
    reset on at once, before what it still held of the answer."""
    async with proxy_to_h2_origin(ResetAfterWholeAnswerH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, SmallWindowClient)
        stream_id, answer = client.open_stream("POST", "/upload")
        client.h2.send_data(stream_id, b"first part")
        client.transport.write(client.h2.data_to_send())
        follow_up = client.request("GET", "/again")  # waits for the upstream's one slot
        async with asyncio.timeout(TIMEOUT):
            await answer.done.wait()
            await follow_up.done.wait()
            while not answer.reset:  # the request's end is still to be told off
                await asyncio.sleep(0.01)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert bytes(answer.body) == WHOLE_BODY
    assert answer.reset_code == h2.errors.ErrorCodes.NO_ERROR
    assert bytes(follow_up.body) == WHOLE_BODY, "the upstream's one slot was given on"
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/upload", 200, ""),
        ("/again", 200, ""),
    ]


@pytest.mark.asyncio
async def test_the_proxys_own_answer_to_head_has_no_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9110 9.3.2, as the HTTP/1 handler answers: curl failed on the body of a denied
    HEAD (PROTOCOL_ERROR), and h2 clients dropped the whole connection."""
    async with proxy_to_h2_origin(SlowH2Origin, tmp_path, monkeypatch) as proxy:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-I", "--max-time", "5", "--http2-prior-knowledge",
            f"http://{proxy.host}:{proxy.port}/denied/x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await curl.communicate()
        client = await connect_h2(proxy)
        head = client.request("HEAD", "/denied/x")
        after = client.request("GET", "/denied/y")
        async with asyncio.timeout(TIMEOUT):
            await head.done.wait()
            await after.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(2)
    assert curl.returncode == 0, err
    assert out.startswith(b"HTTP/2 403"), out
    assert (head.headers[":status"], bytes(head.body), head.reset) == ("403", b"", False)
    assert (after.headers[":status"], bytes(after.body)) == ("403", b"traffic not allowed\n")


@pytest.mark.asyncio
async def test_a_request_head_over_max_header_bytes_gets_431_on_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTERFACE: larger request heads get 431, as in HTTP/1. hpack's limit raised a
    connection error: a GOAWAY for every stream of the connection, and no count of the
    request. hyper's h2, Linkerd's, answers 431 on that stream alone."""
    async with proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, max_header_bytes=4096) as proxy:
        client = await connect_h2(proxy)
        big_at_once = client.request("GET", "/big", headers={"x-big": "a" * 8000})
        async with asyncio.timeout(TIMEOUT):
            await big_at_once.done.wait()  # our SETTINGS are acknowledged on the way
        big = client.request("GET", "/big", headers={"x-big": "a" * 8000})
        after = client.request("GET", "/after")
        async with asyncio.timeout(TIMEOUT):
            await big.done.wait()
            await after.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert [answer.headers[":status"] for answer in (big_at_once, big, after)] == [
        "431",
        "431",
        "200",
    ]
    assert not client.goaway
    outcomes = [(r.path, r.status, r.error) for r in proxy.ledger.requests]
    assert outcomes == [("/big", 431, "header_too_large")] * 2 + [("/after", 200, "")]


@given(st.binary(max_size=300))
def test_the_linear_huffman_coding_is_hpacks(value: bytes) -> None:
    """hpack's coder takes time quadratic in a value's length (a few KB of references to
    one long cookie cost seconds to forward); ours writes the same bytes, which decode back,
    and both the proxy's h2 connections use it."""
    hpacks = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    )
    ours = LinearHuffmanEncoder().encode(value)
    assert ours == hpacks.encode(value)
    assert hpack.huffman_table.decode_huffman(ours) == value
    for client_side in (False, True):
        connection = egressproxy.http2._Connection(client_side, 65536)
        assert isinstance(connection.encoder.huffman_coder, LinearHuffmanEncoder)


@pytest.mark.asyncio
async def test_a_head_over_max_header_bytes_is_refused_by_its_size_before_its_bytes_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h2's validation of a head walks every byte of its values in Python, and a head
    decodes up to four times --max-header-bytes: each one past the limit was walked before
    its size was seen. Now one too large gets 431 by its size, malformed or not (an
    upper-case name would be a reset)."""
    async with proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, max_header_bytes=4096) as proxy:
        client = await connect_h2(proxy, LaxH2Client)
        block = [*REQUEST, (":path", "/big")]
        big = client.send_block([*block, ("X-Big", "a" * 8000)])
        small = client.send_block([*block, ("X-Small", "a")])
        async with asyncio.timeout(TIMEOUT):
            await big.done.wait()
            await small.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (big.headers.get(":status"), small.headers.get(":status"), small.reset) == (
        "431",
        None,
        True,
    )


@pytest.mark.asyncio
async def test_grpc_calls_refused_for_their_head_get_grpc_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gRPC call whose metadata is past --max-header-bytes, or whose :authority is no
    host[:port], is answered as a gRPC server would (trailers-only, RESOURCE_EXHAUSTED and
    INTERNAL), not with an HTTP 431 or 400 a gRPC client reports as UNKNOWN or INTERNAL
    without the reason; the connection serves on."""
    grpc_call = {"content-type": "application/grpc", "te": "trailers"}
    async with proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, max_header_bytes=4096) as proxy:
        client = await connect_h2(proxy)
        calls = [
            client.request(
                "POST", "/test.Echo/Echo", b"\0\0\0\0\0", {**grpc_call, "x-big": "a" * 8000}
            ),
            client.request("POST", "/test.Echo/Echo", b"\0\0\0\0\0", grpc_call, "x.test:80:80"),
            client.request("GET", "/after"),
        ]
        await all_answered(calls)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    wire = [
        (call.headers[":status"], call.headers.get("grpc-status"), call.headers.get("grpc-message"))
        for call in calls
    ]
    assert wire == [
        ("200", "8", "request%20header%20fields%20too%20large"),
        ("200", "13", "bad%20request:%20malformed%20:authority"),
        ("200", None, None),
    ]
    outcomes = [(r.path, r.status, r.grpc_status, r.error) for r in proxy.ledger.requests]
    assert outcomes == [
        ("/test.Echo/Echo", 431, 8, "header_too_large"),
        ("/test.Echo/Echo", 400, 13, "bad_request"),
        ("/after", 200, None, ""),
    ]


class LargeHeadH2Origin(SlowH2Origin):
    """Answers a stream asking `x-head-bytes: N` after DELAY with a response head of N bytes
    or more (one header of N bytes, then `x-indexed: kept`, which HPACK then indexes) and no
    body, every
    other stream after 2 * DELAY on the same connection with 200 "late" and `x-indexed:
    kept` (sent as an index of the table the large head left). Keeps the (stream, code) of
    each reset."""

    LIMIT = 10
    resets: ClassVar[list[tuple[int, int | None]]] = []

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                size = dict(event.headers or []).get(b"x-head-bytes")
                later = functools.partial(self.reply, event.stream_id, int(size or 0))
                asyncio.get_running_loop().call_later(self.DELAY * (1 if size else 2), later)
            elif isinstance(event, h2.events.StreamReset):
                self.resets.append((event.stream_id, event.error_code))
        self.transport.write(self.h2.data_to_send())

    def reply(self, stream_id: int, size: int) -> None:
        """A large head has no body yet (so its stream is open to the proxy's reset)."""
        large = [("x-large", "a" * size)] if size else []
        headers = [(":status", "200"), ("content-length", "4"), *large, ("x-indexed", "kept")]
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the connection cut
            self.h2.send_headers(stream_id, headers)
            if not size:
                self.h2.send_data(stream_id, b"late", end_stream=True)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_response_head_too_large_fails_its_stream_not_the_upstream_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response head over 64 KiB (HTTP/1's limit, and the SETTINGS_MAX_HEADER_LIST_SIZE
    the upstream is told) is malformed (RFC 9113 10.5.1): its stream alone fails, 502
    bad_response, reset PROTOCOL_ERROR upstream; its block is still decoded, HPACK kept in
    step, and the stream beside it on that upstream is answered. hpack's limit raised a
    connection error: both streams got 502."""
    LargeHeadH2Origin.resets = []
    async with proxy_to_h2_origin(LargeHeadH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        large = client.request("GET", "/large", headers={"x-head-bytes": str(70_000)})
        good = client.request("GET", "/good")
        await all_answered((large, good))
        assert (large.headers[":status"], bytes(large.body)) == ("502", b"upstream bad_response\n")
        assert (good.headers[":status"], good.headers["x-indexed"]) == ("200", "kept")
        assert bytes(good.body) == b"late"
        assert LargeHeadH2Origin.resets == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
        client.transport.close()
        await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [("/good", 200, ""), ("/large", 502, "bad_response")]


@pytest.mark.asyncio
async def test_a_response_head_past_four_times_the_limit_ends_its_upstream_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past four times the limit decoding the head is the harm (an HPACK bomb): as for a
    client's request head, the upstream connection ends, and each stream on it gets 502."""
    async with proxy_to_h2_origin(LargeHeadH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        bomb = client.request("GET", "/bomb", headers={"x-head-bytes": str(4 * 65536)})
        beside = client.request("GET", "/beside")
        await all_answered((bomb, beside))
        assert [a.headers[":status"] for a in (bomb, beside)] == ["502", "502"]
        client.transport.close()
        await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [("/beside", 502, "bad_response"), ("/bomb", 502, "bad_response")]


class GoawayH2Origin(SlowH2Origin):
    """On its first connection, once more than REPLAY_LIMIT of request bodies is in: GOAWAY
    naming the first stream as the last it processes, which it then answers (after DELAY)
    before it closes. Later connections answer every stream after DELAY."""

    LIMIT = 10

    def __init__(self, connections: list[GoawayH2Origin]) -> None:
        connections.append(self)
        self.first = len(connections) == 1
        self.streams: list[int] = []
        self.received = 0

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.streams.append(event.stream_id)
                if not self.first:
                    loop.call_later(self.DELAY, self.answer, event.stream_id)
            elif isinstance(event, h2.events.DataReceived) and self.first:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                before, self.received = self.received, self.received + len(event.data)
                if before <= REPLAY_LIMIT < self.received:
                    self.transport.write(self.h2.data_to_send() + goaway(self.streams[0]))
                    loop.call_later(self.DELAY, self.answer_and_close, self.streams[0])
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_an_upstream_goaway_finishes_its_streams_and_retries_the_unprocessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams up to the GOAWAY's last stream are answered on that connection; one above
    it that lost nothing is sent again on a new connection, with the body it sent (kept up
    to REPLAY_LIMIT); one that sent more of its body than that cannot be sent again and is
    answered 502."""
    connections: list[GoawayH2Origin] = []
    async with proxy_to_h2_origin(
        lambda: GoawayH2Origin(connections), tmp_path, monkeypatch
    ) as proxy:
        client = await connect_h2(proxy)
        answers = [
            client.request("GET", "/processed"),
            client.request("GET", "/unprocessed"),
            client.request("POST", "/kept-body", b"partial"),
            client.request("POST", "/sent-body", bytes(2 * REPLAY_LIMIT)),
        ]
        await all_answered(answers)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert [(a.headers[":status"], bytes(a.body)) for a in answers] == [
        ("200", b"late"),
        ("200", b"late"),
        ("200", b"late"),
        ("502", b"upstream reset\n"),
    ]
    assert [c.streams for c in connections] == [[1, 3, 5, 7], [1, 3]]
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [
        ("/kept-body", 200, ""),
        ("/processed", 200, ""),
        ("/sent-body", 502, "reset"),
        ("/unprocessed", 200, ""),
    ]
    sent = {r.path: r.bytes_from_client for r in proxy.ledger.requests}
    assert sent["/kept-body"] == len(b"partial"), "sent twice, counted once"


class RollingGrpcOrigin(asyncio.Protocol):
    """A gRPC echo origin whose first connection says GOAWAY (last stream 0) as the first
    request's message comes in, and then closes: as nginx does past keepalive_requests
    with a call already on its way. Later connections echo each call's message."""

    def __init__(self, connections: list[RollingGrpcOrigin]) -> None:
        connections.append(self)
        self.first = len(connections) == 1
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.messages: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if self.first:
                    self.transport.write(self.h2.data_to_send() + goaway(0))
                    self.transport.close()
                    return
                self.messages[event.stream_id] = (
                    self.messages.get(event.stream_id, b"") + event.data
                )
            elif isinstance(event, h2.events.StreamEnded):
                response = [(":status", "200"), ("content-type", "application/grpc")]
                self.h2.send_headers(event.stream_id, response)
                self.h2.send_data(event.stream_id, self.messages.pop(event.stream_id))
                self.h2.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_grpc_call_above_an_upstream_goaway_is_sent_again_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpcio's call reaches an upstream that says GOAWAY without having processed it (its
    last stream is below the call's), as nginx does past keepalive_requests with calls on
    their way to it. Its message had gone upstream with its head, so the proxy did not send
    it again: the call failed UNAVAILABLE (502 upstream reset). grpcio itself sends such a
    call again (through nginx, one call in ten failed so where a direct connection lost
    none); the proxy now keeps what went of a body until the answer begins, and sends the
    call again on a new connection."""
    connections: list[RollingGrpcOrigin] = []
    async with proxy_to_h2_origin(
        lambda: RollingGrpcOrigin(connections), tmp_path, monkeypatch
    ) as proxy:
        outcome = await asyncio.to_thread(call, proxy.port, "/test.Echo/Echo", b"ping")
        await proxy.wait_requests(1)
    assert outcome == (grpc.StatusCode.OK, b"ping")
    assert len(connections) == 2
    outcomes = [(r.path, r.status, r.grpc_status, r.error) for r in proxy.ledger.requests]
    assert outcomes == [("/test.Echo/Echo", 200, 0, "")]


class EarlyGoawayH2Origin(asyncio.Protocol):
    """Says GOAWAY (last stream 0) as its connection opens, with no SETTINGS before it, or
    (settings) after SETTINGS that leave no room for a stream: it takes no stream, ever.
    Past LIMIT connections it resets each at once, so that a proxy that keeps coming back
    ends (its source ports would run out within seconds)."""

    LIMIT = 4

    def __init__(self, connections: list[EarlyGoawayH2Origin], settings: bool) -> None:
        connections.append(self)
        self.settings = settings
        self.cut = len(connections) > self.LIMIT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.cut:
            cast(asyncio.Transport, transport).abort()
            return
        no_room = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0}
        settings = hyperframe.frame.SettingsFrame(0, no_room).serialize() if self.settings else b""
        cast(asyncio.Transport, transport).write(settings + goaway(0))


@pytest.mark.asyncio
@pytest.mark.parametrize("settings", [False, True])
async def test_streams_waiting_for_an_upstream_that_says_goaway_go_elsewhere_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: bool
) -> None:
    """A stream waiting for an upstream that said GOAWAY goes to a new connection once, as a
    refused one does; on an upstream that takes none it is then answered 502, not sent to
    connection after connection (thousands a second) while the client waits."""
    connections: list[EarlyGoawayH2Origin] = []
    async with proxy_to_h2_origin(
        lambda: EarlyGoawayH2Origin(connections, settings), tmp_path, monkeypatch
    ) as proxy:
        client = await connect_h2(proxy)
        answer = client.request("GET", "/a")
        async with asyncio.timeout(TIMEOUT):
            await answer.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (answer.headers[":status"], bytes(answer.body)) == ("502", b"upstream reset\n")
    assert len(connections) == 2
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [("/a", 502, "reset")]


@pytest.mark.asyncio
async def test_answer_bytes_a_reset_stream_never_got_are_not_counted(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """A client whose window lets 1,000 bytes through resets the stream: the record said
    65,535 bytes came from the upstream, the whole stream window the proxy had taken in
    and then dropped; the request direction counts bytes as they go on, and so now does
    the answer's."""
    proxy, _ = h2_setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000}
    )
    client.initiate_connection()
    stream_id = client.get_next_available_stream_id()
    request = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test")]
    client.send_headers(stream_id, [*request, (":path", "/bytes/300000")], end_stream=True)
    writer.write(client.data_to_send())
    received = 0
    async with asyncio.timeout(TIMEOUT):
        while received < 1000:
            for event in client.receive_data(await reader.read(65536)):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)  # never acknowledged: the window stays shut
            writer.write(client.data_to_send())
    await asyncio.sleep(0.2)  # the upstream fills the proxy's side of the stream meanwhile
    client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    writer.write(client.data_to_send())
    await proxy.wait_requests(1)
    writer.close()
    (record,) = proxy.ledger.requests
    assert (received, record.status, record.error) == (1000, 200, "reset")
    assert record.bytes_from_upstream == received


class OneStreamH2Origin(SlowH2Origin):
    """Says GOAWAY as each connection's first stream comes (it is the last one taken), and
    closes once it answered it after DELAY: each stream needs a connection of its own. It
    keeps count of the connections open at once."""

    DELAY = 0.5

    def __init__(self, open_now: list[int], most: list[int]) -> None:
        self.open_now, self.most = open_now, most

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.open_now[0] += 1
        self.most[0] = max(self.most[0], self.open_now[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_now[0] -= 1

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.transport.write(self.h2.data_to_send() + goaway(event.stream_id))
                loop.call_later(self.DELAY, self.answer_and_close, event.stream_id)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_one_h2_client_cannot_take_the_descriptors_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An h2 connection counts as one against the descriptors' limit, but opens an upstream
    per backend, and a new one per GOAWAY while the old one finishes: one client whose
    upstream says GOAWAY after every stream held one descriptor a stream, until none was
    left and the proxy dropped every new client (libuv accepts and closes at EMFILE). Past
    its first, each upstream now takes room from the accepting, and a stream that finds
    none is answered 502 no_file_descriptors."""
    open_now, most = [0], [0]
    async with proxy_to_h2_origin(
        lambda: OneStreamH2Origin(open_now, most), tmp_path, monkeypatch
    ) as proxy:
        open_flows = proxy.context.open_flows
        open_flows.limit = 4  # the client's connection and three more upstreams
        client = await connect_h2(proxy)
        answers = []
        for number in range(8):
            answers.append(client.request("GET", f"/{number}"))
            await asyncio.sleep(0.03)  # past the GOAWAY of the stream before
        full_while_held = open_flows.full
        await all_answered(answers)
        client.transport.close()
        await proxy.wait_closed_flows(1)
        left = (open_flows.extra, open_flows.full)
    statuses = [(a.headers[":status"], bytes(a.body)) for a in answers]
    assert statuses == [("200", b"late")] * 4 + [("502", b"upstream no_file_descriptors\n")] * 4
    assert (most[0], full_while_held, left) == (4, True, (0, False))


class RefusingH2Origin(SlowH2Origin):
    """Refuses (RST_STREAM REFUSED_STREAM, before any response) every /always stream and the
    first /once stream; answers the rest after DELAY."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.refused: list[bytes] = []
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                if path == b"/always" or path not in self.refused:
                    self.refused.append(path)
                    self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                else:
                    asyncio.get_running_loop().call_later(self.DELAY, self.answer, event.stream_id)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_refused_stream_is_sent_again_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REFUSED_STREAM says the upstream did nothing with the stream: it is sent again, once;
    refused a second time it is answered 502."""
    async with proxy_to_h2_origin(RefusingH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        once, always = client.request("GET", "/once"), client.request("GET", "/always")
        async with asyncio.timeout(TIMEOUT):
            await once.done.wait()
            await always.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (once.headers[":status"], bytes(once.body)) == ("200", b"late")
    assert (always.headers[":status"], bytes(always.body)) == ("502", b"upstream reset\n")
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [("/always", 502, "reset"), ("/once", 200, "")]


def call(
    port: int, method: str, payload: bytes, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[Any, bytes | None]:
    """One unary call with grpcio; (status code, response or None)."""
    # a channel of its own connection: the global subchannel pool would reuse an older one
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub: Any = channel.unary_unary(method)
        try:
            return grpc.StatusCode.OK, stub(payload, timeout=TIMEOUT, metadata=metadata)
        except grpc.RpcError as error:
            return error.code(), None


@pytest.mark.asyncio
async def test_grpc_allowed_denied_and_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_origin: int
) -> None:
    async with loopback_proxy(tmp_path, monkeypatch, POLICY, local(grpc_origin)) as proxy:
        ok = await asyncio.to_thread(call, proxy.port, "/test.Echo/Echo", b"ping" * 100_000)
        assert ok == (grpc.StatusCode.OK, b"ping" * 100_000)
        denied = await asyncio.to_thread(call, proxy.port, "/test.Echo/Fail", b"x")
        assert denied == (grpc.StatusCode.PERMISSION_DENIED, None)
        proxy.destination[0] = local(closed_port())
        down = await asyncio.to_thread(call, proxy.port, "/test.Echo/Echo", b"x")
        assert down == (grpc.StatusCode.UNAVAILABLE, None)
        await proxy.wait_requests(3)
    records = [(r.path, r.grpc, r.grpc_status, r.error) for r in proxy.ledger.requests]
    assert records == [
        ("/test.Echo/Echo", True, 0, ""),
        ("/test.Echo/Fail", True, 7, ""),
        ("/test.Echo/Echo", True, 14, "connect_refused"),
    ]


def streaming_grpc_server() -> tuple[Any, int]:
    """A grpcio server, started, and its port: test.Echo/Echo, and test.Echo/Stream, whose
    answer is 256 messages of 64 KiB (as fast as the client's window allows)."""

    def echo(request: bytes, context: Any) -> bytes:
        return request

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(256):
            if not context.is_active():
                return
            yield bytes(65536)

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.asyncio
async def test_grpc_streams_left_unread_do_not_stall_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty server-streaming calls the application reads nothing of (grpcio buffers a few
    MiB of each, then its windows close), and a unary call on the same channel: it ran into
    its deadline, the unread streams holding the upstream connection's whole window (with
    a direct connection it took milliseconds)."""
    server, port = streaming_grpc_server()
    options = [("grpc.use_local_subchannel_pool", 1)]
    try:
        async with loopback_proxy(tmp_path, monkeypatch, POLICY, local(port)) as proxy:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) as channel:
                streaming: Any = channel.unary_stream("/test.Echo/Stream")
                calls = [streaming(b"", timeout=4 * TIMEOUT) for _ in range(40)]
                handler = await only_handler(proxy)
                async with asyncio.timeout(TIMEOUT):
                    while len(handler.streams) < 40 or any(
                        stream.upstream is None
                        or not stream.upstream_id  # not yet opened upstream
                        or stream.upstream.h2.remote_flow_control_window(stream.upstream_id)
                        for stream in handler.streams.values()
                    ):
                        await asyncio.sleep(0.01)
                unary: Any = channel.unary_unary("/test.Echo/Echo")
                try:
                    answer = await asyncio.to_thread(unary, b"ping", timeout=5)
                finally:
                    for stream_call in calls:
                        stream_call.cancel()
    finally:
        server.stop(None)
    assert answer == b"ping"


NATIVE_HEADER_AND_QUERY_RULES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: test}
spec:
  default: deny
  rules:
  - name: pages
    http: [{pathPrefix: /get, headersRegex: {x-team: "red|blue"}, queryRegex: {page: "[0-9]+"}}]
  - name: tenant-echo
    grpc: [{service: test.Echo, headers: {x-tenant: blue}, headersRegex: {x-trace: "[0-9a-f]{8}"}}]
"""


def get_status(port: int, path: str, headers: dict[str, str]) -> int:
    """One request with http.client, on a connection of its own; the response's status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers={"Host": "example.test", **headers})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.asyncio
async def test_native_header_and_query_matches_decide_real_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_origin: int
) -> None:
    """http.client's headers and query, and grpcio's metadata, on the wire meet the native
    headers, headersRegex and queryRegex matches."""
    async with (
        origin(h1) as h1_port,
        loopback_proxy(
            tmp_path, monkeypatch, NATIVE_HEADER_AND_QUERY_RULES, local(h1_port)
        ) as proxy,
    ):
        statuses = [
            await asyncio.to_thread(get_status, proxy.port, path, headers)
            for path, headers in [
                ("/get?page=12", {"X-Team": "blue"}),
                ("/get?page=12a", {"X-Team": "blue"}),
                ("/get?page=12", {"X-Team": "blue-green"}),
                ("/get?page=12", {}),
            ]
        ]
        assert statuses == [200, 403, 403, 403]
        proxy.destination[0] = local(grpc_origin)
        codes = [
            (await asyncio.to_thread(call, proxy.port, "/test.Echo/Echo", b"hi", metadata))[0]
            for metadata in [
                [("x-tenant", "blue"), ("x-trace", "0123abcd")],
                [("x-tenant", "blue"), ("x-trace", "0123abcdef")],
                [("x-trace", "0123abcd")],
            ]
        ]
        assert codes == [grpc.StatusCode.OK] + [grpc.StatusCode.PERMISSION_DENIED] * 2
        await proxy.wait_requests(7)
    routes = [
        (r.decision.route.name if r.decision.route else None, r.grpc) for r in proxy.ledger.requests
    ]
    assert routes == [
        ("test.pages", False),
        *[("http-egress-deny", False)] * 3,
        ("test.tenant-echo", True),
        *[("grpc-egress-deny", True)] * 2,
    ]


NATIVE_GRPC_REGEX_RULES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: test}
spec:
  default: deny
  rules:
  - name: echoes
    grpc: [{serviceRegex: 'test\\.E.*', methodRegex: "Echo|Fail"}]
  - name: no-fail
    grpc: [{service: test.Echo, method: Fail}]
    action: deny
"""


@pytest.mark.asyncio
async def test_native_grpc_regex_matches_decide_real_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_origin: int
) -> None:
    """grpcio's calls meet serviceRegex and methodRegex on whole names, and an exact match
    written after a regular expression one still takes precedence over it."""
    async with loopback_proxy(
        tmp_path, monkeypatch, NATIVE_GRPC_REGEX_RULES, local(grpc_origin)
    ) as proxy:
        codes = [
            (await asyncio.to_thread(call, proxy.port, path, b"hi"))[0]
            for path in [
                "/test.Echo/Echo",
                "/test.Everything/Echo",
                "/test.Echo/Fail",
                "/test.Echo/EchoAll",
                "/xtest.Echo/Echo",
            ]
        ]
        await proxy.wait_requests(5)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED, denied, denied, denied]
    routes = [r.decision.route.name if r.decision.route else None for r in proxy.ledger.requests]
    assert routes == ["test.echoes", "test.echoes", "test.no-fail", *["grpc-egress-deny"] * 2]


@pytest.mark.asyncio
async def test_verify_destination_enforced_per_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(
            tmp_path,
            monkeypatch,
            POLICY,
            local(port),
            verify_destination=VerifyDestination.ENFORCE,
        ) as proxy:
            client = await connect_h2(proxy)
            good = client.request("GET", "/a", authority=f"localhost:{port}")
            bad = client.request("GET", "/a", authority="nowhere.invalid")
            async with asyncio.timeout(TIMEOUT):
                await good.done.wait()
                await bad.done.wait()
            assert (good.headers[":status"], bad.headers[":status"]) == ("200", "421")
            client.transport.close()
            await proxy.wait_closed_flows(1)
    finally:
        origin.close()
    errors = sorted((r.hostname or "", r.error) for r in proxy.ledger.requests)
    assert errors == [("localhost", ""), ("nowhere.invalid", "destination_mismatch")]


@pytest.mark.asyncio
async def test_a_path_no_server_reads_as_the_policy_does_is_refused(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """As over HTTP/1: a `#` (nginx ends the path there) or a :path that is not `/…` (nor
    OPTIONS' `*`) gets 400, its stream alone; no decision on a path read otherwise."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    paths = ["/a", "/denied#", "/a/..#/denied", "denied", "*"]
    answers = [client.request("GET", path) for path in paths]
    await all_answered(answers)
    assert [answer.headers[":status"] for answer in answers] == ["200", *["400"] * 4]
    client.transport.close()
    await proxy.wait_closed_flows(1)


@pytest.mark.asyncio
async def test_a_method_or_path_http1_refuses_and_an_extended_connects_path_are_refused(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """A :method that is no token or a :path that is not visible ASCII would let an HTTP/1
    upstream behind an h2 front read another request line; an extended CONNECT (RFC 8441,
    with :protocol) carries a :path like any request, judged as one (only a plain CONNECT
    has none, and its :authority must name a port, as HTTP/1's target must). Each gets
    400, its stream alone; the good one beside them is answered."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy, LaxH2Client)
    authority = [(":scheme", "http"), (":authority", "example.test")]
    blocks = [
        [(":method", "GET /denied HTTP/1.1 X"), *authority, (":path", "/a")],
        [(":method", "GET"), *authority, (":path", "/a HTTP/1.1")],
        [(":method", "GET"), *authority, (":path", "/caf\u00e9")],
        [(":method", "CONNECT"), (":protocol", "websocket"), *authority, (":path", "denied")],
        [(":method", "CONNECT"), (":protocol", "websocket"), *authority, (":path", "/x/../denied")],
        [(":method", "CONNECT"), (":authority", "example.test")],
        [(":method", "CONNECT"), (":authority", "example.test:")],
        [(":method", "CONNECT"), ("host", "example.test:80")],
        [(":method", "GET"), *authority, (":path", "/good")],
    ]
    answers = [client.send_block(block) for block in blocks]
    await all_answered(answers)
    statuses = [answer.headers[":status"] for answer in answers]
    assert statuses == [*["400"] * 3, "400", "403", *["400"] * 3, "200"]
    client.transport.close()
    await proxy.wait_closed_flows(1)


@pytest.mark.asyncio
async def test_an_authority_with_an_empty_or_malformed_port_gets_no_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`:authority blocked.test:` is blocked.test; one that is not host[:port] is refused
    (400) rather than given the default allow that no host rule can take from it."""
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(tmp_path, monkeypatch, BLOCKED_HOST, local(port)) as proxy:
            client = await connect_h2(proxy)
            authorities = ["example.test", "blocked.test:", "blocked.test:80:80"]
            answers = [client.request("GET", "/a", authority=name) for name in authorities]
            await all_answered(answers)
            statuses = [answer.headers[":status"] for answer in answers]
            assert statuses == ["200", "403", "400"]
            client.transport.close()
            await proxy.wait_closed_flows(1)
    finally:
        origin.close()
    errors = sorted((r.status, r.error) for r in proxy.ledger.requests)
    assert errors == [(200, ""), (400, "bad_request"), (403, "")]


@pytest.mark.asyncio
@pytest.mark.parametrize("matches", OSM_HOST_CASES, ids=["hosts", "host-header-match"])
async def test_an_osm_egress_decides_an_authority_as_the_same_host_in_http1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matches: str
) -> None:
    """The :authority (no `host` header) is what OSM's Envoy matches over HTTP/2: its port
    against the Egress's HOST and HOST:PORT domains, all of it against a `host` header
    match. Each stream gets the status the same Host gets over HTTP/1."""
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    policy = OSM_HTTP_EGRESS.format(port=port, matches=matches)
    try:
        async with loopback_proxy(tmp_path, monkeypatch, policy, local(port)) as proxy:
            client = await connect_h2(proxy)
            authorities = [host.format(port=port) for host in OSM_HOST_CASES[matches]]
            answers = [client.request("GET", "/a", authority=name) for name in authorities]
            await all_answered(answers)
            client.transport.close()
            await proxy.wait_closed_flows(1)
    finally:
        origin.close()
    statuses = [int(answer.headers[":status"]) for answer in answers]
    assert statuses == list(OSM_HOST_CASES[matches].values())


async def held_until_cut(
    handler: Any, writer: asyncio.StreamWriter, chunks: Iterable[bytes]
) -> int:
    """Writes chunks to the proxy's h2 connection, letting it read each, until it cuts the
    connection or stops reading; the most bytes it held for the client meanwhile."""
    held = 0
    for chunk in chunks:
        if handler.closed:
            break
        held = max(held, handler.transport.get_write_buffer_size())
        writer.write(chunk)
        try:
            async with asyncio.timeout(0.5):
                await writer.drain()
                await asyncio.sleep(0.001)  # drain need not wait: the proxy reads now
        except (TimeoutError, ConnectionError):
            break
    return held


@pytest.mark.asyncio
@pytest.mark.parametrize("answered", ["pings", "frames on a reset stream"])
async def test_a_client_that_floods_answered_frames_and_never_reads_is_cut_off(
    h2_setup: tuple[LoopbackProxy, int], answered: str
) -> None:
    """Each PING asks for a PING ACK, and each frame on a stream reset before for a
    RST_STREAM (CVE-2019-9514; an empty DATA frame costs the client no window): a client
    that sends them and reads nothing would have the proxy queue the answers without end.
    Past MAX_ANSWERS_UNREAD of them while its write buffer is high, the connection ends."""
    proxy, _ = h2_setup
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.setblocking(False)
    await loop.sock_connect(sock, (proxy.host, proxy.port))
    _, writer = await asyncio.open_connection(sock=sock)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    client.initiate_connection()
    if answered == "pings":
        frame = hyperframe.frame.PingFrame(0, opaque_data=b"flooding")
    else:
        request = [(":method", "POST"), (":scheme", "http"), (":authority", "example.test")]
        client.send_headers(1, [*request, (":path", "/upload")])
        client.reset_stream(1)
        frame = hyperframe.frame.DataFrame(1)
    writer.write(client.data_to_send())
    handler = await only_handler(proxy)
    flood = frame.serialize() * 4096
    held = await held_until_cut(handler, writer, [flood] * ((8 << 20) // len(flood)))  # 8 MiB
    writer.close()
    await proxy.wait_closed_flows(1)
    assert handler.flow.record.error == "flood"
    assert held < 1 << 20, f"{held} bytes held for a client that does not read"


@pytest.mark.asyncio
async def test_data_a_client_sent_before_it_read_the_proxys_reset_is_no_flood(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 5.1: frames that come on a stream after we reset it may have been sent
    before our RST_STREAM arrived, and are ignored. h2 answered each DATA frame with a
    RST_STREAM, counted against a client not reading: one uploading in small frames (a
    gRPC message each) to a stream answered 403 was cut, its download with it."""
    loop = asyncio.get_running_loop()
    origin = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(tmp_path, monkeypatch, POLICY, local(port)) as proxy:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, (proxy.host, proxy.port))
            _, writer = await asyncio.open_connection(sock=sock)
            client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
            client.initiate_connection()
            client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
            client.increment_flow_control_window(1 << 30)
            base = [(":scheme", "http"), (":authority", "example.test")]
            download = [(":method", "GET"), *base, (":path", "/bytes/8388608")]
            client.send_headers(1, download, end_stream=True)
            client.send_headers(3, [(":method", "POST"), *base, (":path", "/denied")])
            writer.write(client.data_to_send())
            handler = await only_handler(proxy)
            async with asyncio.timeout(TIMEOUT):
                while not handler.client_full:
                    await asyncio.sleep(0.01)
            for _ in range(egressproxy.http2.MAX_ANSWERS_UNREAD + 100):
                client.send_data(3, b"x" * 20)  # within the stream's window
            writer.write(client.data_to_send())
            await writer.drain()
            await asyncio.sleep(0.5)
            cut = (handler.closed, handler.flow.record.error)
            writer.close()
            await proxy.wait_closed_flows(1)
    finally:
        origin.close()
    assert cut == (False, "")


DENIED_BLOCK = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test"),
                (":path", "/denied")]  # fmt: skip


def denied_streams(encoder: hpack.Encoder, first_id: int, count: int) -> bytes:
    """count HEADERS frames (END_STREAM) of requests the policy denies, 13 bytes each once
    the encoder has indexed the block: the cheapest streams the proxy answers at once."""
    frames = bytearray()
    for stream_id in range(first_id, first_id + 2 * count, 2):
        frame = hyperframe.frame.HeadersFrame(stream_id, encoder.encode(DENIED_BLOCK))
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        frames += frame.serialize()
    return bytes(frames)


@pytest.mark.asyncio
async def test_a_burst_of_streams_the_proxy_answers_at_once_is_a_flood(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """A client keeping to 256 concurrent streams cannot send 4,096 new ones in a read or
    two; denied streams it need not wait for could, each costing the worker a decision and
    an answer while every other connection waits. Past MAX_NEW_STREAMS_PER_READ in one
    read the connection ends, before they are decided."""
    proxy, _ = h2_setup
    count = 4 * MAX_NEW_STREAMS_PER_READ
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    preface = H2_PREFACE + hyperframe.frame.SettingsFrame(0).serialize()
    writer.write(preface + denied_streams(hpack.Encoder(), 1, count))
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    writer.close()
    await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == ["flood"]
    assert len(proxy.ledger.requests) < count


def open_and_reset(client: H2Client, count: int) -> None:
    """count streams, each reset (CANCEL) as soon as it is sent."""
    for _ in range(count):
        client.request("GET", "/a")
        client.h2.reset_stream(max(client.answers), h2.errors.ErrorCodes.CANCEL)
    client.transport.write(client.h2.data_to_send())


@pytest.mark.asyncio
async def test_streams_reset_as_soon_as_opened_are_a_flood(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """Rapid reset (CVE-2023-44487): never more than a few streams open at once, yet each
    costs a decision and an upstream request. Once 500 streams are opened with more than
    half reset before their answer, the connection ends."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    async with asyncio.timeout(TIMEOUT):
        for _ in range(20):  # 2,000 streams at most
            if client.lost.is_set():
                break
            open_and_reset(client, 100)
            await asyncio.sleep(0.01)
        await client.lost.wait()
    await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == ["flood"]
    assert STREAMS_BEFORE_RESETS_COUNT <= len(proxy.ledger.requests) < 1000


def streams_made_to_reset(encoder: hpack.Encoder, first_id: int, count: int, bad: str) -> bytes:
    """count POST streams whose sound head (content-length: 0) the proxy forwards, each then
    malformed by a body of a byte or (bad="trailers") a pseudo-header in its trailers: the
    proxy resets each itself, PROTOCOL_ERROR, with no RST_STREAM from the client."""
    frames = bytearray()
    for stream_id in range(first_id, first_id + 2 * count, 2):
        block = [(":method", "POST"), (":scheme", "http"), (":authority", "example.test"),
                 (":path", "/a"), ("content-length", "0")]  # fmt: skip
        head = hyperframe.frame.HeadersFrame(stream_id, encoder.encode(block))
        head.flags.add("END_HEADERS")
        end: hyperframe.frame.Frame
        if bad == "trailers":
            end = hyperframe.frame.HeadersFrame(stream_id, encoder.encode([(":path", "/b")]))
            end.flags.add("END_HEADERS")
        else:
            end = hyperframe.frame.DataFrame(stream_id, b"x")
        end.flags.add("END_STREAM")
        frames += head.serialize() + end.serialize()
    return bytes(frames)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["body", "trailers"])
async def test_streams_the_client_makes_the_proxy_reset_are_a_flood(
    h2_setup: tuple[LoopbackProxy, int], bad: str
) -> None:
    """MadeYouReset (CVE-2025-8671): rapid reset with no RST_STREAM from the client. Each
    stream's head goes upstream, then its malformed body or trailers make the proxy reset
    it, as soon as it opened: each counts as a client's reset, and once 500 streams are
    opened with more than half so reset the connection ends."""
    proxy, _ = h2_setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(H2_PREFACE + hyperframe.frame.SettingsFrame(0).serialize())
    encoder = hpack.Encoder()

    async def read_until_cut() -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    cut = asyncio.create_task(read_until_cut())
    for first in range(1, 8000, 200):  # 4,000 streams at most
        if cut.done():
            break
        writer.write(streams_made_to_reset(encoder, first, 100, bad))
        await asyncio.sleep(0.01)
    writer.close()
    await proxy.wait_closed_flows(1)
    cut.cancel()
    assert [flow.error for flow in proxy.ledger.flows] == ["flood"]
    assert STREAMS_BEFORE_RESETS_COUNT <= len(proxy.ledger.requests) < 1000


@pytest.mark.parametrize(
    ("timeout", "lived", "ran_out"),
    [
        (b"200m", 0.19, True),
        (b"200m", 0.05, False),  # reset long before its deadline
        (b"50m", 0.06, False),  # under MIN_COUNTED_DEADLINE
        (b"1S", 0.95, True),
        (b"200000u", 0.19, True),
        (b"123456789m", 0.5, False),  # nine digits: not a grpc-timeout
        (b"5x", 10.0, False),
        (b"", 10.0, False),
    ],
)
def test_a_reset_is_the_deadlines_when_the_call_lived_its_grpc_timeout(
    timeout: bytes, lived: float, ran_out: bool
) -> None:
    headers = [(b":method", b"POST"), (b"grpc-timeout", timeout)]
    assert deadline_ran_out(headers, lived) is ran_out
    assert not deadline_ran_out(headers[:1], lived)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("grpc_timeout", "reset_after", "flood"),
    [("150m", 0.15, False), ("150m", 0.0, True), ("60m", 0.07, True)],
)
async def test_calls_reset_as_their_deadlines_run_out_are_no_flood(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    grpc_timeout: str,
    reset_after: float,
    flood: bool,
) -> None:
    """A slow upstream and calls with tight deadlines: every call is reset by its client
    within a second, before any answer. That is no rapid reset when each lived its
    grpc-timeout (the connection, and any other call on it, goes on), and still one when the
    resets come before it or the deadline is too short to count."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        proxy = origins.proxy
        client = await connect_h2(proxy)
        for _ in range(3):  # 600 calls, over STREAMS_BEFORE_RESETS_COUNT
            if client.lost.is_set():
                break
            calls = [
                client.request("POST", "/first", headers={"grpc-timeout": grpc_timeout})
                for _ in range(200)
            ]
            await asyncio.sleep(reset_after)
            for stream_id, answer in client.answers.items():
                if answer in calls:
                    client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.transport.write(client.h2.data_to_send())
        async with asyncio.timeout(TIMEOUT):
            if flood:
                await client.lost.wait()
            else:
                await proxy.wait_requests(600)
        assert client.lost.is_set() is flood
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == ["flood" if flood else ""]


@pytest.mark.asyncio
async def test_a_client_that_cancels_some_of_its_streams_is_served_on(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """Fewer than half of 550 streams reset before their answers: no flood."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy)
    async with asyncio.timeout(TIMEOUT):
        for _ in range(3):
            answers = [client.request("GET", "/a") for _ in range(100)]
            for answer in answers:
                await answer.done.wait()
        open_and_reset(client, 250)
        last = client.request("GET", "/a")
        await last.done.wait()
    assert last.headers[":status"] == "200"
    assert not client.lost.is_set()
    client.transport.close()
    await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == [""]


@pytest.mark.asyncio
async def test_a_client_that_sends_streams_and_never_reads_is_cut_off(
    h2_setup: tuple[LoopbackProxy, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with PINGs: each denied stream is answered at once, and a client sending them
    while it reads nothing would have the proxy queue the answers without end. Past
    MAX_ANSWERS_UNREAD new streams while its write buffer is high, the connection ends
    (the limit per read is lifted here, so this limit alone is at work)."""
    monkeypatch.setattr(egressproxy.http2, "MAX_NEW_STREAMS_PER_READ", 1 << 30)
    proxy, _ = h2_setup
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (proxy.host, proxy.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(H2_PREFACE + hyperframe.frame.SettingsFrame(0).serialize())
    handler = await only_handler(proxy)
    # The proxy's socket takes little, so its write buffer is high within a second.
    handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    encoder = hpack.Encoder()
    bursts = (denied_streams(encoder, first, 200) for first in range(1, 400_000, 400))
    held = await held_until_cut(handler, writer, bursts)  # 200,000 streams at most
    writer.close()
    await proxy.wait_closed_flows(1)
    assert handler.flow.record.error == "flood"
    assert held < 1 << 20, f"{held} bytes held for a client that does not read"


class LargeTableClient(H2Client):
    """Allows the proxy an HPACK dynamic table of 2^31 bytes for what it sends."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 31})
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_the_hpack_table_the_proxy_keeps_for_a_client_stays_small(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """However large a table the client allows, the proxy keeps MAX_ENCODER_TABLE bytes of
    the headers it sent (and says so with a table size update): else every distinct
    response header, a per-response cookie say, would stay in its memory."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy, LargeTableClient)
    answers = [client.request("GET", f"/a{n}") for n in range(3)]
    await all_answered(answers)
    assert [answer.headers[":status"] for answer in answers] == ["200"] * 3
    assert client.h2.decoder.header_table_size == MAX_ENCODER_TABLE
    client.transport.close()
    await proxy.wait_closed_flows(1)


class FloodingH2Origin(asyncio.Protocol):
    """Sends its SETTINGS, then PINGs (up to 32 MiB), and never reads the answers."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
        )
        self.transport.pause_reading()
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        self.transport.write(server.data_to_send())
        self.pings = hyperframe.frame.PingFrame(0, opaque_data=b"flooding").serialize() * 4096
        self.left = (32 << 20) // len(self.pings)
        asyncio.get_running_loop().call_soon(self.flood)

    def flood(self) -> None:
        if self.transport.is_closing() or self.left == 0:
            return
        self.left -= 1
        if self.transport.get_write_buffer_size() < 1 << 20:
            self.transport.write(self.pings)
        asyncio.get_running_loop().call_later(0.001, self.flood)


@pytest.mark.asyncio
async def test_an_upstream_that_floods_pings_and_never_reads_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same flood from the other side: the upstream connection ends, and its stream
    is answered 502 rather than left waiting while ACKs pile up for it."""
    async with proxy_to_h2_origin(FloodingH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        answer = client.request("GET", "/a")
        async with asyncio.timeout(4 * TIMEOUT):
            await answer.done.wait()
        assert answer.headers[":status"] == "502"
        client.transport.close()
        await proxy.wait_closed_flows(1)


async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that reads the first bytes, then closes without a word."""
    await reader.read(65536)
    writer.close()


async def answers_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that answers what it reads with bytes neither HTTP/1 nor h2 (an h2 frame
    header of DATA on stream 0)."""
    await reader.read(65536)
    writer.write(bytes(9))
    await writer.drain()
    await reader.read(65536)
    writer.close()


async def announces_an_oversized_frame(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An origin that answers with SETTINGS and the 9-byte header of a DATA frame of
    16 MiB - 1 (past SETTINGS_MAX_FRAME_SIZE), then waits: the frame is refused at once,
    not buffered until it is whole."""
    await reader.read(65536)
    announced = ((1 << 24) - 1).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    writer.write(hyperframe.frame.SettingsFrame(0).serialize() + announced)
    await writer.drain()
    await reader.read(65536)
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (hangs_up, "reset"),
        (answers_garbage, "bad_response"),
        (announces_an_oversized_frame, "bad_response"),
    ],
)
async def test_http1_and_h2_name_an_upstream_failure_alike(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    error: str,
) -> None:
    """The same upstream failure is the same `error` word (and 502) whichever protocol
    the client spoke: h2 said upstream_closed for both."""
    async with proxy_to_origin(handler, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            status, _, _ = await read_response(reader)
        writer.close()
        client = await connect_h2(proxy)
        answer = client.request("GET", "/a")
        async with asyncio.timeout(TIMEOUT):
            await answer.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(2)
    assert (status, answer.headers[":status"]) == (502, "502")
    outcomes = sorted((r.protocol, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [("h2", 502, error), ("http1", 502, error)]


class LaxH2Client(H2Client):
    """An H2Client that sends header blocks as given, malformed ones included."""

    def __init__(self) -> None:
        super().__init__()
        config = h2.config.H2Configuration(
            header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )  # fmt: skip
        self.h2 = h2.connection.H2Connection(config)

    def send_block(self, headers: list[tuple[str, str]], end_stream: bool = True) -> Answer:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.answers[stream_id] = answer = Answer()
        self.transport.write(self.h2.data_to_send())
        return answer


class RecordingH2Server(H2Server):
    """An H2Server that keeps the request headers of every stream it answers."""

    answered: ClassVar[list[dict[str, str]]] = []

    def _answer(self, stream_id: int) -> None:
        self.answered.append(dict(self.streams[stream_id]["headers"]))
        super()._answer(stream_id)


REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test")]
MALFORMED_REQUESTS = {
    "uppercase name": [*REQUEST, (":path", "/a"), ("X-Upper", "1")],
    "connection header": [*REQUEST, (":path", "/b"), ("connection", "keep-alive")],
    "transfer-encoding": [*REQUEST, (":path", "/c"), ("transfer-encoding", "chunked")],
    "te not trailers": [*REQUEST, (":path", "/d"), ("te", "gzip")],
    "no :path": REQUEST,
    "two :method": [*REQUEST, (":path", "/f"), (":method", "POST")],
    "pseudo after regular": [*REQUEST, ("x-a", "1"), (":path", "/g")],
}


async def only_the_good_stream_answered(
    proxy: LoopbackProxy, client: H2Client, bad: list[Answer], good: Answer
) -> None:
    """Each bad stream reset PROTOCOL_ERROR, the good one answered 200 on the same
    connection (no GOAWAY), and only the good one reached the origin."""
    await all_answered([*bad, good])
    assert [(a.reset, a.reset_code) for a in bad] == [
        (True, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    ] * len(bad)
    assert good.headers[":status"] == "200"
    assert not client.goaway
    client.transport.close()
    await proxy.wait_closed_flows(1)
    assert [headers[":path"] for headers in RecordingH2Server.answered] == ["/good"]


@pytest.mark.asyncio
async def test_a_malformed_request_resets_its_stream_not_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1.1: a malformed request is a stream error (RST_STREAM PROTOCOL_ERROR),
    never forwarded; a good stream beside it on the same connection is answered. h2 made
    it a connection error: GOAWAY, and every stream of the client's lost."""
    RecordingH2Server.answered = []
    async with proxy_to_h2_origin(RecordingH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, LaxH2Client)
        bad = [client.send_block(headers) for headers in MALFORMED_REQUESTS.values()]
        with_bad_trailers = client.send_block([*REQUEST, (":path", "/t")], end_stream=False)
        trailers = [("connection", "close")]
        client.h2.send_headers(client.h2.highest_outbound_stream_id, trailers, end_stream=True)
        bad.append(with_bad_trailers)
        good = client.request("GET", "/good")
        await only_the_good_stream_answered(proxy, client, bad, good)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    bad_paths = ["/", "/a", "/b", "/c", "/d", "/f", "/g", "/t"]
    assert outcomes == sorted([("/good", 200, ""), *((p, None, "bad_request") for p in bad_paths)])


@pytest.mark.asyncio
async def test_streams_on_a_grpc_port_are_grpc_calls_in_metrics_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a port of GRPCRoutes a stream without content-type application/grpc is answered
    over HTTP (403, 502) but counted and logged as a gRPC call, with the code a gRPC
    client gets for the same cause (PERMISSION_DENIED, UNAVAILABLE)."""
    closed = closed_port()
    policy = GRPC_PORT_POLICY.format(origin=closed, closed=closed)
    async with loopback_proxy(tmp_path, monkeypatch, policy, local(closed)) as proxy:
        registry = CollectorRegistry()
        lines = Lines(LogFormat.JSON)
        proxy.context.accounting = Reporting(Metrics(registry, max_hostnames=10), lines.access_log)
        client = await connect_h2(proxy)
        grpc_call = {"content-type": "application/grpc", "te": "trailers"}
        answers = [
            client.request("GET", "/denied"),
            client.request("POST", "/test.Echo/Echo", b"x"),
            client.request("POST", "/test.Echo/Echo", b"\0\0\0\0\0", grpc_call),
        ]
        await all_answered(answers)
        client.transport.close()
        async with asyncio.timeout(TIMEOUT):
            while proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    wire = [(a.headers[":status"], a.headers.get("grpc-status")) for a in answers]
    assert wire == [("403", None), ("502", None), ("200", "14")]
    assert request_statuses(registry, "grpc") == [
        ("echo", "UNAVAILABLE", "connect_refused", 2.0),
        ("grpc-egress-deny", "PERMISSION_DENIED", "", 1.0),
    ]
    logged = [json.loads(line) for line in lines.lines()]
    requests = sorted((entry["protocol"], entry["path"], entry["status"], entry["error"])
                      for entry in logged if "method" in entry)  # fmt: skip
    assert requests == [
        ("grpc", "/denied", "7", ""),
        ("grpc", "/test.Echo/Echo", "14", "connect_refused"),
        ("grpc", "/test.Echo/Echo", "14", "connect_refused"),
    ]


ROUTED_TO_A_NAME = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: routed
    http:
    - pathPrefix: /routed
    action: route
    to: backend.example.test:80
  - name: echo
    grpc:
    - service: test.Echo
    action: route
    to: backend.example.test:80
"""


@pytest.mark.asyncio
async def test_a_backend_lookup_that_times_out_gets_504_or_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout is answered 504 (INTERFACE: 502, 504 on timeout), a gRPC call
    UNAVAILABLE (grpc-status 14 for any unreachable upstream)."""
    with names_never_resolve(monkeypatch):
        async with loopback_proxy(
            tmp_path, monkeypatch, ROUTED_TO_A_NAME, local(closed_port()), connect_timeout=0.3
        ) as proxy:
            client = await connect_h2(proxy)
            grpc_call = {"content-type": "application/grpc", "te": "trailers"}
            answers = [
                client.request("GET", "/routed"),
                client.request("POST", "/test.Echo/Echo", b"\0\0\0\0\0", grpc_call),
            ]
            await all_answered(answers)
            client.transport.close()
            await proxy.wait_closed_flows(1)
    wire = [(a.headers[":status"], a.headers.get("grpc-status")) for a in answers]
    assert wire == [("504", None), ("200", "14")]
    assert sorted((r.path, r.status, r.grpc_status, r.error) for r in proxy.ledger.requests) == [
        ("/routed", 504, None, "dns_timeout"),
        ("/test.Echo/Echo", 504, 14, "dns_timeout"),
    ]


def send_raw_trailers(client: H2Client, stream_id: int, trailers: list[tuple[str, str]]) -> None:
    """Trailers without END_STREAM, which h2 will not send: encoded with the client's own
    HPACK encoder, so its header table stays in step with the proxy's."""
    client.transport.write(client.h2.data_to_send())
    frame = hyperframe.frame.HeadersFrame(stream_id, client.h2.encoder.encode(trailers))
    frame.flags.add("END_HEADERS")
    client.transport.write(frame.serialize())


@pytest.mark.asyncio
async def test_a_bad_content_length_or_trailers_reset_their_stream_not_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1.1: a content-length that is no number, a body longer or shorter than
    it, trailers without END_STREAM make a request malformed, a stream error. h2 made each
    a connection error (GOAWAY); now the stream alone is reset, what went upstream of it
    is cancelled there, and a stream beside it is answered."""
    RecordingH2Server.answered = []
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "example.test")]
    async with proxy_to_h2_origin(RecordingH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, LaxH2Client)
        not_a_number = client.send_block([*REQUEST, (":path", "/n"), ("content-length", "x")])
        longer = client.send_block([*post, (":path", "/l"), ("content-length", "3")], False)
        client.h2.send_data(client.h2.highest_outbound_stream_id, b"12345", end_stream=True)
        shorter = client.send_block([*post, (":path", "/s"), ("content-length", "9")], False)
        client.h2.send_data(client.h2.highest_outbound_stream_id, b"1234", end_stream=True)
        open_trailers = client.send_block([*post, (":path", "/t")], False)
        send_raw_trailers(client, client.h2.highest_outbound_stream_id, [("x-t", "1")])
        bad = [not_a_number, longer, shorter, open_trailers]
        good = client.request("POST", "/good", b"body", {"content-length": "4"})
        await only_the_good_stream_answered(proxy, client, bad, good)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    bad_paths = ["", "/l", "/s", "/t"]  # a head h2 refused is counted as HTTP/1 counts one
    assert outcomes == sorted([("/good", 200, ""), *((p, None, "bad_request") for p in bad_paths)])
    assert [flow.error for flow in proxy.ledger.flows] == [""]


@pytest.mark.asyncio
async def test_a_body_that_a_header_block_ends_short_of_its_content_length_is_not_forwarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1.1: a content-length the body does not match makes a request malformed.
    h2 compares them only at a DATA frame's END_STREAM, so a head with END_STREAM and a
    content-length above 0, or a short body ended by trailers, went upstream as they were;
    now the stream is reset (PROTOCOL_ERROR), what went upstream of it is cancelled, and a
    stream beside it is answered."""
    RecordingH2Server.answered = []
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "example.test")]
    async with proxy_to_h2_origin(RecordingH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, LaxH2Client)
        no_body = client.send_block([*post, (":path", "/e"), ("content-length", "5")])
        short = client.send_block([*post, (":path", "/s"), ("content-length", "9")], False)
        client.h2.send_data(client.h2.highest_outbound_stream_id, b"1234")
        client.transport.write(client.h2.data_to_send())
        await asyncio.sleep(0.2)  # the head and body are upstream before the trailers come
        client.h2.send_headers(client.h2.highest_outbound_stream_id, [("x-t", "1")], True)
        good = client.request("POST", "/good", b"body", {"content-length": "4"})
        await only_the_good_stream_answered(proxy, client, [no_body, short], good)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [("", None, "bad_request"), ("/good", 200, ""), ("/s", None, "bad_request")]


@pytest.mark.asyncio
async def test_a_stream_past_the_stream_limit_is_refused_not_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 5.1.2: a stream opened past our SETTINGS_MAX_CONCURRENT_STREAMS is a stream
    error. h2 made it a connection error (GOAWAY), ending the streams in flight too; now
    that stream alone is refused (REFUSED_STREAM, which a client may retry), counted
    bad_request, and the others are answered."""
    monkeypatch.setattr(egressproxy.http2, "MAX_CONCURRENT_STREAMS", 2)
    async with proxy_to_h2_origin(SlowH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        first = client.request("GET", "/first")
        async with asyncio.timeout(TIMEOUT):
            await first.done.wait()
        client.h2.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
        client.h2.remote_settings.acknowledge()  # past the proxy's limit of 2
        within = [client.request("GET", f"/{number}") for number in range(2)]
        past = client.request("GET", "/past")
        await all_answered([*within, past])
        assert (past.reset, past.reset_code) == (True, h2.errors.ErrorCodes.REFUSED_STREAM)
        after = client.request("GET", "/after")
        async with asyncio.timeout(TIMEOUT):
            await after.done.wait()
        answered = [(a.headers.get(":status"), bytes(a.body)) for a in [first, *within, after]]
        assert answered == [("200", b"late")] * 4
        assert not client.goaway
        client.transport.close()
        await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [
        ("", None, "bad_request"),
        ("/0", 200, ""),
        ("/1", 200, ""),
        ("/after", 200, ""),
        ("/first", 200, ""),
    ]


def test_the_goaway_filter_refuses_an_oversized_frame_by_its_header() -> None:
    frames = GoawayFilter(0)
    header = (16384 + 1).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        frames.split(header, 16384)


@pytest.mark.asyncio
async def test_an_oversized_frame_ends_the_connection_before_it_is_buffered(
    h2_setup: tuple[LoopbackProxy, int],
) -> None:
    """RFC 9113 4.2: a frame longer than SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR.
    h2 buffered the whole frame (up to 16 MiB per connection) before checking; now its
    9-byte header is enough: GOAWAY FRAME_SIZE_ERROR and the connection closes."""
    proxy, _ = h2_setup
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    settings = hyperframe.frame.SettingsFrame(0).serialize()
    announced = ((1 << 24) - 1).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    writer.write(H2_PREFACE + settings + announced)
    received = bytearray()
    async with asyncio.timeout(TIMEOUT / 5):
        while chunk := await reader.read(65536):
            received += chunk
    writer.close()
    goaways = [frame for kind, frame in frames_of(received) if kind == 7]
    assert [int.from_bytes(frame[13:17], "big") for frame in goaways] == [
        h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    ]
    await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == ["bad_request"]


class MalformedH2Origin(SlowH2Origin):
    """Answers /head with an uppercase header name, /body with a body longer than its
    content-length, /short with one shorter ended by trailers, /status and /long-status
    with a :status that is not three digits, after DELAY; /good a little later, on the
    same connection."""

    LIMIT = 10

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers or [])[b":path"]
                delay = self.DELAY * (2 if path == b"/good" else 1)
                asyncio.get_running_loop().call_later(delay, self.reply, event.stream_id, path)
        self.transport.write(self.h2.data_to_send())

    def reply(self, stream_id: int, path: bytes) -> None:
        if path == b"/head":
            self.h2.config.validate_outbound_headers = False
            self.h2.config.normalize_outbound_headers = False
            self.h2.send_headers(stream_id, [(":status", "200"), ("X-Upper", "1")], True)
        elif path == b"/body":
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "2")])
            self.h2.send_data(stream_id, b"longer", end_stream=True)
        elif path == b"/short":
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "9")])
            self.h2.send_data(stream_id, b"1234")
            self.h2.send_headers(stream_id, [("x-t", "1")], end_stream=True)
        elif path in (b"/status", b"/long-status"):
            status = "abc" if path == b"/status" else "2000"
            self.h2.send_headers(stream_id, [(":status", status)], end_stream=True)
        else:
            self.answer(stream_id)
            return
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_malformed_response_fails_its_stream_not_the_upstream_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1.1: a malformed response is a stream error too. h2 made it a connection
    error, so the upstream connection ended and every stream on it failed 502; now a
    malformed head gets 502, a malformed body resets its client stream, both counted
    bad_response, and the stream beside them on that upstream is answered."""
    async with proxy_to_h2_origin(MalformedH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        paths = ("/head", "/body", "/short", "/status", "/long-status", "/good")
        head, body, short, status, long_status, good = (
            client.request("GET", path) for path in paths
        )
        await all_answered((head, body, short, status, long_status, good))
        assert [a.headers[":status"] for a in (head, status, long_status)] == ["502"] * 3
        assert [(a.reset, a.reset_code) for a in (body, short)] == [
            (True, h2.errors.ErrorCodes.INTERNAL_ERROR)
        ] * 2
        assert (good.headers[":status"], bytes(good.body)) == ("200", b"late")
        client.transport.close()
        await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [
        ("/body", 200, "bad_response"),
        ("/good", 200, ""),
        ("/head", 502, "bad_response"),
        ("/long-status", 502, "bad_response"),
        ("/short", 200, "bad_response"),
        ("/status", 502, "bad_response"),
    ]


@pytest.mark.asyncio
async def test_a_grpc_call_the_proxy_answers_on_an_http_route_counts_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no gRPC rule applies a gRPC call's route is an HTTP one; the proxy's trailers-
    only answer is HTTP 200 on the wire, but a deny is counted http_status 403 and an
    unreachable upstream 502 with its cause, as INTERFACE §4 shows them, not 200."""
    closed = closed_port()
    async with loopback_proxy(tmp_path, monkeypatch, BLOCKED_HOST, local(closed)) as proxy:
        registry = CollectorRegistry()
        lines = Lines(LogFormat.JSON)
        proxy.context.accounting = Reporting(Metrics(registry, max_hostnames=10), lines.access_log)
        client = await connect_h2(proxy)
        grpc_call = {"content-type": "application/grpc", "te": "trailers"}
        answers = [
            client.request("POST", "/test.Echo/Echo", b"\0" * 5, grpc_call, "blocked.test"),
            client.request("POST", "/test.Echo/Echo", b"\0" * 5, grpc_call, "example.test"),
        ]
        await all_answered(answers)
        client.transport.close()
        async with asyncio.timeout(TIMEOUT):
            while proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    wire = [(a.headers[":status"], a.headers.get("grpc-status")) for a in answers]
    assert wire == [("200", "7"), ("200", "14")]
    assert request_statuses(registry, "http") == [
        ("http-egress-allow", "502", "connect_refused", 1.0),
        ("test.blocked", "403", "", 1.0),
    ]
    logged = [json.loads(line) for line in lines.lines()]
    requests = sorted((entry["hostname"], entry["status"], entry["error"])
                      for entry in logged if "method" in entry)  # fmt: skip
    assert requests == [("blocked.test", "403", ""), ("example.test", "502", "connect_refused")]


class EndedInformationalH2Origin(SlowH2Origin):
    """Answers a stream asking `x-reply: 1xx-end-stream` at once with a 103 HEADERS frame
    carrying END_STREAM (malformed, RFC 9113 8.1.1; written past h2, which refuses to send
    it), every other stream after 2 * DELAY on the same connection: 200 "late", or a
    trailers-only grpc-status 0 to a gRPC call. Keeps the (stream, code) of each reset."""

    LIMIT = 10
    resets: ClassVar[list[tuple[int, int | None]]] = []

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers or [])
                if headers.get(b"x-reply") == b"1xx-end-stream":
                    self.send_ended_informational(event.stream_id)
                else:
                    grpc_call = headers.get(b"content-type") == b"application/grpc"
                    answer = self.answer_grpc if grpc_call else self.answer
                    asyncio.get_running_loop().call_later(2 * self.DELAY, answer, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets.append((event.stream_id, event.error_code))
        self.transport.write(self.h2.data_to_send())

    def send_ended_informational(self, stream_id: int) -> None:
        block = self.h2.encoder.encode([(b":status", b"103"), (b"link", b"</a.css>")])
        frame = hyperframe.frame.HeadersFrame(stream_id, block, flags={"END_HEADERS", "END_STREAM"})
        self.transport.write(self.h2.data_to_send() + frame.serialize())

    def answer_grpc(self, stream_id: int) -> None:
        headers = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "0")]
        self.h2.send_headers(stream_id, headers, end_stream=True)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("family", "request_args", "bad_wire", "counted"),
    [
        (
            "http",
            ("GET", "/informational", b""),
            ("502", None),
            [
                ("http-egress-allow", "200", "", 1.0),
                ("http-egress-allow", "502", "bad_response", 1.0),
            ],
        ),
        (
            "grpc",
            ("POST", "/test.Echo/Echo", b"\0" * 5),
            ("200", "14"),
            [("test.echo", "OK", "", 1.0), ("test.echo", "UNAVAILABLE", "bad_response", 1.0)],
        ),
    ],
)
async def test_an_informational_response_that_ends_its_stream_fails_that_stream_alone(
    family: str,
    request_args: tuple[str, str, bytes],
    bad_wire: tuple[str, str | None],
    counted: list[tuple[str, str, str, float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RFC 9113 8.1.1: a 1xx response with END_STREAM is malformed, a stream error. h2
    raised it as a connection error, so the upstream connection was cut and the stream
    beside it on that connection failed too (502 bad_response). Now the upstream stream
    alone is reset PROTOCOL_ERROR, the client gets the proxy's answer to a malformed
    response (502, gRPC UNAVAILABLE) counted bad_response, and the other stream its answer."""
    EndedInformationalH2Origin.resets = []
    async with proxy_to_h2_origin(EndedInformationalH2Origin, tmp_path, monkeypatch) as proxy:
        registry = CollectorRegistry()
        lines = Lines(LogFormat.JSON)
        proxy.context.accounting = Reporting(Metrics(registry, max_hostnames=10), lines.access_log)
        client = await connect_h2(proxy)
        headers = {"content-type": "application/grpc", "te": "trailers"} if family == "grpc" else {}
        bad = client.request(*request_args, {**headers, "x-reply": "1xx-end-stream"})
        good = client.request(*request_args, headers)
        await all_answered((bad, good))
        assert (bad.headers[":status"], bad.headers.get("grpc-status")) == bad_wire
        if family == "http":
            assert (good.headers[":status"], bytes(good.body)) == ("200", b"late")
        else:
            assert (good.headers[":status"], good.headers["grpc-status"]) == ("200", "0")
        assert not client.goaway
        assert EndedInformationalH2Origin.resets == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
        client.transport.close()
        async with asyncio.timeout(TIMEOUT):
            while proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    assert request_statuses(registry, family) == counted


def download(goaway: bool, paths: Sequence[str] = ("/bytes/131072",)) -> bytes:
    """A client's preface with windows wide open, a GET of each path (/bytes/131072: 128 KiB
    from H2Server), and (goaway) its GOAWAY."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
    )
    client.initiate_connection()
    client.increment_flow_control_window(1 << 20)
    request = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test")]
    for stream_id, path in enumerate(paths, 1):
        client.send_headers(2 * stream_id - 1, [*request, (":path", path)], end_stream=True)
    if goaway:
        client.close_connection()
    return client.data_to_send()


ZERO_WINDOW_UPDATE = b"\0\0\x04\x08\0\0\0\0\0\0\0\0\0"
"""A WINDOW_UPDATE of 0 on the connection: a connection error (RFC 9113 6.9)."""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("goaway", "then", "error"),
    [(True, b"", "idle_timeout"), (False, ZERO_WINDOW_UPDATE, "bad_request")],
    ids=["goaway-after-the-last-stream", "protocol-error"],
)
async def test_a_closing_connection_whose_client_reads_nothing_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, goaway: bool, then: bytes, error: str
) -> None:
    """Closing (its last stream done after a GOAWAY, or a protocol error) while the client
    reads nothing: the close waited for the client for ever, the idle sweep no longer
    looking, holding its place against --max-connections and its upstream connection.
    As with HTTP/1, once nothing more went out for the idle timeout it is cut."""
    async with proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, idle_timeout=0.4) as proxy:
        client = await client_that_never_reads(proxy)
        client.send(download(goaway))
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while not handler.transport.get_write_buffer_size():
                await asyncio.sleep(0.01)
        client.send(then)
        await proxy.wait_closed_flows(1, timeout=4.0)
        client.close()
    assert [flow.error for flow in proxy.ledger.flows] == [error]


class PlainH2Origin(asyncio.Protocol):
    """An h2 origin with h2's default settings, which says them on connecting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())


class HeldH2Origin(PlainH2Origin):
    """An h2 origin that answers a stream only when the test says (answer), and keeps what
    the proxy did to its connection: the streams reset (id, code), the GOAWAY's code, the
    loss of the connection."""

    def __init__(self, connections: list[HeldH2Origin]) -> None:
        connections.append(self)
        self.requests: dict[str, int] = {}
        """The stream id of each request path."""
        self.resets: list[tuple[int, int]] = []
        self.goaway: int | None = None
        self.lost = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers or [])[b":path"].decode()
                self.requests[path] = cast(int, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets.append((cast(int, event.stream_id), cast(int, event.error_code)))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
        self.transport.write(self.h2.data_to_send())

    def begin(self, path: str) -> None:
        """The head of a 200 to the request for path, and no more."""
        self.h2.send_headers(self.requests[path], [(":status", "200")])
        self.transport.write(self.h2.data_to_send())

    def answer(self, path: str, body: bytes = b"done") -> None:
        """200 with body (within the proxy's windows) to the request for path."""
        stream_id = self.requests[path]
        headers = [(":status", "200"), ("content-length", str(len(body)))]
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        size = self.h2.max_outbound_frame_size
        for start in range(0, len(body), size):
            end_stream = start + size >= len(body)
            self.h2.send_data(stream_id, body[start : start + size], end_stream=end_stream)
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


TWO_ORIGINS = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: second
    http:
    - pathPrefix: /second
    action: route
    to: 127.0.0.1:{second}
"""
"""Streams to /second go to the second origin, the rest to the original destination."""


@dataclass
class HeldOrigins:
    proxy: LoopbackProxy
    first: list[HeldH2Origin]
    """The connections of the original destination."""
    second: list[HeldH2Origin]
    """The connections of the origin /second is routed to."""

    async def requested(self, *paths: str) -> HeldH2Origin:
        """The origin connection that received these paths (waiting for them)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for connection in [*self.first, *self.second]:
                    if all(path in connection.requests for path in paths):
                        return connection
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def held_origins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> AsyncIterator[HeldOrigins]:
    """A loopback proxy in front of two HeldH2Origins: /second goes to the second."""
    loop = asyncio.get_running_loop()
    first: list[HeldH2Origin] = []
    second: list[HeldH2Origin] = []
    first_server = await loop.create_server(lambda: HeldH2Origin(first), "127.0.0.1", 0)
    second_server = await loop.create_server(lambda: HeldH2Origin(second), "127.0.0.1", 0)
    try:
        policy = TWO_ORIGINS.format(second=second_server.sockets[0].getsockname()[1])
        destination = local(first_server.sockets[0].getsockname()[1])
        async with loopback_proxy(tmp_path, monkeypatch, policy, destination, **settings) as proxy:
            yield HeldOrigins(proxy, first, second)
    finally:
        first_server.close()
        second_server.close()


@pytest.mark.asyncio
async def test_upstreams_a_client_leaves_while_they_connect_give_their_room_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams to two upstreams, each cancelled, then GOAWAY, all in one write: the second
    upstream (room taken from the accepting) had its connect cancelled before it ever ran,
    and its room never came back; each such client took one place against
    --max-connections for good, until the worker stopped accepting with nothing open."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        proxy = origins.proxy
        for number in range(3):
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            for stream_id, path in ((1, "/first"), (3, "/second")):
                head = [(":method", "GET"), (":scheme", "http"), (":authority", "a.test")]
                client.send_headers(stream_id, [*head, (":path", path)], end_stream=True)
                client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.close_connection()
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(client.data_to_send())
            writer.write_eof()
            async with asyncio.timeout(TIMEOUT):
                await reader.read()
            writer.close()
            await proxy.wait_closed_flows(number + 1)
        open_flows = proxy.context.open_flows
        assert (open_flows.extra, open_flows.full) == (0, False)


@pytest.mark.asyncio
async def test_an_upstream_whose_connect_is_cancelled_once_made_gives_its_room_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop closes a transport made just before the connect was cancelled without calling
    connection_lost: the room of an upstream whose transport was set then still has to
    come back (here the cancel comes as uvloop leaves it: made, closed, never told)."""
    real_connect = egressproxy.http2.upstream_connector.connect

    async def made_then_cancelled(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await real_connect(host, port, *args, **kwargs)
        if port != first_port:
            protocol.connection_lost = lambda exc: None
            transport.abort()
            raise asyncio.CancelledError
        return transport, protocol

    monkeypatch.setattr(egressproxy.http2.upstream_connector, "connect", made_then_cancelled)
    async with held_origins(tmp_path, monkeypatch) as origins:
        proxy = origins.proxy
        first_port = proxy.destination[0].port
        client = await connect_h2(proxy)
        first = client.request("GET", "/first")
        await origins.requested("/first")
        client.request("GET", "/second")
        async with asyncio.timeout(TIMEOUT):
            while not origins.second:
                await asyncio.sleep(0.01)
        origins.first[0].answer("/first")
        async with asyncio.timeout(TIMEOUT):
            await first.done.wait()
        client.transport.close()
        await proxy.wait_closed_flows(1)
        assert proxy.context.open_flows.extra == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("closing", ["drain", "client-goaway"])
async def test_a_closing_connection_closes_each_upstream_as_its_last_stream_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closing: str
) -> None:
    """After a GOAWAY (a drain's, or the client's) no new stream goes upstream: an upstream
    connection whose last stream ended is closed then (GOAWAY, close), while the client's
    connection waits for a stream on another upstream; the last closes with the client's."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        client = await connect_h2(origins.proxy, GoawayReadingClient)
        first, second = client.request("GET", "/first"), client.request("GET", "/second")
        first_origin = await origins.requested("/first")
        second_origin = await origins.requested("/second")
        handler = await only_handler(origins.proxy)
        if closing == "drain":
            handler.flow.drain()
        else:
            client.transport.write(goaway(0))
        async with asyncio.timeout(TIMEOUT):
            while not client.goaway:
                await asyncio.sleep(0.01)
        second_origin.answer("/second")
        async with asyncio.timeout(TIMEOUT):
            await second.done.wait()
        async with asyncio.timeout(2.0):
            await second_origin.lost.wait()
        assert second_origin.goaway == h2.errors.ErrorCodes.NO_ERROR
        assert not first_origin.lost.is_set()
        assert not client.lost.is_set()
        first_origin.answer("/first")
        async with asyncio.timeout(TIMEOUT):
            await first.done.wait()
            await client.lost.wait()
            await first_origin.lost.wait()
        await origins.proxy.wait_closed_flows(1)
    assert first_origin.goaway == h2.errors.ErrorCodes.NO_ERROR
    assert [(bytes(a.body), a.reset) for a in (first, second)] == [(b"done", False)] * 2
    outcomes = sorted((r.path, r.status, r.error) for r in origins.proxy.ledger.requests)
    assert outcomes == [("/first", 200, ""), ("/second", 200, "")]
    assert [(c.resets, len(c.requests)) for c in (first_origin, second_origin)] == [([], 1)] * 2


@pytest.mark.asyncio
@pytest.mark.parametrize("uploads", [4, 20])
async def test_uploads_an_upstream_reads_nothing_of_hold_at_most_the_clients_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uploads: int
) -> None:
    """Uploads, each larger than a stream's window, to an upstream that acknowledges
    nothing: the proxy takes from the client a stream window (64 KiB) per stream, within
    its connection window (1 MiB), and what the upstream's own 64 KiB window took. What
    one client connection can make the proxy hold is bounded by that window."""
    upstream_window = 65535
    paths = [f"/upload/{number}" for number in range(uploads)]
    async with held_origins(tmp_path, monkeypatch) as origins:
        client = await connect_h2(origins.proxy)
        body = bytes(2 * STREAM_WINDOW)
        for path in paths:
            client.request("POST", path, body)
        await origins.requested(*paths)
        async with asyncio.timeout(TIMEOUT):
            while any(client.h2.local_flow_control_window(sid) for sid in client.uploads):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a window the proxy still opened would be used by now
        sent = sum(len(body) - len(rest) for rest in client.uploads.values())
        assert len(client.uploads) == len(paths)
        held = min(uploads * CLIENT_STREAM_WINDOW, CLIENT_CONNECTION_WINDOW)
        assert held <= sent <= held + upstream_window
        client.transport.close()
        await origins.proxy.wait_closed_flows(1)


async def window_spent(client: H2Client, stream_id: int) -> None:
    """Until the client may send no more on the stream (its window, or its connection's)."""
    async with asyncio.timeout(TIMEOUT):
        while client.h2.local_flow_control_window(stream_id):
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_one_held_upload_leaves_the_connection_window_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's window was the whole connection window (1 MiB each), so one upload to an
    upstream that reads nothing yet took all of it, and a 2-byte POST to another upstream
    never left the client. Linkerd offers a stream 64 KiB of its 1 MiB."""
    loop = asyncio.get_running_loop()
    held: list[HeldH2Origin] = []
    first = await loop.create_server(lambda: HeldH2Origin(held), "127.0.0.1", 0)
    second = await loop.create_server(H2Server, "127.0.0.1", 0)
    try:
        policy = TWO_ORIGINS.format(second=second.sockets[0].getsockname()[1])
        destination = local(first.sockets[0].getsockname()[1])
        async with loopback_proxy(tmp_path, monkeypatch, policy, destination) as proxy:
            client = await connect_h2(proxy)
            client.request("POST", "/upload", bytes(2 << 20))
            await window_spent(client, max(client.uploads))
            small = client.request("POST", "/second/echo", b"hi")
            async with asyncio.timeout(TIMEOUT):
                await small.done.wait()
            client.transport.close()
            await proxy.wait_closed_flows(1)
    finally:
        first.close()
        second.close()
    assert json.loads(small.body)["body"]["length"] == 2


class OneStreamH2Server(H2Server):
    """The JSON echo origin, one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}
        )
        super().connection_made(transport)


class OneSlotH2Origin(SlowH2Origin):
    """One stream at a time; answers after DELAY, but /reset with RST_STREAM INTERNAL_ERROR,
    /reset-late with a head, some body and that reset, /bad with `:status 20x`, /goaway
    with its answer and a GOAWAY in one write, /close with a head and then its connection
    closed. Each connection's request paths go to `connections`."""

    DELAY = 0.1
    LIMIT = 1

    def __init__(self, connections: list[list[str]]) -> None:
        self.paths: list[str] = []
        connections.append(self.paths)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers or [])[b":path"].decode()
                self.paths.append(path)
                asyncio.get_running_loop().call_later(self.DELAY, self.act, event.stream_id, path)
        self.transport.write(self.h2.data_to_send())

    def act(self, stream_id: int, path: str) -> None:
        if path in ("/reset", "/reset-late"):
            if path == "/reset-late":
                self.h2.send_headers(stream_id, [(":status", "200")])
                self.h2.send_data(stream_id, b"part")
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/bad":
            self.h2.send_headers(stream_id, [(":status", "20x")], end_stream=True)
        elif path == "/close":
            self.h2.send_headers(stream_id, [(":status", "200")])
            self.transport.write(self.h2.data_to_send())
            self.transport.close()
            return
        else:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "4")])
                self.h2.send_data(stream_id, b"late", end_stream=True)
            if path == "/goaway":
                self.transport.write(self.h2.data_to_send() + goaway(stream_id))
                return
        self.transport.write(self.h2.data_to_send())


async def first_then_waiting(proxy: LoopbackProxy, first: str) -> tuple[Answer, Answer]:
    """/first's answer, and that of /waiting, sent while /first holds the one slot."""
    client = await connect_h2(proxy)
    holding = client.request("GET", first)
    await asyncio.sleep(0.05)
    waiting = client.request("GET", "/waiting")
    async with asyncio.timeout(TIMEOUT):
        await holding.done.wait()
        await waiting.done.wait()
    client.transport.close()
    await proxy.wait_closed_flows(1)
    return holding, waiting


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "status"), [("/reset", "502"), ("/reset-late", "200"), ("/bad", "502")]
)
async def test_a_slot_an_upstream_reset_or_malformed_answer_frees_goes_to_a_waiting_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, status: str
) -> None:
    """The stream waiting for the upstream's one slot was opened when an answer ended or a
    stream was refused, not when the upstream reset the stream holding it or answered it
    malformed: it waited for another stream's event, or for --idle-timeout (an hour by
    default), which then cut the whole client connection."""
    connections: list[list[str]] = []
    origin = functools.partial(OneSlotH2Origin, connections)
    async with proxy_to_h2_origin(origin, tmp_path, monkeypatch) as proxy:
        holding, waiting = await first_then_waiting(proxy, first)
    assert holding.headers[":status"] == status
    assert (waiting.headers[":status"], bytes(waiting.body)) == ("200", b"late")
    assert connections == [[first, "/waiting"]]


@pytest.mark.asyncio
async def test_no_stream_is_opened_on_an_upstream_after_its_goaway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 6.8: the receiver of a GOAWAY MUST NOT open more streams on its connection.
    The GOAWAY read with the answer that freed the slot (nginx's at keepalive_requests) was
    handled after it, and the waiting stream went to the closing connection (then again to
    a new one, its one retry spent, or 502 with a body past REPLAY_LIMIT)."""
    connections: list[list[str]] = []
    origin = functools.partial(OneSlotH2Origin, connections)
    async with proxy_to_h2_origin(origin, tmp_path, monkeypatch) as proxy:
        holding, waiting = await first_then_waiting(proxy, "/goaway")
    assert [answer.headers[":status"] for answer in (holding, waiting)] == ["200", "200"]
    assert connections == [["/goaway"], ["/waiting"]]


@pytest.mark.asyncio
async def test_streams_waiting_for_a_lost_upstream_go_to_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream waiting for a stream slot was never sent: when the upstream's connection
    ends without a GOAWAY, it goes to a new connection, as after one, where it failed 502
    "upstream reset". The stream in flight is reset (its answer began)."""
    connections: list[list[str]] = []
    origin = functools.partial(OneSlotH2Origin, connections)
    async with proxy_to_h2_origin(origin, tmp_path, monkeypatch) as proxy:
        holding, waiting = await first_then_waiting(proxy, "/close")
    assert (holding.reset, waiting.headers[":status"], bytes(waiting.body)) == (
        True,
        "200",
        b"late",
    )
    assert connections == [["/close"], ["/waiting"]]
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/close", 200, "reset"),
        ("/waiting", 200, ""),
    ]


class HeadOnlyH2Origin(PlainH2Origin):
    """Answers every stream with a head alone (END_STREAM) saying content-length: 100, but
    /switch with a 101 and then a sound 200."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        config = h2.config.H2Configuration(client_side=False, validate_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                stream_id = cast(int, event.stream_id)
                if dict(event.headers or [])[b":path"] == b"/switch":
                    self.h2.send_headers(stream_id, [(":status", "101")])
                    self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "4")])
                    self.h2.send_data(stream_id, b"good", end_stream=True)
                    continue
                head = [(":status", "200"), ("content-length", "100")]
                self.h2.send_headers(stream_id, head, end_stream=True)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_response_head_missing_its_body_or_a_101_is_not_forwarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9113 8.1.1: an intermediary must not forward a malformed response; a head with
    END_STREAM that says content-length: 100 is one, but for HEAD (or 204, 304), and
    HTTP/2 has no 101 (8.6). curl took each forwarded for a stream not closed cleanly;
    the proxy counted it a success. Each gets 502 bad_response, its stream alone."""
    async with proxy_to_h2_origin(HeadOnlyH2Origin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        answers = [
            client.request("GET", "/get"),
            client.request("HEAD", "/head"),
            client.request("GET", "/switch"),
        ]
        await all_answered(answers)
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert [answer.headers[":status"] for answer in answers] == ["502", "200", "502"]
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == [
        ("/get", 502, "bad_response"),
        ("/head", 200, ""),
        ("/switch", 502, "bad_response"),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("waiting", [1, 20])
async def test_streams_waiting_for_the_upstreams_slot_do_not_starve_the_one_using_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waiting: int
) -> None:
    """The upstream takes one stream at a time (grpcio's and nginx's limit is 100). /first
    is open upstream, its body still to come; the others wait for the slot and send their
    bodies meanwhile. They filled the client's connection window (one stream's window was
    all of it; then sixteen 64 KiB ones), so /first's body could never come, nor a slot
    free: all hung until the idle timeout. A client's streams' windows together now fit
    in its connection window."""
    async with proxy_to_h2_origin(OneStreamH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        first_id, first = client.open_stream("POST", "/first")
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while not any(upstream.streams for upstream in handler.upstreams.values()):
                await asyncio.sleep(0.01)
        others = [client.request("POST", f"/other/{n}", bytes(2 << 20)) for n in range(waiting)]
        for stream_id in list(client.uploads):
            await window_spent(client, stream_id)
        client.upload(first_id, bytes(100_000))
        await all_answered((first, *others))
        client.transport.close()
        await proxy.wait_closed_flows(1)
    lengths = [json.loads(answer.body)["body"]["length"] for answer in (first, *others)]
    assert lengths == [100_000] + [2 << 20] * waiting


@pytest.mark.asyncio
@pytest.mark.parametrize("closing", ["goaway", "protocol-error", "eof"])
async def test_a_connection_closing_to_a_client_that_reads_nothing_closes_its_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, closing: str
) -> None:
    """The connection closes (its last stream done after the client's GOAWAY; a protocol
    error or the client's EOF with /second in flight) while its bytes wait for a client that
    reads nothing, until the idle timeout cuts it. Its upstream connections, of no use any
    more, are closed at once, a stream in flight cancelled and counted, not held that long
    (after a protocol error, its answer coming meanwhile raised in h2, with a traceback)."""
    cancel, no_error = h2.errors.ErrorCodes.CANCEL, h2.errors.ErrorCodes.NO_ERROR
    async with held_origins(tmp_path, monkeypatch, idle_timeout=60.0) as origins:
        client = await client_that_never_reads(origins.proxy)
        paths = ("/first",) if closing == "goaway" else ("/first", "/second")
        client.send(download(goaway=closing == "goaway", paths=paths))
        handler = await only_handler(origins.proxy)
        used = [await origins.requested(path) for path in paths]
        used[0].answer("/first", bytes(UPSTREAM_STREAM_WINDOW))
        async with asyncio.timeout(TIMEOUT):
            while not handler.transport.get_write_buffer_size():
                await asyncio.sleep(0.01)
            if closing == "protocol-error":
                client.send(ZERO_WINDOW_UPDATE)
            elif closing == "eof":
                client.shutdown(socket.SHUT_WR)
            while not handler.closed:
                await asyncio.sleep(0.01)
        assert handler.transport.get_write_buffer_size(), "the client has bytes unread"
        async with asyncio.timeout(2.0):
            for origin in used:
                await origin.lost.wait()
        assert [(o.resets, o.goaway) for o in used] == [([], no_error), ([(1, cancel)], no_error)][
            : len(used)
        ]
        assert origins.proxy.ledger.flows == []
        client.close()
    outcomes = [(r.path, r.status, r.error) for r in origins.proxy.ledger.requests]
    cut = "bad_request" if closing == "protocol-error" else "reset"
    assert outcomes == [("/first", 200, ""), ("/second", None, cut)][: len(used)]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ending", "connection_error", "request_error"),
    [
        ("close", "", "reset"),
        ("write-eof", "", "reset"),
        ("rst", "reset", "reset"),
        ("drain-timeout", "drain", "drain"),
        ("protocol-error", "bad_request", "bad_request"),
    ],
)
async def test_streams_in_flight_when_the_connection_ends_are_cancelled_upstream(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
    connection_error: str,
    request_error: str,
) -> None:
    """The client's connection ends with streams in flight on two upstreams (one response
    begun): each upstream stream is reset CANCEL, each upstream connection gets a GOAWAY
    and is closed, and each request is counted once, with the cause of the end: the
    client's protocol error is its streams' too (bad_request, as on the connection), where
    they were counted as reset."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        registry = CollectorRegistry()
        lines = Lines(LogFormat.JSON)
        origins.proxy.context.accounting = Reporting(
            Metrics(registry, max_hostnames=10), lines.access_log
        )
        client = await connect_h2(origins.proxy)
        for path in ("/begun", "/waiting", "/second"):
            client.request("GET", path)
        first_origin = await origins.requested("/begun", "/waiting")
        second_origin = await origins.requested("/second")
        first_origin.begin("/begun")
        async with asyncio.timeout(TIMEOUT):
            while not client.answers[1].headers:
                await asyncio.sleep(0.01)
        handler = await only_handler(origins.proxy)
        if ending == "close":
            client.transport.close()
        elif ending == "write-eof":
            client.transport.write_eof()
        elif ending == "rst":
            linger_zero = struct.pack("ii", 1, 0)  # close with RST
            client.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, linger_zero
            )
            client.transport.abort()
        elif ending == "drain-timeout":
            handler.flow.abort()
        else:
            client.transport.write(ZERO_WINDOW_UPDATE)
        async with asyncio.timeout(TIMEOUT):
            await first_origin.lost.wait()
            await second_origin.lost.wait()
            await client.lost.wait()
            while origins.proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    cancel, no_error = h2.errors.ErrorCodes.CANCEL, h2.errors.ErrorCodes.NO_ERROR
    assert (first_origin.resets, first_origin.goaway) == ([(1, cancel), (3, cancel)], no_error)
    assert (second_origin.resets, second_origin.goaway) == ([(1, cancel)], no_error)
    assert handler.flow.record.error == connection_error
    assert request_statuses(registry, "http") == [
        ("http-egress-allow", "", request_error, 1.0),
        ("http-egress-allow", "200", request_error, 1.0),
        ("test.second", "", request_error, 1.0),
    ]


@pytest.mark.asyncio
async def test_a_stream_on_an_upstream_that_sent_goaway_is_cancelled_when_the_client_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream said GOAWAY after our stream (it still answers it), then the client's
    connection ends: that stream is still reset CANCEL upstream and counted once."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        registry = CollectorRegistry()
        origins.proxy.context.accounting = Reporting(
            Metrics(registry, max_hostnames=10), Lines(LogFormat.JSON).access_log
        )
        client = await connect_h2(origins.proxy)
        client.request("GET", "/held")
        origin = await origins.requested("/held")
        origin.transport.write(goaway(origin.requests["/held"]))
        await asyncio.sleep(0.2)
        client.transport.close()
        async with asyncio.timeout(TIMEOUT):
            await origin.lost.wait()
            while origins.proxy.context.open_flows.flows:
                await asyncio.sleep(0.01)
    assert origin.resets == [(1, h2.errors.ErrorCodes.CANCEL)]
    assert request_statuses(registry, "http") == [("http-egress-allow", "", "reset", 1.0)]


OriginT = TypeVar("OriginT", bound=HeldH2Origin)


@contextlib.asynccontextmanager
async def one_h2_origin(
    kind: type[OriginT], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LoopbackProxy, list[OriginT]]]:
    """A loopback proxy in front of one origin of kind, and the origin's connections."""
    loop = asyncio.get_running_loop()
    connections: list[OriginT] = []
    made = cast(list[HeldH2Origin], connections)  # each origin adds itself
    server = await loop.create_server(lambda: kind(made), "127.0.0.1", 0)
    try:
        destination = local(server.sockets[0].getsockname()[1])
        async with loopback_proxy(tmp_path, monkeypatch, ALLOW_ALL, destination) as proxy:
            yield proxy, connections
    finally:
        server.close()


async def requested_of(connections: list[OriginT], path: str) -> OriginT:
    """The one origin connection, once it has received the request for path."""
    async with asyncio.timeout(TIMEOUT):
        while not connections or path not in connections[0].requests:
            await asyncio.sleep(0.01)
    (origin,) = connections
    return origin


class WindowCountingOrigin(HeldH2Origin):
    """A HeldH2Origin that counts the stream WINDOW_UPDATEs it receives."""

    def __init__(self, connections: list[HeldH2Origin]) -> None:
        super().__init__(connections)
        self.stream_updates = 0

    def data_received(self, data: bytes) -> None:
        buffer = bytearray(data)
        for kind, frame in frames_of(buffer):
            stream_id = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            if kind == hyperframe.frame.WindowUpdateFrame.type and stream_id:
                self.stream_updates += 1
        super().data_received(data)


@pytest.mark.asyncio
async def test_an_upstream_that_said_goaway_is_written_to_only_once_it_waits_for_a_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc-go and grpc-core, at max_connection_age, say GOAWAY and close as soon as their
    last answer is written, some of it still unsent while the proxy reads slowly; a
    WINDOW_UPDATE reaching them after that close made their kernel abort the connection,
    drop what was unsent, and calls failed mid-stream (13% of streaming calls under
    load). After a GOAWAY the proxy gives a window only once the stream's is spent."""
    async with one_h2_origin(WindowCountingOrigin, tmp_path, monkeypatch) as (proxy, connections):
        client = await connect_h2(proxy)
        answer = client.request("GET", "/download")
        origin = await requested_of(connections, "/download")
        stream_id = origin.requests["/download"]
        origin.begin("/download")
        origin.transport.write(goaway(stream_id))
        window = origin.h2.local_flow_control_window(stream_id)
        for size in (window // 2, window - window // 2):  # half, then what is left
            frame_size = origin.h2.max_outbound_frame_size
            for start in range(0, size, frame_size):
                origin.h2.send_data(stream_id, bytes(min(frame_size, size - start)))
            origin.transport.write(origin.h2.data_to_send())
            async with asyncio.timeout(TIMEOUT):
                while len(answer.body) < window // 2 or (
                    size != window // 2 and origin.stream_updates == 0
                ):
                    await asyncio.sleep(0.01)
            if size == window // 2:
                await asyncio.sleep(0.2)
                assert origin.stream_updates == 0, "written to while it did not wait"
        origin.h2.send_data(stream_id, b"end", end_stream=True)
        origin.transport.write(origin.h2.data_to_send())
        await all_answered([answer])
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (answer.reset, len(answer.body)) == (False, window + 3)
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")]


class BodyKeepingOrigin(HeldH2Origin):
    """A HeldH2Origin that keeps the request bodies it receives, and which have ended."""

    def __init__(self, connections: list[HeldH2Origin]) -> None:
        super().__init__(connections)
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            stream_id = cast(int, getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.RequestReceived):
                self.requests[dict(event.headers or [])[b":path"].decode()] = stream_id
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[stream_id] = self.bodies.get(stream_id, b"") + (event.data or b"")
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(stream_id)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_an_upload_to_an_upstream_that_said_goaway_still_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client-streaming or bidi call on a connection its server has since said GOAWAY
    on: the server waits for the rest of the request, so the proxy writes it (a stream
    whose request goes on is one the server has not finished)."""
    async with one_h2_origin(BodyKeepingOrigin, tmp_path, monkeypatch) as (proxy, connections):
        client = await connect_h2(proxy)
        stream_id, answer = client.open_stream("POST", "/upload")
        origin = await requested_of(connections, "/upload")
        upstream_id = origin.requests["/upload"]
        origin.begin("/upload")
        origin.transport.write(goaway(upstream_id))
        await asyncio.sleep(0.1)
        client.upload(stream_id, b"x" * 1000)
        async with asyncio.timeout(TIMEOUT):
            while upstream_id not in origin.ended:
                await asyncio.sleep(0.01)
        origin.h2.send_data(upstream_id, b"done", end_stream=True)
        origin.transport.write(origin.h2.data_to_send())
        await all_answered([answer])
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert (origin.bodies[upstream_id], answer.body) == (b"x" * 1000, b"done")


@pytest.mark.asyncio
async def test_a_grpc_status_the_client_never_got_is_not_counted_as_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's answer and its trailers (grpc-status 0) are in, held for a client
    that gives no window, and the client cancels: the call was counted grpc_status OK
    with error reset, where the client saw CANCELLED. A status counts once it is sent."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        client = await connect_h2(origins.proxy, ClosedWindowClient)
        answer = client.request(
            "POST", "/pkg.Svc/Call", headers={"content-type": "application/grpc"}
        )
        origin = await origins.requested("/pkg.Svc/Call")
        stream_id = origin.requests["/pkg.Svc/Call"]
        origin.begin("/pkg.Svc/Call")
        origin.h2.send_data(stream_id, bytes(100))
        origin.h2.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        origin.transport.write(origin.h2.data_to_send())
        handler = await only_handler(origins.proxy)
        async with asyncio.timeout(TIMEOUT):
            while not (1 in handler.streams and handler.streams[1].response_ended):
                await asyncio.sleep(0.01)
        client.h2.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        client.transport.write(client.h2.data_to_send())
        client.transport.close()
        await origins.proxy.wait_closed_flows(1)
    assert answer.body == b""
    outcomes = [(r.grpc_status, r.error) for r in origins.proxy.ledger.requests]
    assert outcomes == [(None, "reset")]


@pytest.mark.asyncio
async def test_a_download_reset_in_the_read_that_opens_its_window_is_cancelled_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client opens a waiting download's window and resets it in one read: h2 has
    closed the stream when the WINDOW_UPDATE's event makes the proxy send on it, before the
    RST_STREAM's event comes. The stream ended as reset there, but its upstream twin
    was neither reset nor let go of: it kept its upstream stream slot and window until the
    upstream ended it (never, its window closed). It is now cancelled upstream, as a
    client's reset is."""
    async with held_origins(tmp_path, monkeypatch) as origins:
        client = await connect_h2(origins.proxy, ClosedWindowClient)
        client.request("GET", "/held")
        origin = await origins.requested("/held")
        origin.begin("/held")
        origin.h2.send_data(origin.requests["/held"], bytes(1000))
        origin.transport.write(origin.h2.data_to_send())
        handler = await only_handler(origins.proxy)
        async with asyncio.timeout(TIMEOUT):
            while not (1 in handler.streams and handler.streams[1].to_client):
                await asyncio.sleep(0.01)
        (upstream,) = handler.upstreams.values()
        client.h2.increment_flow_control_window(100, 1)
        client.h2.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        handler.data_received(client.h2.data_to_send())
        async with asyncio.timeout(TIMEOUT):
            while not origin.resets:
                await asyncio.sleep(0.01)
        assert (origin.resets, upstream.streams) == ([(1, h2.errors.ErrorCodes.CANCEL)], {})
        client.transport.close()
        await origins.proxy.wait_closed_flows(1)
    outcomes = [(r.path, r.status, r.error) for r in origins.proxy.ledger.requests]
    assert outcomes == [("/held", 200, "reset")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "headers", "counted"),
    [
        ("GET", "/denied/x", {}, [("/denied/x", 403, "reset"), ("/held", 200, "")]),
        ("HEAD", "/denied/x", {}, [("/denied/x", 403, "reset"), ("/held", 200, "")]),
        (
            "POST",
            "/test.Echo/Fail",
            {"content-type": "application/grpc"},
            [("/held", 200, ""), ("/test.Echo/Fail", 403, "reset")],
        ),
        ("GET", "/after-goaway", {}, [("/held", 200, "")]),
    ],
)
async def test_a_head_the_proxy_answers_reset_in_the_same_read_ends_only_its_stream(
    h2_setup: tuple[LoopbackProxy, int],
    method: str,
    path: str,
    headers: dict[str, str],
    counted: list[tuple[str, int, str]],
) -> None:
    """A request head and its RST_STREAM in one read: h2 has closed the stream when the
    head's event makes the proxy answer it itself (403, a gRPC deny, or past its GOAWAY a
    refusal), and sending on it raised out of data_received, which took the client's whole
    connection down (the upload in flight beside it too). The stream now ends alone, as
    the client's reset."""
    proxy, _ = h2_setup
    client = await connect_h2(proxy, GoawayReadingClient)
    held_id, held = client.open_stream("POST", "/held")
    handler = await only_handler(proxy)
    if path == "/after-goaway":
        handler.drain()
    stream_id = client.h2.get_next_available_stream_id()
    block = [(":method", method), (":scheme", "http"), (":authority", "example.test"),
             (":path", path), *headers.items()]  # fmt: skip
    client.h2.send_headers(stream_id, block, end_stream=True)
    client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    client.answers[stream_id] = Answer()
    handler.data_received(client.h2.data_to_send())
    client.upload(held_id, b"x")
    async with asyncio.timeout(TIMEOUT):
        await held.done.wait()
    assert (held.headers[":status"], json.loads(held.body)["body"]["length"]) == ("200", 1)
    client.transport.close()
    await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    assert outcomes == counted


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["reset", "malformed"])
async def test_a_stream_the_client_ends_gives_its_upstream_slot_to_one_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The upstream takes one stream at a time; /first holds the slot, /second waits for
    it. The client resets /first (or makes it malformed, a content-length its body
    overruns): it is cancelled upstream, and /second is sent at once. It waited until
    another stream on that upstream ended, or the idle timeout."""
    async with proxy_to_h2_origin(OneStreamH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        first_id, _ = client.open_stream("POST", "/first", {"content-length": "1"})
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while not any(upstream.streams for upstream in handler.upstreams.values()):
                await asyncio.sleep(0.01)
        second = client.request("GET", "/second")
        async with asyncio.timeout(TIMEOUT):
            while not any(upstream.waiting for upstream in handler.upstreams.values()):
                await asyncio.sleep(0.01)
        if ending == "reset":
            client.h2.reset_stream(first_id, h2.errors.ErrorCodes.CANCEL)
            client.transport.write(client.h2.data_to_send())
        else:
            client.transport.write(hyperframe.frame.DataFrame(first_id, b"two").serialize())
        async with asyncio.timeout(2.0):
            await second.done.wait()
        assert second.headers[":status"] == "200"
        client.transport.close()
        await proxy.wait_closed_flows(1)
    outcomes = sorted((r.path, r.status, r.error) for r in proxy.ledger.requests)
    first_error = "reset" if ending == "reset" else "bad_request"
    assert outcomes == [("/first", None, first_error), ("/second", 200, "")]


class ClientTakingNothingOfItsFirstStream(H2Client):
    """Reopens no window for what stream 1 brings: its application reads it later. Its
    connection window is large, so that stream 1 holds none of the other streams' window."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.increment_flow_control_window(1 << 30)
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                self.answers[1].body += event.data
            elif isinstance(event, h2.events.ResponseReceived):
                self.answers[event.stream_id].headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self.answers[event.stream_id].body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.answers[event.stream_id].done.set()
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_stream_waiting_for_a_slot_gets_it_when_the_upstream_ends_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream takes one stream at a time. /bytes/100000 holds the slot and /second
    waits for it; the upstream sends the whole answer (64 KiB in the client's window, the
    rest held in the proxy), which frees its slot, while the client reads none of it yet.
    /second waited until the client took all of /bytes, which it may do only once /second
    is answered: a direct connection sends it at once."""
    async with proxy_to_h2_origin(OneStreamH2Server, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, ClientTakingNothingOfItsFirstStream)
        held = client.request("GET", "/bytes/100000")
        second = client.request("GET", "/second")
        async with asyncio.timeout(TIMEOUT):
            await second.done.wait()
        unfinished = not held.done.is_set()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert second.headers[":status"] == "200"
    assert unfinished, "the client took nothing of /bytes, so it cannot have ended"


class EarlyAnsweringOneStreamServer(OneStreamH2Server):
    """OneStreamH2Server answering /early/bytes/N as soon as its head comes, before the
    request's body has ended (as a server refusing an upload, or streaming, may)."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: set[int] = set()

    def data_received(self, data: bytes) -> None:
        before = set(self.streams)
        super().data_received(data)
        for stream_id in set(self.streams) - before:
            headers = self.streams[stream_id]["headers"]
            path = next(value for name, value in headers if name == ":path")
            if path.startswith("/early/"):
                for header in headers:
                    if header[0] == ":path":
                        header[1] = path.removeprefix("/early")
                self._answer(stream_id)
                self.answered.add(stream_id)
                self.streams[stream_id] = {
                    "headers": headers,
                    "digest": hashlib.sha256(),
                    "length": 0,
                }
        self.transport.write(self.h2.data_to_send())

    def _answer(self, stream_id: int) -> None:
        if stream_id in self.answered:
            self.streams.pop(stream_id)
            return
        super()._answer(stream_id)


@pytest.mark.asyncio
async def test_a_stream_waiting_for_a_slot_gets_it_when_an_early_answered_request_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with the holder's answer all in before its request ended: the slot frees
    when the request's end goes upstream, and must go to the waiting stream then, not once
    the client has taken the held answer."""
    async with proxy_to_h2_origin(EarlyAnsweringOneStreamServer, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy, ClientTakingNothingOfItsFirstStream)
        held_id, held = client.open_stream("POST", "/early/bytes/100000")
        handler = await only_handler(proxy)
        async with asyncio.timeout(TIMEOUT):
            while not any(stream.response_ended for stream in handler.streams.values()):
                await asyncio.sleep(0.01)
        second = client.request("GET", "/second")
        await asyncio.sleep(0.1)
        client.h2.end_stream(held_id)
        client.transport.write(client.h2.data_to_send())
        async with asyncio.timeout(TIMEOUT):
            await second.done.wait()
        unfinished = not held.done.is_set()
        client.transport.close()
        await proxy.wait_closed_flows(1)
    assert second.headers[":status"] == "200"
    assert unfinished, "the client took nothing of /bytes, so it cannot have ended"


class AnyPathBytesServer(H2Server):
    """H2Server serving /bytes/N under any prefix (/second/bytes/N)."""

    def _answer(self, stream_id: int) -> None:
        for header in self.streams[stream_id]["headers"]:
            if header[0] == ":path":
                header[1] = "/bytes/" + header[1].rpartition("/")[2]
        super()._answer(stream_id)


@pytest.mark.asyncio
async def test_an_upstream_connected_while_the_client_reads_nothing_waits_for_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client offers windows of 2 GiB and reads nothing: once the proxy's bytes to it
    pass the write buffer's limit, no upstream is read. An upstream connected after that
    (a stream to another destination) was read all the same, every byte it sent was
    written to the client's buffer and asked of it again, and the buffer grew as fast as
    that upstream could send."""
    loop = asyncio.get_running_loop()
    first = await loop.create_server(AnyPathBytesServer, "127.0.0.1", 0)
    second = await loop.create_server(AnyPathBytesServer, "127.0.0.1", 0)
    try:
        policy = TWO_ORIGINS.format(second=second.sockets[0].getsockname()[1])
        destination = local(first.sockets[0].getsockname()[1])
        async with loopback_proxy(tmp_path, monkeypatch, policy, destination) as proxy:
            sock = await client_that_never_reads(proxy)
            client = h2.connection.H2Connection()
            client.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1},
            )
            client.initiate_connection()
            client.increment_flow_control_window(2**31 - 1 - 65535)
            request = [(":method", "GET"), (":scheme", "http"), (":authority", "example.test")]
            client.send_headers(1, [*request, (":path", "/bytes/200000000")], end_stream=True)
            await loop.sock_sendall(sock, client.data_to_send())
            handler = await only_handler(proxy)
            async with asyncio.timeout(TIMEOUT):
                while not handler.client_full:
                    await asyncio.sleep(0.01)
            client.send_headers(
                3, [*request, (":path", "/second/bytes/200000000")], end_stream=True
            )
            await loop.sock_sendall(sock, client.data_to_send())
            async with asyncio.timeout(TIMEOUT):
                while not any(
                    up.transport
                    for up in handler.upstreams.values()
                    if up.key[1] != destination.port
                ):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)
            unsent = handler.transport.get_write_buffer_size()
            sock.close()
            await proxy.wait_closed_flows(1)
    finally:
        first.close()
        second.close()
    assert unsent < 2 << 20


class LongGrpcStatusOrigin(PlainH2Origin):
    """Answers every call trailers-only, with a grpc-status of 5,000 digits."""

    STATUS = "0" * 5000

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = [(":status", "200"), ("content-type", "application/grpc")]
                self.h2.send_headers(
                    event.stream_id, [*headers, ("grpc-status", self.STATUS)], end_stream=True
                )
        self.transport.write(self.h2.data_to_send())


@pytest.mark.asyncio
async def test_a_grpc_status_of_thousands_of_digits_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int() refuses more than 4,300 digits: reading the status raised on the loop, and
    the upstream connection and every call on it failed. It is no code: UNKNOWN."""
    async with proxy_to_h2_origin(LongGrpcStatusOrigin, tmp_path, monkeypatch) as proxy:
        client = await connect_h2(proxy)
        headers = {"content-type": "application/grpc", "te": "trailers"}
        calls = [client.request("POST", "/test.Echo/Echo", b"", headers) for _ in range(2)]
        await all_answered(calls)
        assert [answer.headers.get("grpc-status") for answer in calls] == [
            LongGrpcStatusOrigin.STATUS
        ] * 2
        await proxy.wait_requests(2)
        client.transport.close()
    assert [(r.grpc_status, r.error) for r in proxy.ledger.requests] == [(2, "")] * 2
