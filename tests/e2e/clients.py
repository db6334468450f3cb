"""Python clients for the e2e tests: bounded reads, bulk transfers, TLS with a hand-fed hello."""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from .servers import deterministic_chunks

RECV_SIZE = 4 << 20


@functools.lru_cache(maxsize=8)
def stream_sha256(total: int) -> str:
    """sha256 hex of the first `total` bytes of the servers' deterministic stream."""
    digest = hashlib.sha256()
    for chunk in deterministic_chunks(total):
        digest.update(chunk)
    return digest.hexdigest()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the test's time bound ran out")
    return left


def recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


def recv_line(sock: socket.socket, timeout: float = 5.0, limit: int = 4096) -> bytes:
    """Bytes up to and including the first newline (read one byte at a time: no over-read)."""
    deadline = time.monotonic() + timeout
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= limit:
            raise ValueError(f"no newline in {bytes(line)!r}")
        sock.settimeout(_remaining(deadline))
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"EOF inside a line: {bytes(line)!r}")
        line += byte
    return bytes(line)


def recv_until_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            return bytes(data)
        data += chunk


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closes or resets within `timeout` (whatever it sent before)."""
    try:
        recv_until_eof(sock, timeout)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def bytes_before_close(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """Everything received until the peer closes or resets; None if it is still open."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        try:
            sock.settimeout(_remaining(deadline))
            chunk = sock.recv(RECV_SIZE)
        except ConnectionResetError:
            return bytes(data)
        except TimeoutError:
            return None
        if not chunk:
            return bytes(data)
        data += chunk


def hash_until_eof(sock: socket.socket, timeout: float, prefix: bytes = b"") -> tuple[str, int]:
    """sha256 hex and length of `prefix` plus everything received until EOF."""
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256(prefix)
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    total = len(prefix)
    while True:
        sock.settimeout(_remaining(deadline))
        size = sock.recv_into(buffer)
        if size == 0:
            return digest.hexdigest(), total
        digest.update(view[:size])
        total += size


def send_stream(sock: socket.socket, total: int, then_shutdown: bool = True) -> None:
    for chunk in deterministic_chunks(total):
        sock.sendall(chunk)
    if then_shutdown:
        sock.shutdown(socket.SHUT_WR)


def echo_transfer(sock: socket.socket, total: int, timeout: float) -> tuple[str, int]:
    """Send `total` stream bytes while reading the echo back; (sha256, length) of the echo."""
    sock.settimeout(timeout)
    failures: list[BaseException] = []

    def sender() -> None:
        try:
            send_stream(sock, total)
        except BaseException as error:  # reported by the reading thread below
            failures.append(error)

    thread = threading.Thread(target=sender, name="echo sender", daemon=True)
    thread.start()
    try:
        result = hash_until_eof(sock, timeout)
    finally:
        thread.join(timeout)
    if failures:
        raise failures[0]
    return result


def echo_once(sock: socket.socket, message: bytes, timeout: float = 5.0) -> bytes:
    sock.sendall(message)
    return recv_exactly(sock, len(message), timeout)


# --- TLS with the hello under the test's control --------------------------------

SendHello = Callable[[socket.socket, bytes], None]


def send_whole(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(hello)


def send_one_byte_segments(sock: socket.socket, hello: bytes) -> None:
    """One byte per TCP segment: Nagle off and a pause after each byte."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for index in range(len(hello)):
        sock.sendall(hello[index : index + 1])
        time.sleep(0.001)


def split_records(hello: bytes, fragment_size: int) -> bytes:
    """The same handshake bytes re-framed as TLS records of at most `fragment_size` bytes."""
    content_type, version, length = hello[0], hello[1:3], struct.unpack("!H", hello[3:5])[0]
    fragment, rest = hello[5 : 5 + length], hello[5 + length :]
    records = [
        bytes([content_type]) + version + struct.pack("!H", len(piece)) + piece
        for piece in (
            fragment[offset : offset + fragment_size]
            for offset in range(0, len(fragment), fragment_size)
        )
    ]
    return b"".join(records) + rest


def client_hello(context: ssl.SSLContext, server_name: str) -> bytes:
    """The first flight a real client would send (for truncation tests)."""
    tls = context.wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name
    )
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake cannot finish without the server")


class TlsClient:
    """TLS over a plain socket through memory BIOs, so the test decides how bytes are written."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_name: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def handshake(self, send_hello: SendHello = send_whole, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        hello_sent = False
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.outgoing.read()
                if pending and not hello_sent:
                    send_hello(self.sock, pending)
                    hello_sent = True
                elif pending:
                    self.sock.sendall(pending)
                self._receive(deadline)
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def _receive(self, deadline: float) -> None:
        self.sock.settimeout(_remaining(deadline))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("EOF from the peer inside TLS")
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv_http_response(self, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 response with a Content-Length body."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        while b"\r\n\r\n" not in data:
            data += self._read_some(deadline)
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        body_buffer = bytearray(body)
        while len(body_buffer) < length:
            body_buffer += self._read_some(deadline)
        return int(status_line.split()[1]), headers, bytes(body_buffer)

    def _read_some(self, deadline: float) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive(deadline)

    @property
    def version(self) -> str | None:
        return self.tls.version()


def http_request(host: str, path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
