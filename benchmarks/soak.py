"""The long soak: tests/e2e/test_soak.py's traffic for minutes, and the proxy's memory per
idle and per busy connection (needs root: it builds the e2e network world).

    benchmarks/soak.py [--connections 5000] [--minutes 5] [--rounds 6]

Each round opens --connections connections (opaque echo, HTTP keep-alive allowed and
denied, TLS, as in the CI soak), first idle after one exchange each, then busy
(exchanging back to back), and closes them. Printed per round: RSS per idle and
per busy connection over the fresh proxy at rest (CPython keeps the arenas a round
grew, so later rounds show the same peaks), peak descriptors,
exchanges and failures; at the end, RSS and descriptors after every round closed,
which must stay flat from round to round (a leak grows them).

The first rounds grow it anyway, then it stays: with 3,000 connections RSS after a round
went 50, 52, 55, 56, 56, 56, 56 MiB with transport relays, and 49, 52, 53, 53, 53, 53 MiB
since opaque and TLS connections are spliced, back to 19 descriptors each time
(something bounded fills: the proxy keeps several caches of limited size, and CPython
keeps the arenas a round grew). A leak shows only in the rounds after the fourth; hence
six by default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.proxy_process import Proxy, ProxyLauncher
from tests.e2e.test_soak import MIX, SOAK_POLICY, Soak, fd_count, metric, scrape
from tests.e2e.world import World, built_world

IDLE_SECONDS = 5.0
SETTLE_SECONDS = 15.0
BUSY_PAUSE = (0.0, 0.05)


def scaled_mix(connections: int) -> dict[str, int]:
    """The CI soak's mix, scaled to `connections`."""
    total = sum(MIX.values())
    mix = {name: count * connections // total for name, count in MIX.items()}
    mix["echo"] += connections - sum(mix.values())
    return mix


def settle(proxy: Proxy) -> tuple[int, int]:
    """RSS and descriptors once no connection is open (bounded wait)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while metric(scrape(proxy), "egress_open_connections") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return proxy.rss_bytes(), fd_count(proxy)


def one_round(
    world: World, proxy: Proxy, mix: dict[str, int], pause: tuple[float, float] | None, hold: float
) -> tuple[int, int, Soak]:
    """Peak RSS and descriptors of one round of connections held `hold` seconds."""
    peak: dict[str, int] = {}

    def measure() -> None:
        peak["rss"], peak["fds"] = proxy.rss_bytes(), fd_count(proxy)

    soak = Soak(world, on_peak=measure, pause=pause)
    asyncio.run(soak.run(mix, 0, hold))
    return peak["rss"], peak["fds"], soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=sum(MIX.values()))
    parser.add_argument("--minutes", type=float, default=5.0, help="busy time over all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * args.connections + 1024:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.connections}")
    mix = scaled_mix(args.connections)
    busy_seconds = args.minutes * 60 / args.rounds
    failures = 0
    with built_world() as world:
        launcher = ProxyLauncher(world)
        try:
            proxy = launcher.start(SOAK_POLICY, (), ready=True)
            try:
                fresh_rss, fresh_fds = settle(proxy)
                print(f"proxy at rest: RSS {fresh_rss >> 20} MiB, {fresh_fds} descriptors")
                print(f"mix per round: {mix}; busy {busy_seconds:.0f}s per round")
                for number in range(1, args.rounds + 1):
                    idle_rss, idle_fds, idle = one_round(world, proxy, mix, None, IDLE_SECONDS)
                    busy_rss, busy_fds, busy = one_round(
                        world, proxy, mix, BUSY_PAUSE, busy_seconds
                    )
                    after_rss, after_fds = settle(proxy)
                    count = args.connections
                    failures += len(idle.tally.failures) + len(busy.tally.failures)
                    print(
                        f"round {number}: idle {(idle_rss - fresh_rss) // count} B/connection"
                        f" ({idle_fds} fds), busy {(busy_rss - fresh_rss) // count} B/connection"
                        f" ({busy_fds} fds), {sum(busy.tally.exchanges.values())} exchanges,"
                        f" {len(idle.tally.failures) + len(busy.tally.failures)} failures;"
                        f" after: RSS {after_rss >> 20} MiB, {after_fds} descriptors"
                    )
                    for failure in (idle.tally.failures + busy.tally.failures)[:3]:
                        print(f"  {failure}")
            finally:
                proxy.stop()
        finally:
            launcher.close()
    return 1 if failures else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("benchmarks/soak.py builds network namespaces: run it as root")
    sys.exit(main())
