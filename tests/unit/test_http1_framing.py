"""Http1Proxy on loopback against scripted origins: responses framed in ways a well-behaved
nginx never writes (HTTP/1.0, bytes past the response, long heads) and requests whose
framing is faulty, byte for byte on both sides, and the connection after each."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from egressproxy.relay import WRITE_BUFFER_HIGH
from tests.unit.http_harness import ALLOW_ALL, BLOCKED_HOST, proxy_to_origin
from tests.unit.test_http1_proxy import read_response

TIMEOUT = 5.0

Script = Callable[[bytes], tuple[bytes, bool]]
"""The request head's first line → the bytes to answer and whether to close after them."""


def always(answer: bytes) -> Script:
    """A script answering every request with the same bytes, keeping the connection."""
    return lambda line: (answer, False)


def scripted(script: Script, heads: list[bytes]) -> Callable[..., object]:
    """An origin that reads request heads (and Content-Length bodies) and answers each as
    the script says; every head it read is kept in heads."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                answer, close = script(head.split(b"\r\n", 1)[0])
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return serve


@pytest.mark.asyncio
async def test_an_http_1_0_response_reaches_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's http.server answers HTTP/1.0: with a length the head goes through as sent,
    without one (the end is the close) h11 frames the body for an HTTP/1.1 client."""

    def script(line: bytes) -> tuple[bytes, bool]:
        if line.startswith(b"GET /length"):
            return b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True
        return b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nhello world", True

    heads: list[bytes] = []
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(TIMEOUT):
            writer.write(b"GET /length HTTP/1.1\r\nHost: example.test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head == b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"
            assert await reader.readexactly(2) == b"ok"
            writer.write(b"GET /close HTTP/1.1\r\nHost: example.test\r\n\r\n")
            status, headers, body = await read_response(reader)
        assert (status, headers.get("x-a"), body) == (200, "1", b"hello world")
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/length", 200, ""),
        ("/close", 200, ""),
    ]


@pytest.mark.asyncio
async def test_bytes_past_a_response_keep_the_upstream_from_being_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked response followed in the same read by a whole second response: the
    upstream is let go, and the client's next request gets its own answer."""

    def script(line: bytes) -> tuple[bytes, bool]:
        if line.startswith(b"POST /first"):
            chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            return chunked + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", False
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nGOOD", False

    heads: list[bytes] = []
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(TIMEOUT):
            writer.write(
                b"POST /first HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nhi"
            )
            assert (await read_response(reader))[2] == b"ok"
            writer.write(
                b"POST /next HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nzz"
            )
            assert (await read_response(reader))[2] == b"GOOD"
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [head.split(b" ")[1] for head in heads] == [b"/first", b"/next"]


async def close_delimited_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers /nolen with a body its close ends (no length, no chunks), and the rest
    with their path, each length-framed; one connection, one close."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 1\r\n" in head.lower():
                await reader.readexactly(1)
            path = head.split(b" ")[1]
            if path == b"/nolen":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the close")
                await writer.drain()
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "second",
    [
        b"GET /b HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"POST /b HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1\r\n\r\nx",
    ],
    ids=["lean", "h11"],
)
async def test_an_upstream_that_closed_to_end_a_response_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: bytes
) -> None:
    """The request pipelined after a close-delimited response went out on the closed
    upstream: the GET hung until the idle timeout (then 504), the POST got a 502."""
    async with proxy_to_origin(close_delimited_first, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /nolen HTTP/1.1\r\nHost: example.test\r\n\r\n" + second)
        async with asyncio.timeout(TIMEOUT):
            assert (await read_response(reader))[0::2] == (200, b"until the close")
            assert (await read_response(reader))[0::2] == (200, b"/b")
        writer.close()
        await proxy.wait_closed_flows(1)


DENIED_REQUESTS = b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n" * 1000


@pytest.mark.asyncio
async def test_a_client_that_reads_none_of_the_proxys_own_answers_is_not_read_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined denied requests from a client that reads nothing: the proxy answered each
    (a 403 is longer than its request) whatever its write buffer held, 15 MB for 8 MB sent.
    It stops reading the client while it cannot write to it, and answers every request
    once the client reads."""
    async with proxy_to_origin(
        scripted(always(b""), []), tmp_path, monkeypatch, BLOCKED_HOST
    ) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        deadline, sent, refused = loop.time() + TIMEOUT, 0, 0
        while sent < 8_000_000 and refused < 20 and loop.time() < deadline:
            try:
                sent += client.send(DENIED_REQUESTS[sent % len(DENIED_REQUESTS) :])
            except BlockingIOError:  # 0.2 s of this: the proxy reads no more
                refused += 1
                await asyncio.sleep(0.01)
                continue
            refused = 0
            await asyncio.sleep(0)
        await asyncio.sleep(0.3)
        (flow,) = proxy.context.open_flows.flows
        buffered = flow.transport.get_write_buffer_size()
        assert buffered <= 2 * WRITE_BUFFER_HIGH, buffered
        request_size = len(DENIED_REQUESTS) // 1000
        answers, received = sent // request_size, b""
        client.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(TIMEOUT):
            while chunk := await loop.sock_recv(client, 1 << 20):
                received += chunk
        client.close()
        await proxy.wait_closed_flows(1)
    assert received.count(b"HTTP/1.1 403 ") == answers


@pytest.mark.asyncio
async def test_a_request_after_one_that_said_close_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9112 9.6: the first request is answered and the connection closed; the one
    pipelined after it is dropped, not answered 400 in place of the first's answer."""
    heads: list[bytes] = []

    script = always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            b"GET /a HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: example.test\r\n\r\n"
        )
        async with asyncio.timeout(TIMEOUT):
            assert await read_response(reader) == (200, {"content-length": "2"}, b"ok")
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [head.split(b" ")[1] for head in heads] == [b"/a"]
    assert [(r.path, r.status) for r in proxy.ledger.requests] == [("/a", 200)]


