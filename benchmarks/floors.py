"""The least a proxy in Python can do per connection, on uvloop and on plain epoll.

    floors.py uvloop|epoll|nested|splice --listen HOST:PORT --admin HOST:PORT

Each accepts a redirected connection, reads its original destination, connects from a
source port drawn as egressproxy draws them (upstream.SourcePorts), relays
bytes both ways and closes once both sides are done. No policy, no parsing, no
metrics: the benchmark runs them beside egressproxy so that every report shows how
much of a connection's or a request's cost is the loop's and the kernel's, and how
much is egressproxy's own work. `nested` is the epoll relay with its set watched by
uvloop as one descriptor (as egressproxy's splice relay watches its sockets): whether
plain sockets inside uvloop cost what they cost on a loop of their own. `splice` is the
epoll relay moving bytes with os.splice through a pipe per direction (1 MiB, the
unprivileged maximum) instead of copying them through Python: beside `uvloop` on the
bulk workloads it shows what splicing would save egressproxy's relay. The admin address
answers 200 to anything, for the harness's readiness check. IPv4 only: the benchmark world is IPv4.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import os
import select
import socket
import struct
from typing import cast

from egressproxy.netfilter import SO_ORIGINAL_DST, SOCKADDR_IN_SIZE
from egressproxy.upstream import SourcePorts

READY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CHUNK = 262144
PIPE_SIZE = 1 << 20
"""/proc/sys/fs/pipe-max-size by default: the largest pipe an unprivileged process gets."""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
STALLED_SECONDS = 10.0
"""A splice relay waits this long at most for its peer to take what the pipe holds."""


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


# -- on uvloop, with transports, as egressproxy relays ------------------------


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.client.transport.write_eof()
        if self.client.eof:
            self.client.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    """Both directions half-close on their own; the pair closes when both have ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ports: SourcePorts) -> None:
        self.loop = loop
        self.ports = ports
        self.upstream: Upstream | None = None
        self.pending = b""
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        destination = original_destination(transport.get_extra_info("socket"))
        self.loop.create_task(self.connect(destination))

    async def connect(self, destination: tuple[str, int]) -> None:
        source = ("0.0.0.0", self.ports.take())
        try:
            _, upstream = await self.loop.create_connection(
                lambda: Upstream(self), *destination, local_addr=source
            )
        except OSError:
            self.transport.abort()
            return
        self.upstream = upstream
        if self.transport.is_closing():
            upstream.transport.abort()
            return
        if self.pending:
            upstream.transport.write(self.pending)
        if self.eof:
            upstream.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.upstream is not None:
            self.upstream.transport.write_eof()
            if self.upstream.eof:
                self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()

    def close(self) -> None:
        self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()


