"""One idle-timeout timer per worker (timeouts.IdleSweep): idle relays close, busy ones stay,
and the sweep lets go of every relay and of its timer once they are done."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from egressproxy.relay import Relay, RelayResult
from egressproxy.timeouts import IdleSweep

IDLE_TIMEOUT = 0.4


class _Results(list[RelayResult]):
    """A relay owner that keeps what it is told."""

    def relayed(self, result: RelayResult) -> None:
        self.append(result)


async def _spliced(
    sweep: IdleSweep, results: _Results
) -> tuple[Relay, socket.socket, socket.socket]:
    """A relay between two real socket pairs; returns it and the two outer ends."""
    loop = asyncio.get_running_loop()
    client_end, client_side = socket.socketpair()
    upstream_side, upstream_end = socket.socketpair()
    client, _ = await loop.create_unix_connection(asyncio.Protocol, sock=client_side)
    relay = Relay(client, idle_sweep=sweep, owner=results)
    await loop.create_unix_connection(lambda: relay.upstream, sock=upstream_side)
    relay.start(b"", False)
    return relay, client_end, upstream_end


def test_one_sweep_closes_the_idle_relay_keeps_the_busy_one_and_then_stops() -> None:
    async def scenario() -> tuple[list[str], list[str], int, bool]:
        loop = asyncio.get_running_loop()
        sweep = IdleSweep(loop, IDLE_TIMEOUT)
        idle_results = _Results()
        busy_results = _Results()
        _, idle_client, idle_upstream = await _spliced(sweep, idle_results)
        _, busy_client, busy_upstream = await _spliced(sweep, busy_results)
        ends = (idle_client, idle_upstream, busy_client, busy_upstream)
        try:
            for _ in range(20):  # 1 s of traffic on one relay, more than two idle timeouts
                busy_client.send(b"x")
                await asyncio.sleep(0.05)
            closed_while_busy = [r.error for r in idle_results] + [r.error for r in busy_results]
            for _ in range(40):  # the busy relay falls idle: bounded wait for its close
                if busy_results:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(IDLE_TIMEOUT / 2)  # a sweep finding nothing left
            after = [r.error for r in busy_results]
            return closed_while_busy, after, len(sweep.members), sweep.timer is None
        finally:
            for end in ends:
                end.close()

    while_busy, after, left, timer_gone = uvloop.run(scenario())
    assert while_busy == ["idle_timeout"], "only the idle relay closed while the other was busy"
    assert after == ["idle_timeout"]
    assert left == 0
    assert timer_gone, "no relay left: the sweep's timer is not re-armed"
