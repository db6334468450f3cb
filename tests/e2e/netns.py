"""Acting inside a network namespace from the test process: commands, sockets, HTTP.

Python 3.11 has no os.setns, and a network namespace belongs to a thread, so a
socket is made on a short-lived thread that first joins the namespace through
libc's setns(2). The socket keeps that namespace for life and can then be used
from any thread or event loop of the test process.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
THREAD_TIMEOUT = 10.0
"""Joining a namespace and making sockets takes milliseconds; this only bounds a hang."""

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def enter_namespace(ns: str) -> None:
    """Move the calling thread into network namespace `ns` (for good)."""
    with open(os.path.join(NETNS_DIR, ns), "rb") as handle:
        if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")


def call_in(ns: str, function: Callable[[], T]) -> T:
    """Run `function` on a fresh thread inside namespace `ns` and return its result."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            enter_namespace(ns)
            outcome.append(function())
        except BaseException as error:  # handed to the caller's thread just below
            failure.append(error)

    thread = threading.Thread(target=target, name=f"netns {ns}", daemon=True)
    thread.start()
    thread.join(THREAD_TIMEOUT)
    if thread.is_alive():
        raise TimeoutError(f"a thread inside namespace {ns} did not finish")
    if failure:
        raise failure[0]
    return outcome[0]


def socket_in(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket living in namespace `ns`."""
    return call_in(ns, lambda: socket.socket(family, type))


def sockets_in(ns: str, family: int, count: int) -> list[socket.socket]:
    """`count` TCP sockets in namespace `ns`, made on one thread (for load tests)."""

    def make() -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for _ in range(count):
                made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    return call_in(ns, make)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect_in(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking TCP connection from namespace `ns` to an IP literal."""
    sock = socket_in(ns, family_of(host))
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def run_in(
    ns: str,
    argv: Sequence[str],
    timeout: float = 10.0,
    input: bytes | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command inside `ns` (with its /etc/netns files bound over /etc); bounded."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=input,
        capture_output=True,
        timeout=timeout,
        check=check,
    )


class NamespaceHTTPConnection(http.client.HTTPConnection):
    """http.client over a socket made in a namespace; `host` is an IP literal."""

    def __init__(self, ns: str, host: str, port: int = 80, timeout: float = 5.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ns = ns

    def connect(self) -> None:
        self.sock = connect_in(self.ns, self.host, self.port, self.timeout or 5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def http_get_in(
    ns: str, host: str, port: int, path: str, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One GET from namespace `ns`: (status, body)."""
    connection = NamespaceHTTPConnection(ns, host, port, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
