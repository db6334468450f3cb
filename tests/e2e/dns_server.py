"""A DNS server for one test, on 127.0.0.1:53 of the client namespace: the system
resolver of the processes `ip netns exec` starts there asks it what the hosts file
does not answer (the world's resolv.conf, rewritten while it runs, names it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from .netns import socket_in

NXDOMAIN = 3
LIFETIME = 60.0
"""The server stops answering after this whatever happens: no test leaves it behind."""


def question_name(message: bytes) -> tuple[str, int]:
    """The first question's name (lower case, no trailing dot) and where its type starts."""
    labels, offset = [], 12
    while length := message[offset]:
        labels.append(message[offset + 1 : offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    return ".".join(labels), offset + 1


def answer(query: bytes, addresses: dict[str, str]) -> bytes:
    """The reply to one query: an A record for a name in addresses, no record for its
    other types, NXDOMAIN for any other name."""
    name, offset = question_name(query)
    query_type = struct.unpack_from("!H", query, offset)[0]
    question = query[12 : offset + 4]
    address = addresses.get(name)
    flags = 0x8180 | (0 if address is not None else NXDOMAIN)
    records = b""
    if address is not None and query_type == 1:
        packed = ipaddress.IPv4Address(address).packed
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, len(packed)) + packed
    header = struct.pack("!HHHHHH", query[0] << 8 | query[1], flags, 1, 1 if records else 0, 0, 0)
    return header + question + records


@contextlib.contextmanager
def serving(
    client_ns: str, resolv_conf: Path, search: str, addresses: dict[str, str]
) -> Iterator[list[str]]:
    """The server answering `addresses` (name → IPv4) while resolv.conf names it with the
    search domain `search` and Kubernetes' ndots:5; yields the names asked, in order."""
    sock = socket_in(client_ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 53))
    except OSError:
        sock.close()
        raise
    sock.settimeout(0.2)
    asked: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        for _ in range(int(LIFETIME / 0.2)):
            if stop.is_set():
                return
            try:
                query, client = sock.recvfrom(512)
            except TimeoutError:
                continue
            asked.append(question_name(query)[0])
            sock.sendto(answer(query, addresses), client)

    thread = threading.Thread(target=serve, name="stub dns", daemon=True)
    before = resolv_conf.read_text()
    try:
        resolv_conf.write_text(
            f"nameserver 127.0.0.1\nsearch {search}\noptions ndots:5 timeout:1 attempts:2\n"
        )
        thread.start()
        yield asked
    finally:
        resolv_conf.write_text(before)
        stop.set()
        if thread.is_alive():
            thread.join(1.0)
        sock.close()
