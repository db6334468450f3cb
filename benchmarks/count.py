"""What one exchange costs the proxy, counted rather than timed: user-space instructions
(valgrind's callgrind) and system calls (strace -c), through the benchmark's redirect.

    count.py [--workload new-conn|keepalive|keepalive-varied|new-tls] [--exchanges N] [--syscalls]
             [--access-log] [--tree DIR]

Timings on a shared machine move by a fifth from one minute to the next; these counts
come out the same run after run (within about 1 % at 300 exchanges, 0.5 % at 1,000),
so a change to the connection path can be judged by them. egressproxy `--workers 1`
runs twice under the counter, once for a warm-up of WARM_UP exchanges and once for
WARM_UP + N; the difference over N is the cost of one exchange, start-up and shutdown
cancelled out.
The exchanges are made one after the other by a Python client in the client
namespace: `new-conn` one `Connection: close` request per connection, `keepalive` N
requests on one connection (`keepalive-varied`: each with its own path, /100b/N, so no
head comes twice and each is decided anew, as in the benchmark's "no head twice" rows),
`new-tls` one request per TLS connection (full handshake).
As root, with valgrind and strace installed (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchworld import (
    ADMIN_PORT,
    HOSTNAME,
    PROXY_CPU,
    SMALL_FILE,
    WEB_IP,
    World,
    descendants,
    http_get,
)
from harness import REPO, as_proxy_user, policy_file, world_for

WORKLOADS = ("new-conn", "keepalive", "keepalive-varied", "new-tls")
WARM_UP = 20
START_TIMEOUT = 300.0
"""Seconds for the proxy to say ready under valgrind, which runs it some fifty times slower."""
STOP_TIMEOUT = 300.0
EXCHANGE_TIMEOUT = 30.0


def request(close: bool, suffix: str = "") -> bytes:
    connection = "close" if close else "keep-alive"
    return (
        f"GET /{SMALL_FILE}{suffix} HTTP/1.1\r\nHost: {HOSTNAME}\r\nUser-Agent: count\r\n"
        f"Connection: {connection}\r\n\r\n"
    ).encode()


def read_to_end(sock: socket.socket | ssl.SSLSocket) -> bytes:
    received = b""
    with contextlib.suppress(ssl.SSLError):  # a server that skips close_notify
        while chunk := sock.recv(65536):
            received += chunk
    return received


def read_response(sock: socket.socket, size: int) -> bytes:
    """One response to GET /SMALL_FILE: its head and its body of size bytes."""
    received = b""
    while True:
        _, found, body = received.partition(b"\r\n\r\n")
        if found and len(body) >= size:
            return received
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the connection ended after {len(received)} bytes")
        received += chunk


def drive(workload: str, exchanges: int) -> None:
    """Make the exchanges one after the other (run inside the client namespace)."""
    answers = []
    if workload.startswith("keepalive"):
        varied = workload == "keepalive-varied"
        with socket.create_connection((WEB_IP, 80), timeout=EXCHANGE_TIMEOUT) as sock:
            for number in range(exchanges):
                sock.sendall(request(close=False, suffix=f"/{number}" if varied else ""))
                answers.append(read_response(sock, size=100))
    elif workload == "new-tls":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the world's certificate is its own
        for _ in range(exchanges):
            raw = socket.create_connection((WEB_IP, 443), timeout=EXCHANGE_TIMEOUT)
            with context.wrap_socket(raw, server_hostname=HOSTNAME) as sock:
                sock.sendall(request(close=True))
                answers.append(read_to_end(sock))
    else:
        for _ in range(exchanges):
            with socket.create_connection((WEB_IP, 80), timeout=EXCHANGE_TIMEOUT) as sock:
                sock.sendall(request(close=True))
                answers.append(read_to_end(sock))
    failed = sum(1 for answer in answers if not answer.startswith(b"HTTP/1.1 200 "))
    if failed:
        sys.exit(f"{failed} of {exchanges} exchanges were not answered 200")


def drive_in_namespace(world: World, workload: str, exchanges: int) -> None:
    in_namespace = ["ip", "netns", "exec", world.client_ns, sys.executable, __file__]
    subprocess.run(
        [*in_namespace, "drive", workload, str(exchanges)],
        check=True,
        timeout=exchanges * EXCHANGE_TIMEOUT,
    )


def counted_run(
    world: World, counter: list[str], workload: str, exchanges: int, access_log: bool
) -> None:
    """The proxy under counter (the command put before Python) for exchanges, then stopped
    with SIGTERM, so the counter writes its totals as the process exits. Without
    access_log, --log-level warning (as the benchmark's egressproxy-w1)."""
    arguments = ["-m", "egressproxy", "run", "--policy", str(policy_file(world))]
    options = ["--workers", "1", "--drain-timeout", "1"]
    options += [] if access_log else ["--log-level", "warning"]
    command = as_proxy_user(world, [*arguments, *options], wrapper=counter)
    started = world.start(f"counted-{counter[0]}", world.client_ns, PROXY_CPU, command)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(world):
            if started.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the counted proxy did not start: see {started.log}")
            time.sleep(0.5)
        drive_in_namespace(world, workload, exchanges)
    finally:
        tree = descendants(started.process.pid)  # strace's child is the proxy; valgrind is it
        with contextlib.suppress(ProcessLookupError, IndexError):
            os.kill(tree[-1], signal.SIGTERM)
        try:
            started.process.wait(STOP_TIMEOUT)
        finally:
            world.stop(started)


def ready(world: World) -> bool:
    with contextlib.suppress(OSError):
        return http_get(world.client_ns, ADMIN_PORT, "/ready")[0] == 200
    return False


def outputs(world: World) -> Path:
    """A directory of the world's where the proxy's uid may write what the counters count."""
    directory = world.tmp / "counts"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o777)
    return directory