@pytest.mark.asyncio
async def test_a_long_response_head_split_over_reads_passes_on_either_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 KB of response head in two writes: the lean path (GET) and h11's (POST with a
    body) take the same heads, up to 64 KiB."""
    long_header = b"X-Long: " + b"v" * 40_000 + b"\r\n"

    async def split_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"Content-Length: 2" in head:
                    await reader.readexactly(2)
                writer.write(b"HTTP/1.1 200 OK\r\n" + long_header[:20_000])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(long_header[20_000:] + b"Content-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async with proxy_to_origin(split_head, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(TIMEOUT):
            writer.write(b"GET /lean HTTP/1.1\r\nHost: example.test\r\n\r\n")
            assert (await read_response(reader))[0::2] == (200, b"ok")
            writer.write(b"POST /h11 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nhi")
            assert (await read_response(reader))[0::2] == (200, b"ok")
        writer.close()
        await proxy.wait_closed_flows(1)


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [b"1.0", b"0.9"])
async def test_transfer_encoding_in_an_http_1_0_request_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: bytes
) -> None:
    """RFC 9112 6.1: faulty framing; an upstream that ignores TE in HTTP/1.0 would read
    the body as the next request. So below HTTP/1.1 at all: h11 reads `HTTP/0.9` (a
    version no client sends, which the sniffer calls unsupported yet hands to h11) as a
    request with headers, and its chunked body, which may hold a request, went upstream."""
    heads: list[bytes] = []

    script = always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            b"POST /a HTTP/%s\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n" % version
        )
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert heads == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [b"5\nhello\n0\n\n", b"5\r\nhello\r\n0\n\n", b"5;ext=1\n"],
    ids=["every-line", "last", "extension"],
)
async def test_a_chunk_line_ended_by_lf_alone_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    """h11 waits for the CRLF of a chunk line: with the head already upstream, client and
    upstream both waited out the idle timeout, and the client got a 504 for its own fault.
    Framing its peers may read otherwise is refused now: 400, the upstream request cut."""
    heads: list[bytes] = []

    async def awaits_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async with proxy_to_origin(awaits_the_body, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            b"POST /a HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await asyncio.sleep(0.1)
        writer.write(body)
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert len(heads) == 1
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/a", 400, "bad_request")
    ]


@pytest.mark.asyncio
async def test_a_response_chunk_line_ended_by_lf_alone_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same from an upstream that keeps its connection: the client waited out the
    idle timeout for the rest of a body the proxy could not frame. Now its response is
    cut at once, as any bad response begun, counted bad_response."""
    heads: list[bytes] = []
    script = always(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n")
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionResetError):
                await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/a", 200, "bad_response")
    ]