class Ready(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(READY)
        self.transport.close()


async def serve_uvloop(listen: tuple[str, int], admin: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    ports = SourcePorts()
    await loop.create_server(lambda: Client(loop, ports), *listen, backlog=4096)
    await loop.create_server(Ready, *admin)
    await asyncio.Event().wait()


# -- on select.epoll, with plain non-blocking sockets -------------------------


class Side:
    """One socket of a relayed pair; `pipe` carries what it reads, when splicing."""

    __slots__ = ("connecting", "eof", "peer", "pending", "pipe", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer: Side = self
        self.pending = b""
        self.connecting = False
        self.eof = False
        self.pipe: tuple[int, int] | None = None


class EpollRelay:
    def __init__(self, listen: tuple[str, int], admin: tuple[str, int]) -> None:
        self.listener = self.listening(listen, 4096)
        self.admin = self.listening(admin, 64)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.admin.fileno(), select.EPOLLIN)
        self.sides: dict[int, Side] = {}
        self.ports = SourcePorts()

    @staticmethod
    def listening(where: tuple[str, int], backlog: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        while True:
            self.poll_once(-1)

    def poll_once(self, timeout: float = 0) -> None:
        listener, admin = self.listener.fileno(), self.admin.fileno()
        for fd, _ in self.epoll.poll(timeout):
            if fd == listener:
                self.accept()
            elif fd == admin:
                self.answer_ready()
            else:
                self.dispatch(fd)

    def dispatch(self, fd: int) -> None:
        if (side := self.sides.get(fd)) is not None:
            self.ready(fd, side)

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            upstream = socket.socket()
            upstream.setblocking(False)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                upstream.bind(("0.0.0.0", self.ports.take()))
                error = upstream.connect_ex(original_destination(client))
            except OSError:
                error = -1
            if error not in (0, errno.EINPROGRESS):
                client.close()
                upstream.close()
                continue
            near, far = Side(client), Side(upstream)
            near.peer, far.peer, far.connecting = far, near, True
            self.sides[client.fileno()], self.sides[upstream.fileno()] = near, far
            self.epoll.register(client.fileno(), select.EPOLLIN)
            self.epoll.register(upstream.fileno(), select.EPOLLOUT)

    def answer_ready(self) -> None:
        sock, _ = self.admin.accept()
        sock.settimeout(1.0)
        try:
            sock.recv(4096)
            sock.sendall(READY)
        except OSError:
            pass
        finally:
            sock.close()

    def ready(self, fd: int, side: Side) -> None:
        if side.connecting:
            if side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.close(side)
                return
            side.connecting = False
            self.epoll.modify(fd, select.EPOLLIN)
            try:
                self.forward(side, side.pending)
                if side.peer.eof:
                    side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close(side)
            return
        if side.eof:
            self.close(side)  # a hang-up or error after its end: epoll reports it anyway
            return
        peer = side.peer
        if peer.connecting:
            try:
                data = side.sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            peer.pending += data
            if data:
                return
        elif self.move(side):
            return
        side.eof = True
        if peer.eof:
            self.close(side)
            return
        self.epoll.modify(fd, 0)
        if not peer.connecting:
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close(side)

    def move(self, side: Side) -> bool:
        """Pass what side has to its peer; False at its end (or an error)."""
        try:
            data = side.sock.recv(CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if data:
            try:
                self.forward(side.peer, data)
            except OSError:
                self.close(side)
            return True
        return False

    def forward(self, to: Side, data: bytes) -> None:
        """Blocking for the rest once the socket is full: a floor, not a product."""
        if not data:
            return
        sent = to.sock.send(data)
        if sent < len(data):
            to.sock.setblocking(True)
            try:
                to.sock.sendall(data[sent:])
            finally:
                to.sock.setblocking(False)

    def close(self, side: Side) -> None:
        for member in (side, side.peer):
            fd = member.sock.fileno()
            if self.sides.pop(fd, None) is not None:
                self.epoll.unregister(fd)
                member.sock.close()
            if member.pipe is not None:
                for end in member.pipe:
                    os.close(end)
                member.pipe = None


class SpliceRelay(EpollRelay):
    """The epoll relay, with bytes moved by os.splice through a pipe per direction."""

    def move(self, side: Side) -> bool:
        if side.pipe is None:
            side.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(side.pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        pipe_out, pipe_in = side.pipe
        try:
            size = os.splice(
                side.sock.fileno(),
                pipe_in,
                PIPE_SIZE,
                flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
            )
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not size:
            return False
        target = side.peer.sock.fileno()
        try:
            while size:
                try:
                    size -= os.splice(pipe_out, target, size, flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    if not select.select([], [target], [], STALLED_SECONDS)[1]:
                        raise TimeoutError("the peer took nothing") from None
        except OSError:
            self.close(side)
        return True


class NestedRelay(EpollRelay):
    """The epoll relay with its set polled by uvloop (`add_reader` on the set's descriptor)."""

    def run(self) -> None:
        import uvloop

        async def serve() -> None:
            asyncio.get_running_loop().add_reader(self.epoll.fileno(), self.poll_once)
            await asyncio.Event().wait()

        uvloop.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("uvloop", "epoll", "nested", "splice"))
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--admin", type=address, required=True)
    args = parser.parse_args()
    if args.kind == "epoll":
        EpollRelay(args.listen, args.admin).run()
    elif args.kind == "nested":
        NestedRelay(args.listen, args.admin).run()
    elif args.kind == "splice":
        SpliceRelay(args.listen, args.admin).run()
    else:
        import uvloop

        uvloop.run(serve_uvloop(args.listen, args.admin))


if __name__ == "__main__":
    main()
