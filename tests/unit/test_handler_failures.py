"""An HTTP/1 or h2 exchange the proxy itself fails while its task waits (verifying the
Host, connecting the upstream), on loopback: a task has no transport to close it, so the
handler resets the client, counts the exchange and the connection once with
error=proxy_error, logs the traceback, and the worker serves the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressproxy import upstream
from egressproxy.settings import VerifyDestination
from tests.e2e.http_servers import H2Server, h1
from tests.unit.http_harness import ALLOW_ALL, LoopbackProxy, proxy_to_origin
from tests.unit.test_flow_failures import BrokenResolver, tracebacks
from tests.unit.test_http1_proxy import read_response
from tests.unit.test_http2_proxy import connect_h2, proxy_to_h2_origin

TIMEOUT = 5.0


def a_bug(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a bug")


VERIFYING = {"verify": VerifyDestination.ENFORCE, "connect": VerifyDestination.OFF}
"""--verify-destination for each place a bug is put: enforce waits for the check."""


@contextlib.contextmanager
def way_up_broken(proxy: LoopbackProxy, where: str) -> Iterator[None]:
    """Within the block, the Host's verification, or the upstream's connect, raises."""
    with pytest.MonkeyPatch.context() as patch:
        if where == "verify":
            broken = BrokenResolver()
            broken.close()  # its lookup threads are never asked
            patch.setattr(proxy.context, "resolver", broken)
        else:
            patch.setattr(upstream, "connect", a_bug)
        yield


async def an_http1_request_is_served(proxy: LoopbackProxy) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /after HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 200
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["verify", "connect"])
async def test_an_http1_exchange_failed_by_the_proxy_is_reset_and_counted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VERIFYING[where]
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with way_up_broken(proxy, where), caplog.at_level(logging.WARNING):
            writer.write(b"GET /a HTTP/1.1\r\nHost: name.test\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            await proxy.wait_closed_flows(1)
        assert [flow.error for flow in proxy.ledger.flows] == ["proxy_error"]
        assert [(r.hostname, r.error) for r in proxy.ledger.requests] == [
            ("name.test", "proxy_error")
        ]
        assert not proxy.context.open_flows.flows
        assert [message.endswith("proxy error") for message in tracebacks(caplog)] == [True]
        await an_http1_request_is_served(proxy)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["verify", "connect"])
async def test_an_h2_stream_failed_by_the_proxy_resets_its_connection_counted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    async with proxy_to_h2_origin(
        H2Server, tmp_path, monkeypatch, verify_destination=VERIFYING[where]
    ) as proxy:
        with way_up_broken(proxy, where), caplog.at_level(logging.WARNING):
            client = await connect_h2(proxy)
            answer = client.request("GET", "/a", authority="name.test")
            async with asyncio.timeout(TIMEOUT):
                await client.lost.wait()
            await proxy.wait_closed_flows(1)
        assert not answer.done.is_set()
        assert [flow.error for flow in proxy.ledger.flows] == ["proxy_error"]
        assert [(r.hostname, r.error) for r in proxy.ledger.requests] == [
            ("name.test", "proxy_error")
        ]
        assert not proxy.context.open_flows.flows
        assert [message.endswith("proxy error") for message in tracebacks(caplog)] == [True]
        client = await connect_h2(proxy)
        after = client.request("GET", "/after", authority="127.0.0.1")
        async with asyncio.timeout(TIMEOUT):
            await after.done.wait()
        assert after.headers[":status"] == "200"
        client.transport.close()
