"""HTTP services the HTTP tests need beyond servers.py: raw heads, upgrades, h2c, gRPC.

    ip netns exec NS python http_servers.py --h1 PORT --h2 PORT --grpc PORT --grpc-aged PORT

Runs in the world's internet namespace on the wildcard addresses; the unit tests
start the same coroutines on 127.0.0.1.

h1 (h11):  GET /raw-head answers the request head byte for byte as it arrived;
           an Upgrade request gets 101 and then an echo; CONNECT gets 200 and an echo;
           Expect: 100-continue gets 100 before the body is read; any other request
           gets a JSON document with the body's length and sha256; GET /bytes/N streams
           the servers.py test stream; GET /close-delimited/N answers without a
           length and closes; GET /status/N answers status N.
h2 (h2):   a JSON document of each stream's pseudo-headers, headers and body hash;
           GET /bytes/N streams the test stream (flow control respected).
gRPC:      /test.Echo/Echo returns its request bytes; /test.Echo/Fail aborts NOT_FOUND;
           /test.Echo/Stream streams STREAMED_MESSAGES messages. The --grpc-aged server
           serves the same, each of its connections closed after CONNECTION_AGE_MS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from servers import deterministic_chunks  # type: ignore[import-not-found]
else:
    from .servers import deterministic_chunks

log = logging.getLogger("http_servers")

READ_SIZE = 1 << 20
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


def _header(request: h11.Request, name: bytes) -> bytes | None:
    return next((value for key, value in request.headers if key == name), None)


async def _splice_echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
) -> None:
    if first:
        writer.write(first)
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def _send(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)
        await writer.drain()


async def _respond(
    connection: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes | Iterator[bytes],
    length: int | None,
) -> None:
    headers = [("Content-Type", "application/octet-stream")]
    if length is not None:
        headers.append(("Content-Length", str(length)))
    await _send(writer, connection.send(h11.Response(status_code=status, headers=headers)))
    for chunk in [body] if isinstance(body, bytes) else body:
        await _send(writer, connection.send(h11.Data(data=chunk)))
    await _send(writer, connection.send(h11.EndOfMessage()))


async def h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The h1 service (see the module docstring); keep-alive, one request at a time."""
    connection = h11.Connection(h11.SERVER)
    received = bytearray()
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                if connection.their_state is h11.IDLE:
                    received += data
                connection.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return
            head = bytes(received[: received.find(b"\r\n\r\n") + 4])
            received.clear()
            await _serve_h1_request(connection, reader, writer, event, head)
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
            received += connection.trailing_data[0]
    except (h11.RemoteProtocolError, ConnectionError) as error:
        log.info("h1: %r", error)
    finally:
        writer.close()


async def _serve_h1_request(
    connection: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: h11.Request,
    head: bytes,
) -> None:
    target = request.target.decode("latin-1")
    path = urlsplit(target).path
    upgrade = _header(request, b"upgrade")
    if request.method == b"CONNECT" or upgrade is not None:
        headers: list[tuple[bytes, bytes]] = []
        if upgrade is not None:
            key = _header(request, b"sec-websocket-key") or b""
            headers = [
                (b"Upgrade", upgrade),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", websocket_accept(key)),
            ]
        while (event := connection.next_event()) is not h11.PAUSED:
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(READ_SIZE))
        if request.method == b"CONNECT":
            writer.write(connection.send(h11.Response(status_code=200, headers=[])) or b"")
        else:
            writer.write(
                connection.send(h11.InformationalResponse(status_code=101, headers=headers)) or b""
            )
        await _splice_echo(reader, writer, connection.trailing_data[0])
        return
    if connection.they_are_waiting_for_100_continue:
        await _send(writer, connection.send(h11.InformationalResponse(status_code=100, headers=[])))
    digest, length = hashlib.sha256(), 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Data):
            digest.update(event.data)
            length += len(event.data)
        else:
            break
    if path == "/raw-head":
        await _respond(connection, writer, 200, head, len(head))
    elif target.startswith("/bytes/"):
        total = int(target.removeprefix("/bytes/"))
        await _respond(connection, writer, 200, deterministic_chunks(total), total)
    elif target.startswith("/close-delimited/"):
        total = int(target.removeprefix("/close-delimited/"))
        await _respond(connection, writer, 200, deterministic_chunks(total), None)
    elif target.startswith("/status/"):
        await _respond(connection, writer, int(target.removeprefix("/status/")), b"", 0)
    else:
        document = {
            "method": request.method.decode(),
            "target": target,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
            "body": {"length": length, "sha256": digest.hexdigest()},
        }
        body = json.dumps(document).encode()
        await _respond(connection, writer, 200, body, len(body))


# --- h2c ---------------------------------------------------------------------------


