"""Bulk bytes through a relay: os.splice through a pipe versus uvloop transport copies.

A relay process (pinned to one core) accepts a connection on 127.0.0.1 and
connects onwards; both ends (pinned to the other core) send as fast as they
can and count what arrives, so bytes flow both ways at once. For each mode it
reports the relayed throughput and the relay's CPU (utime+stime from /proc) per
GB. Run as `venv/bin/python benchmarks/relay_splice_vs_copy.py`; no root needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

import uvloop

CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
F_SETPIPE_SZ = 1031
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RELAY_CPU = "1"
ENDPOINT_CPU = "0"


# -- the two relays ----------------------------------------------------------


class CopySide(asyncio.Protocol):
    """The production relay's shape: data_received → peer.write, pause on the high mark."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.peer: CopySide

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class SpliceDirection:
    """source → pipe → sink with os.splice; waits for the sink when it is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: int, sink: int) -> None:
        self.loop, self.source, self.sink = loop, source, sink
        self.pipe_read, self.pipe_write = os.pipe2(os.O_NONBLOCK)
        fcntl.fcntl(self.pipe_write, F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        loop.add_reader(source, self.readable)

    def readable(self) -> None:
        try:
            moved = os.splice(
                self.source,
                self.pipe_write,
                PIPE_SIZE,
                flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
            )
        except BlockingIOError:
            return
        if moved == 0:
            self.loop.remove_reader(self.source)
            return
        self.in_pipe += moved
        self.drain()

    def drain(self) -> None:
        while self.in_pipe:
            try:
                moved = os.splice(
                    self.pipe_read,
                    self.sink,
                    self.in_pipe,
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
            except BlockingIOError:
                self.loop.remove_reader(self.source)
                self.loop.add_writer(self.sink, self.writable)
                return
            self.in_pipe -= moved

    def writable(self) -> None:
        self.drain()
        if not self.in_pipe:
            self.loop.remove_writer(self.sink)
            self.loop.add_reader(self.source, self.readable)


async def relay(mode: str, listen_port: int, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", listen_port))
    listener.setblocking(False)
    print("listening", flush=True)
    client, _ = await loop.sock_accept(listener)
    upstream = socket.socket()
    upstream.setblocking(False)
    await loop.sock_connect(upstream, ("127.0.0.1", target_port))
    if mode == "copy":
        a, b = CopySide(), CopySide()
        a.peer, b.peer = b, a
        await loop.connect_accepted_socket(lambda: a, client)
        await loop.create_connection(lambda: b, sock=upstream)
    else:
        directions = [
            SpliceDirection(loop, client.fileno(), upstream.fileno()),
            SpliceDirection(loop, upstream.fileno(), client.fileno()),
        ]
        assert directions
    await asyncio.Event().wait()


# -- the endpoints and the measurement ---------------------------------------


class Counter:
    def __init__(self) -> None:
        self.received = 0
        self.lock = threading.Lock()


def pump(sock: socket.socket, counter: Counter, stop: threading.Event) -> None:
    """Send on one thread, count what arrives on this one, until stop."""
    payload = bytes(CHUNK)

    def send() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(payload)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    buffer = bytearray(CHUNK)
    with contextlib.suppress(OSError):
        while not stop.is_set():
            got = sock.recv_into(buffer)
            if not got:
                break
            with counter.lock:
                counter.received += got


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(mode: str, seconds: float) -> tuple[float, float]:
    """(Gbit/s relayed, both directions together; relay CPU seconds per GB)."""
    listen_port = free_port()
    sink = socket.create_server(("127.0.0.1", 0))
    target_port = sink.getsockname()[1]
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            RELAY_CPU,
            sys.executable,
            __file__,
            "--relay",
            mode,
            str(listen_port),
            str(target_port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    try:
        assert process.stdout is not None
        process.stdout.readline()
        os.sched_setaffinity(0, {int(ENDPOINT_CPU)})
        a = socket.create_connection(("127.0.0.1", listen_port))
        b, _ = sink.accept()
        counters = [Counter(), Counter()]
        threads = [
            threading.Thread(target=pump, args=(sock, counter, stop), daemon=True)
            for sock, counter in zip((a, b), counters, strict=True)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        bytes_before = sum(counter.received for counter in counters)
        cpu_before, started = cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)
        moved = sum(counter.received for counter in counters) - bytes_before
        cpu, elapsed = cpu_seconds(process.pid) - cpu_before, time.monotonic() - started
        stop.set()
        a.close()
        b.close()
    finally:
        process.terminate()
        process.wait(5)
        sink.close()
    return moved * 8 / 1e9 / elapsed, cpu / (moved / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay", nargs=3, metavar=("MODE", "LISTEN", "TARGET"))
    args = parser.parse_args()
    if args.relay:
        mode, listen, target = args.relay
        uvloop.run(relay(mode, int(listen), int(target)))
        return 0
    samples: dict[str, list[tuple[float, float]]] = {"copy": [], "splice": []}
    for _ in range(args.rounds):
        for mode in samples:
            samples[mode].append(measure(mode, args.seconds))
    print("| relay | Gbit/s (both ways) | relay CPU s per GB | % of a core |")
    print("|---|---|---|---|")
    for mode, results in samples.items():
        throughput = statistics.median(result[0] for result in results)
        per_gb = statistics.median(result[1] for result in results)
        core = per_gb * throughput / 8 * 100
        name = "uvloop transports (copy)" if mode == "copy" else "os.splice through a pipe"
        print(f"| {name} | {throughput:.2f} | {per_gb:.3f} | {core:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