@pytest.mark.asyncio
async def test_a_response_framed_twice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content-Length beside Transfer-Encoding (RFC 9112 6.3): 502, not a head a client
    could read by its length while the proxy reads it chunked."""

    script = always(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    heads: list[bytes] = []
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            status, _, body = await read_response(reader)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert (status, body) == (502, b"upstream bad_response\n")
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(502, "bad_response")]


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [b"1.0", b"0.9"])
async def test_an_http_1_0_client_gets_no_informational_response(
    version: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9110 15.2: a 1xx (103 Early Hints here) is not for a client below HTTP/1.1
    (h11 also reads `HTTP/0.9` in a request line with headers)."""

    script = always(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    heads: list[bytes] = []
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/" + version + b"\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok")
    assert b"103" not in answer


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [b"1.0", b"0.9"])
async def test_an_http_1_0_client_gets_a_chunked_response_with_trailers_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: bytes
) -> None:
    """An upstream that answers an HTTP/1.0 request chunked anyway (RFC 9112 6.1 forbids
    it; some application servers do): the body reaches the client framed by the close,
    where trailers have no place (RFC 9110 6.5.1 lets whoever removes the chunked coding
    discard them). h11 refused to write them, and the client got a reset after the whole
    body (a traceback in the log, the request counted error="reset")."""

    script = always(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n"
    )
    heads: list[bytes] = []
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /a HTTP/%s\r\nHost: example.test\r\n\r\n" % version)
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer == b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nConnection: close\r\n\r\nhello"
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "")]


@pytest.mark.asyncio
async def test_an_http_1_0_keep_alive_client_gets_its_answer_and_a_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h11 keeps no HTTP/1.0 connection alive (the README says so): `ab -k` gets its
    response whole, told `Connection: close`, then the close, and the request after it
    on the same connection is never read."""

    heads: list[bytes] = []
    script = always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
    async with proxy_to_origin(scripted(script, heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        request = b"GET /a HTTP/1.0\r\nHost: example.test\r\nConnection: keep-alive\r\n\r\n"
        writer.write(request + request.replace(b"/a", b"/b"))
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
        writer.close()
        await proxy.wait_closed_flows(1)
    head, body = answer.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close" in head
    assert body == b"ok"
    assert [(r.path, r.status) for r in proxy.ledger.requests] == [("/a", 200)]
    assert [head.split(b"\r\n", 1)[0] for head in heads] == [b"GET /a HTTP/1.0"]


@pytest.mark.asyncio
async def test_an_early_answer_then_close_reaches_an_uploading_client_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream answers 413 before the body is in, then closes: the client gets the
    answer and an orderly end while it still uploads, not a reset."""

    async def refuse_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        writer.close()

    async with proxy_to_origin(refuse_early, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10000000\r\n\r\n")
        answer = b""
        async with asyncio.timeout(TIMEOUT):
            for _ in range(40):  # keep uploading while the answer comes
                writer.write(b"x" * 16384)
                await asyncio.sleep(0.005)
            while chunk := await reader.read(65536):
                answer += chunk
        writer.close()
        await proxy.wait_closed_flows(1)
    assert answer == (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
    )
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(413, "")]


@pytest.mark.asyncio
async def test_a_body_framed_by_the_close_and_cut_short_reaches_the_client_as_a_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP/1.0 client's response ends at the close: when the upstream resets mid-body,
    the client must get a reset, since a FIN would make the part it has look whole."""

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with proxy_to_origin(reset_mid_body, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /big HTTP/1.0\r\nHost: example.test\r\n\r\n")
        received = b""
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ConnectionResetError):
                while chunk := await reader.read(65536):
                    received += chunk
        writer.close()
        await proxy.wait_closed_flows(1)
    assert received.endswith(b"\r\n\r\npart of it")
    assert [(r.status, r.error) for r in proxy.ledger.requests] == [(200, "reset")]


def reads_no_bodies(heads: list[bytes]) -> Callable[..., object]:
    """An origin that answers every request head at once and reads no body (CL.0): the
    bytes after a head are, to it, the next request."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                heads.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nno!")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return serve


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
async def test_a_body_still_coming_after_an_early_answer_goes_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expect: bytes
) -> None:
    """The upstream answered before the body: the body the client sends after it is not
    forwarded (an upstream done with the request may take it for requests nobody decided),
    and the answer closes the connection, also for a client that waits to be told to send
    its body (Expect) and never is."""
    heads: list[bytes] = []
    async with proxy_to_origin(reads_no_bodies(heads), tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: example.test\r\n%sContent-Length: %d\r\n\r\n"
            % (expect, len(SMUGGLED))
        )
        async with asyncio.timeout(TIMEOUT):
            status, headers, body = await read_response(reader)
            assert (status, headers["connection"], body) == (401, "close", b"no!")
            if not expect:
                writer.write(SMUGGLED)
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_closed_flows(1)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), TIMEOUT))[0] == 401
        writer.close()
        await proxy.wait_closed_flows(2)
    assert heads == [b"POST /up HTTP/1.1", b"GET /after HTTP/1.1"]
    assert [(r.path, r.status, r.error) for r in proxy.ledger.requests] == [
        ("/up", 401, ""),
        ("/after", 401, ""),
    ]