def instructions(world: World, workload: str, exchanges: int, access_log: bool) -> float:
    totals = []
    for run_exchanges in (WARM_UP, WARM_UP + exchanges):
        output = outputs(world) / f"callgrind-{run_exchanges}.out"
        counter = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}"]
        counted_run(world, [*counter, "--dump-instr=no"], workload, run_exchanges, access_log)
        found = re.search(r"^(?:summary|totals): (\d+)", output.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no totals in {output}")
        totals.append(int(found[1]))
    return (totals[1] - totals[0]) / exchanges


def system_calls(world: World, workload: str, exchanges: int, access_log: bool) -> Counter[str]:
    counts = []
    for run_exchanges in (WARM_UP, WARM_UP + exchanges):
        output = outputs(world) / f"strace-{run_exchanges}.txt"
        strace = ["strace", "-f", "-c", "-o", str(output)]
        counted_run(world, strace, workload, run_exchanges, access_log)
        calls: Counter[str] = Counter()
        for line in output.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
        counts.append(calls)
    counts[1].subtract(counts[0])
    return counts[1]


def main() -> int:
    if sys.argv[1:2] == ["drive"]:
        drive(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="new-conn")
    parser.add_argument("--exchanges", type=int, default=300)
    parser.add_argument("--syscalls", action="store_true", help="count system calls too")
    parser.add_argument(
        "--access-log", action="store_true", help="with the access log (--log-level info)"
    )
    parser.add_argument(
        "--tree", type=Path, default=REPO, help="the checkout whose egressproxy/ is counted"
    )
    args = parser.parse_args()
    needed = ["valgrind"] + (["strace"] if args.syscalls else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        print(f"count.py: install {' and '.join(missing)} first", file=sys.stderr)
        return 2
    with world_for(args.tree) as world:
        world.set_redirect(True)
        per_exchange = instructions(world, args.workload, args.exchanges, args.access_log)
        print(f"{args.workload}: {per_exchange:,.0f} instructions per exchange")
        if args.syscalls:
            calls = system_calls(world, args.workload, args.exchanges, args.access_log)
            total = sum(calls.values()) / args.exchanges
            print(f"{args.workload}: {total:.1f} system calls per exchange")
            for name, count in calls.most_common():
                if count / args.exchanges >= 0.05:
                    print(f"  {name:<16} {count / args.exchanges:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
