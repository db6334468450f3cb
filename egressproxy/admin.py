"""The admin HTTP server: health, configuration and metrics; it never proxies."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import h11
from prometheus_client import CollectorRegistry

from egressproxy import metrics
from egressproxy.policy.store import PolicyStore
from egressproxy.settings import Endpoint
from egressproxy.threads import in_daemon_thread

log = logging.getLogger("egressproxy.admin")

MAX_REQUEST_HEAD = 16 * 1024
IDLE_TIMEOUT = 10.0
MAX_ADMIN_CONNECTIONS = 32
"""Admin connections open at once; past it, a new one takes the place of the one that has
waited longest for its next request (or is closed at once when every one is being
answered). They take descriptors from the reserve the connection limit leaves
(server.FD_RESERVE), and a few hundred idle ones (each kept up to IDLE_TIMEOUT) would
leave the data plane none: its clients would be accepted and closed unseen, far below
--max-connections. Refusing every newcomer instead let 32 idle connections, reopened as
they were closed, shut the kubelet's probes and the scrapes out for good."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    """Beside Content-Type and Content-Length."""


METHOD_NOT_ALLOWED = Response(
    405, "text/plain; charset=utf-8", b"method not allowed\n", (("allow", "GET, HEAD"),)
)
"""RFC 9110 15.5.6: a 405 says which methods are."""


@dataclass
class Health:
    """Readiness as the server sees it: listening, with a policy, and not draining."""

    listening: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.listening and not self.draining


Handler = Callable[[dict[str, str]], Response]


@dataclass(frozen=True)
class OffLoop:
    """A handler whose answer can take long to make (a scrape of many series: 150 ms at
    the default hostname cap; the description of a policy of 100,000 hostnames: seconds),
    made in a thread so that the loop, the data plane's too with one worker, keeps
    serving meanwhile; one at a time, so a flood of such requests holds one thread and
    one answer in the making, not one each."""

    handler: Handler
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


Handlers = dict[str, Handler | OffLoop]


def text(status: int, body: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (body + "\n").encode())


def base_handlers(health: Health, store: PolicyStore, registry: CollectorRegistry) -> Handlers:
    def live(_: dict[str, str]) -> Response:
        return text(200, "live")

    def ready(_: dict[str, str]) -> Response:
        if health.ready:
            return text(200, "ready")
        return text(503, "draining" if health.draining else "not ready")

    def config(_: dict[str, str]) -> Response:
        snapshot = store.current
        document = {
            "file": snapshot.file,
            "generation": snapshot.generation,
            "loaded_at": snapshot.loaded_at.isoformat(),
            "policy": snapshot.index.describe(),
        }
        body = json.dumps(document, indent=2, sort_keys=True).encode()
        return Response(200, "application/json", body + b"\n")

    def scrape(headers: dict[str, str]) -> Response:
        body, content_type = metrics.exposition(registry, headers.get("accept", ""))
        return Response(200, content_type, body)

    return {"/live": live, "/ready": ready, "/config": OffLoop(config), "/metrics": OffLoop(scrape)}


def admin_path(target: str) -> str:
    """The path of an origin-form or absolute-form target (`http://host:4191/metrics`, which
    a server must accept, RFC 9112 3.2.2), without its query."""
    if target.startswith("/"):
        return target.split("?", 1)[0]
    try:
        return urlsplit(target).path or "/"
    except ValueError:  # an unbalanced [ or ] in its authority: no path of ours
        return ""


