"""Listener shapes through the real redirect: one dual-stack socket (IPv4 clients arrive as
v4-mapped addresses and their original destination is still found) and several workers."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .proxy_process import Proxy
from .world import World

pytestmark = pytest.mark.e2e

StartProxy = Callable[..., Proxy]


def served_by(world: World, family: str, url: str) -> str:
    """The address of the fake host that answered the request."""
    result = world.curl(family, url)
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["server"]
    assert isinstance(server, dict)
    return str(server["address"])


def test_a_dual_stack_listener_serves_ipv4_clients_as_v4_mapped(
    world: World, proxy: StartProxy
) -> None:
    running = proxy(None, "--listen", "[::]:15001")
    httpbin = world.host("httpbin.org")
    assert served_by(world, "-4", "http://httpbin.org/get") == httpbin.v4
    assert served_by(world, "-6", "http://httpbin.org/get") == httpbin.v6
    assert running.logged(r"client=\[?::ffff:198\.18\.0\.2\]?"), running.log_text()


def test_workers_share_the_listeners(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--workers", "2")
    github = world.host("github.com")
    for _ in range(20):
        assert served_by(world, "-4", "http://github.com/") == github.v4
    status, body = running.admin_get("/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("egress_sniff_outcomes_total", (("outcome", "http1"),))] == 20
    assert samples[("egress_open_connections", ())] == 0