class H2Server(asyncio.Protocol):
    """HTTP/2 prior knowledge: JSON echo per stream, /bytes/N with flow control."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection

        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.transport: asyncio.Transport
        self.streams: dict[int, dict[str, Any]] = {}
        self.pending: dict[int, Iterator[bytes]] = {}
        self.leftover: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.h2.data_to_send())
            self.transport.close()
            return
        reset = {event.stream_id for event in events if isinstance(event, h2.events.StreamReset)}
        for event in events:
            if getattr(event, "stream_id", None) in reset:
                self.streams.pop(event.stream_id, None)  # h2 has forgotten it already
                self.pending.pop(event.stream_id, None)
                self.leftover.pop(event.stream_id, None)
                if isinstance(event, h2.events.DataReceived):  # the connection's window
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = {
                    "headers": [[n, v] for n, v in event.headers],
                    "digest": hashlib.sha256(),
                    "length": 0,
                }
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams[event.stream_id]
                stream["digest"].update(event.data)
                stream["length"] += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(self.pending):
                    self._pump(stream_id)
        self.transport.write(self.h2.data_to_send())

    def _answer(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id)
        pseudo = {n: v for n, v in stream["headers"] if n.startswith(":")}
        path = pseudo.get(":path", "")
        if path.startswith("/bytes/"):
            total = int(path.removeprefix("/bytes/"))
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", str(total))])
            self.pending[stream_id] = deterministic_chunks(total)
            self._pump(stream_id)
            return
        document = {
            "headers": stream["headers"],
            "body": {"length": stream["length"], "sha256": stream["digest"].hexdigest()},
        }
        body = json.dumps(document).encode()
        self.h2.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        self.h2.send_data(stream_id, body, end_stream=True)

    def _pump(self, stream_id: int) -> None:
        import h2.exceptions

        try:
            self._send_what_fits(stream_id)
        except h2.exceptions.StreamClosedError:  # reset by the client meanwhile
            self.pending.pop(stream_id, None)
            self.leftover.pop(stream_id, None)

    def _send_what_fits(self, stream_id: int) -> None:
        chunks = self.pending[stream_id]
        data = self.leftover.pop(stream_id, b"")
        while True:
            if not data:
                data = next(chunks, b"")
                if not data:
                    self.h2.end_stream(stream_id)
                    del self.pending[stream_id]
                    return
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                self.leftover[stream_id] = data
                return
            self.h2.send_data(stream_id, data[:window])
            data = data[window:]


# --- gRPC ---------------------------------------------------------------------------


STREAMED_MESSAGES, STREAMED_SIZE = 200, 20_000
"""What test.Echo/Stream answers: this many messages of this many bytes."""
CONNECTION_AGE_MS = 500
"""The aged server's max_connection_age: it says GOAWAY and closes each connection this
often, as a gRPC server behind a Kubernetes Service is often told to."""


def grpc_server(address: str, max_connection_age_ms: int | None = None) -> tuple[Any, int]:
    """A grpcio server with generic (protoc-free) handlers, started; and its port."""
    from concurrent import futures

    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(STREAMED_MESSAGES):
            yield bytes(STREAMED_SIZE)

    def fail(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    options = []
    if max_connection_age_ms is not None:
        options = [
            ("grpc.max_connection_age_ms", max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", 20_000),
        ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    server.start()
    return server, port


def grpc_call(target: str, method: str, payload: bytes, metadata_bytes: int = 0) -> dict[str, Any]:
    """One unary call on a fresh channel (with metadata_bytes of metadata, if any):
    {"code": name, "response": text or None}."""
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    metadata = [("x-big", "a" * metadata_bytes)] if metadata_bytes else None
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            call: Any = channel.unary_unary(method)
            response: bytes = call(payload, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return {"code": error.code().name, "response": None}
    return {"code": "OK", "response": response.decode("latin-1")}


def grpc_streams(target: str, seconds: float, callers: int = 8) -> dict[str, int]:
    """test.Echo/Stream called over and over by `callers` threads on one channel for
    `seconds`: how many calls got every message, and how many ended with each code."""
    import time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    outcomes: Counter[str] = Counter()
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        call: Any = channel.unary_stream("/test.Echo/Stream")

        def caller() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    received = sum(1 for _ in call(b"", timeout=20))
                    outcomes["OK" if received == STREAMED_MESSAGES else "SHORT"] += 1
                except grpc.RpcError as error:
                    outcomes[error.code().name] += 1

        with ThreadPoolExecutor(callers) as pool:
            for done in [pool.submit(caller) for _ in range(callers)]:
                done.result()
    return dict(outcomes)


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(h1_port: int, h2_port: int) -> None:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    for wildcard in ("0.0.0.0", "::"):
        servers.append(await asyncio.start_server(h1, sock=_listening_socket(wildcard, h1_port)))
        servers.append(
            await loop.create_server(H2Server, sock=_listening_socket(wildcard, h2_port))
        )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--h1", type=int)
    parser.add_argument("--h2", type=int)
    parser.add_argument("--grpc", type=int)
    parser.add_argument(
        "--call",
        nargs=3,
        metavar=("TARGET", "METHOD", "PAYLOAD"),
        help="be a gRPC client instead: one call, its outcome as JSON",
    )
    parser.add_argument("--metadata-bytes", type=int, default=0, help="with --call")
    parser.add_argument(
        "--grpc-aged", type=int, help="a gRPC server whose connections age: CONNECTION_AGE_MS"
    )
    parser.add_argument(
        "--streams",
        nargs=2,
        metavar=("TARGET", "SECONDS"),
        help="be a gRPC client instead: streaming calls, their outcomes as JSON",
    )
    args = parser.parse_args()
    if args.call:
        target, method, payload = args.call
        print(json.dumps(grpc_call(target, method, payload.encode(), args.metadata_bytes)))
        return
    if args.streams:
        target, seconds = args.streams
        print(json.dumps(grpc_streams(target, float(seconds))))
        return
    if None in (args.h1, args.h2, args.grpc, args.grpc_aged):
        parser.error("--h1, --h2, --grpc and --grpc-aged are required to serve")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    grpc, _ = grpc_server(f"[::]:{args.grpc}")
    aged, _ = grpc_server(f"[::]:{args.grpc_aged}", CONNECTION_AGE_MS)
    try:
        asyncio.run(serve(args.h1, args.h2))
    finally:
        grpc.stop(None)
        aged.stop(None)


if __name__ == "__main__":
    main()
