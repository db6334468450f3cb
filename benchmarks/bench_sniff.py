"""Cost of sniffing one connection's first bytes: every connection pays it.

Run: PYTHONPATH=. python benchmarks/bench_sniff.py [--smoke]   (from the repository root;
--smoke: each case timed once, to prove the script runs)
Prints microseconds per call, best of five timeit runs. The "trickled" rows sniff every
prefix of the input, as happens when a client sends one byte per segment: the worst
case a slow client can make the proxy pay. `http1_lean.parse_request` is the head parser
a keep-alive request pays for (the sniffer reads only a connection's first head).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path

from egressproxy.http1_lean import parse_request
from egressproxy.sniff.detect import sniff
from egressproxy.sniff.http import parse_h2_preface, parse_request_head
from egressproxy.sniff.tls import parse_client_hello

CAPTURES = Path(__file__).resolve().parent.parent / "tests" / "captures"

BROWSER_HEAD = (
    b"GET /search?q=egress+proxy&lang=en HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark; consent=yes\r\n"
    b"Connection: keep-alive\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"\r\n"
)


MAX_HEAD = 65536


def microseconds_per_call(call: Callable[[], object], smoke: bool) -> float:
    timer = timeit.Timer(call)
    if smoke:
        return timer.timeit(number=1) * 1e6
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def trickled(parse: Callable[[bytes], object], data: bytes) -> Callable[[], None]:
    def every_prefix() -> None:
        for end in range(1, len(data) + 1):
            parse(data[:end])

    return every_prefix


def main() -> None:
    curl = (CAPTURES / "curl_tls13.bin").read_bytes()
    chromium = (CAPTURES / "chromium.bin").read_bytes()
    chromium_split = (CAPTURES / "chromium_three_records.bin").read_bytes()
    curl_head = (CAPTURES / "curl_http_origin_form.bin").read_bytes()
    h2 = (CAPTURES / "curl_h2_prior_knowledge.bin").read_bytes()
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"parse_client_hello curl ({len(curl)} B)", lambda: parse_client_hello(curl)),
        (f"parse_client_hello chromium ({len(chromium)} B)", lambda: parse_client_hello(chromium)),
        (
            f"parse_client_hello chromium, 3 records ({len(chromium_split)} B)",
            lambda: parse_client_hello(chromium_split),
        ),
        (f"parse_request_head curl ({len(curl_head)} B)", lambda: parse_request_head(curl_head)),
        (
            f"parse_request_head browser-like ({len(BROWSER_HEAD)} B)",
            lambda: parse_request_head(BROWSER_HEAD),
        ),
        (
            f"http1_lean.parse_request curl ({len(curl_head)} B)",
            lambda: parse_request(curl_head, MAX_HEAD),
        ),
        (
            f"http1_lean.parse_request browser-like ({len(BROWSER_HEAD)} B)",
            lambda: parse_request(BROWSER_HEAD, MAX_HEAD),
        ),
        ("parse_h2_preface", lambda: parse_h2_preface(h2)),
        ("sniff chromium", lambda: sniff(chromium)),
        ("sniff browser-like head", lambda: sniff(BROWSER_HEAD)),
        ("sniff binary (first byte)", lambda: sniff(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")),
        ("sniff chromium trickled, all prefixes", trickled(sniff, chromium)),
        ("sniff browser-like head trickled, all prefixes", trickled(sniff, BROWSER_HEAD)),
    ]
    smoke = "--smoke" in sys.argv[1:]
    width = max(len(name) for name, _ in cases)
    for name, call in cases:
        print(f"{name:<{width}}  {microseconds_per_call(call, smoke):10.2f} µs/call")


if __name__ == "__main__":
    main()
