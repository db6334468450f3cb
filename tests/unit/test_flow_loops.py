"""The redirect-loop guard of a proxy running as root without --mark, on loopback: a loop
found at the last moment, just before connecting, ends the connection like one found
when the bytes came (reported once, error=loop, out of the open flows)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from egressproxy import upstream
from tests.unit.http_harness import ALLOW_ALL, echo, proxy_to_origin

TIMEOUT = 5.0


@pytest.mark.asyncio
async def test_a_loop_found_just_before_connecting_is_reported_and_frees_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard asks when the bytes come and again before connecting (the hop before
    may have connected in between); here only the second answer is yes."""
    answers = iter([False, True])
    monkeypatch.setattr(upstream, "is_own_connection", lambda peer, dest: next(answers, True))
    async with proxy_to_origin(echo, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        assert proxy.context.watch_loops, "root without --mark watches for loops"
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"\x00\x01 a binary protocol")
        assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b""
        writer.close()
        await proxy.wait_closed_flows(1)
        assert [flow.error for flow in proxy.ledger.flows] == ["loop"]
        assert not proxy.context.open_flows.flows