class AdminConnection(asyncio.Protocol):
    """One admin client on h11; GET and HEAD of known paths only.

    The next request is answered only while the client reads the answers, and once the
    answer before it is made: pipelined scrapes sent by one that reads nothing would
    otherwise be answered all at once, each body held in memory, the event loop (the data
    plane's too, with one worker) busy making them.
    """

    idle_timeout = IDLE_TIMEOUT
    """Seconds from the connection's start or its last answer to the next complete request
    head; a scraper reusing its connection restarts the clock with every request."""

    def __init__(self, handlers: Handlers, open_connections: dict[AdminConnection, None]) -> None:
        """open_connections: the server's, in the order they began to wait for a request."""
        self.handlers = handlers
        self.open_connections = open_connections
        self.connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport
        self.timer: asyncio.TimerHandle
        self.writing_paused = False
        self.answering: asyncio.Task[None] | None = None
        """The making of an OffLoop answer, while it lasts."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.open_connections) >= MAX_ADMIN_CONNECTIONS and not self._make_room():
            log.debug("admin: %d connections answering: one more closed", MAX_ADMIN_CONNECTIONS)
            self.transport.abort()
            return
        self._start_idle_timer()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its next request; False when
        every one is being answered."""
        for waiting in self.open_connections:
            if waiting.answering is None:
                log.debug(
                    "admin: %d connections open: the longest idle closed",
                    len(self.open_connections),
                )
                del self.open_connections[waiting]
                waiting.timer.cancel()
                waiting.transport.abort()
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.open_connections:
            del self.open_connections[self]
            self.timer.cancel()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._read_while_answerable()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._read_while_answerable()
        self._serve()

    def _read_while_answerable(self) -> None:
        """Read only while the next request can be answered: h11 would buffer all the
        bytes a client sends meanwhile."""
        if self.transport.is_closing():
            return
        if self.writing_paused or self.answering is not None:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self._serve()

    def eof_received(self) -> bool:
        """A client that half-closes after its request still gets the answer in making."""
        self.connection.receive_data(b"")
        self._serve()
        return self.answering is not None

    def _serve(self) -> None:
        while (
            not self.transport.is_closing() and not self.writing_paused and self.answering is None
        ):
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                self._send(text(error.error_status_hint, "bad request"), head_only=False)
                self.transport.close()
                return
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if isinstance(event, h11.ConnectionClosed):
                    self.transport.close()
                return
            if event is h11.PAUSED:
                if (
                    self.connection.our_state is h11.DONE
                    and self.connection.their_state is h11.DONE
                ):
                    self.connection.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self.timer.cancel()
                self._answer(event)
                if self.answering is None:
                    self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        """And move to the end of the waiting order."""
        self.open_connections.pop(self, None)
        self.open_connections[self] = None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        """A client still not reading what it was sent is dropped with it: a close would
        wait for it to read, holding the answers for good."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _answer(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        path = admin_path(request.target.decode("ascii", "replace"))
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.headers:  # repeated fields are one list (RFC 9110 5.3)
            name, value = raw_name.decode().lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        head_only = method == "HEAD"
        handler = self.handlers.get(path)
        if method not in ("GET", "HEAD"):
            self._send(METHOD_NOT_ALLOWED, head_only=head_only)
        elif handler is None:
            self._send(text(404, "not found"), head_only=head_only)
        elif isinstance(handler, OffLoop):
            answer = self._answer_off_loop(handler, headers, head_only=head_only)
            self.answering = asyncio.get_running_loop().create_task(answer)
            self._read_while_answerable()
        else:
            self._send(handler(headers), head_only=head_only)

    async def _answer_off_loop(
        self, off_loop: OffLoop, headers: dict[str, str], *, head_only: bool
    ) -> None:
        async with off_loop.turn:
            if self.transport.is_closing():
                return
            try:
                response = await in_daemon_thread(lambda: off_loop.handler(headers), "admin")
            except Exception:  # a thread's failure would otherwise leave the client waiting
                log.exception("admin: making an answer failed")
                response = text(500, "internal error")
        self.answering = None
        if self.transport.is_closing():
            return
        self._send(response, head_only=head_only)
        self._start_idle_timer()
        self._read_while_answerable()
        self._serve()

    def _send(self, response: Response, *, head_only: bool) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        try:
            self.transport.write(
                self.connection.send(h11.Response(status_code=response.status, headers=headers))
            )
            if not head_only:
                self.transport.write(self.connection.send(h11.Data(data=response.body)))
            self.transport.write(self.connection.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            self.transport.close()
            return
        if self.connection.our_state is h11.MUST_CLOSE:
            self.transport.close()


def bind_admin(endpoint: Endpoint) -> socket.socket:
    """The admin server's socket, bound before anything serves: a taken or foreign address
    is then one line naming --admin, not a traceback from inside the event loop."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] is every address, IPv4's too: a kubelet probes a dual-stack pod over IPv4.
            every_address = ipaddress.ip_address(endpoint.host).is_unspecified
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if every_address else 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen()
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_admin(sock: socket.socket, handlers: Handlers) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    open_connections: dict[AdminConnection, None] = {}
    server = await loop.create_server(
        lambda: AdminConnection(handlers, open_connections), sock=sock
    )
    host, port = sock.getsockname()[:2]
    log.info("admin server on %s", Endpoint(host, port))
    return server
