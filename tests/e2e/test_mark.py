"""Loop avoidance by mark: a proxy running as root puts --mark on its upstream sockets and
the redirect returns that mark, instead of returning the proxy's uid.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from egressproxy.netfilter import PROXY_SOURCE_PORTS

from . import servers
from .clients import closed_by_peer, echo_once
from .proxy_process import Proxy
from .world import REDIRECT_CHAIN, World

pytestmark = pytest.mark.e2e

StartProxy = Callable[..., Proxy]
MARK = 42


@pytest.fixture
def mark_returned(world: World) -> Iterator[None]:
    """The redirect also returns packets carrying MARK, for as long as the test runs."""
    rule = ["-m", "mark", "--mark", str(MARK), "-j", "RETURN"]
    for tool in ("iptables", "ip6tables"):
        world.run([tool, "-t", "nat", "-I", REDIRECT_CHAIN, "1", *rule]).check_returncode()
    try:
        yield
    finally:
        for tool in ("iptables", "ip6tables"):
            world.run([tool, "-t", "nat", "-D", REDIRECT_CHAIN, *rule])


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_marked_upstream_connections_are_not_redirected_again(
    world: World, proxy: StartProxy, mark_returned: None, family: str
) -> None:
    running = proxy(None, "--allow-root", "--mark", str(MARK), as_root=True)
    result = world.curl(family, "http://httpbin.org/get")
    assert result.returncode == 0, result.stderr
    echoed = json.loads(result.stdout)
    assert echoed["host"] == "httpbin.org"
    assert echoed["client"]["port"] in PROXY_SOURCE_PORTS
    assert "loop" not in running.log_text()


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_marked_spliced_connections_are_not_redirected_again(
    world: World, proxy: StartProxy, mark_returned: None, family: str
) -> None:
    """The same for opaque TCP, whose upstream socket the splice opens itself."""
    running = proxy(None, "--allow-root", "--mark", str(MARK), as_root=True)
    address = getattr(world.host("httpbin.org"), family)
    with world.connect(address, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"marked\n") == b"marked\n"
    assert "loop" not in running.log_text()


def test_without_the_mark_a_root_proxy_closes_a_spliced_loop(
    world: World, proxy: StartProxy
) -> None:
    running = proxy(None, "--allow-root", as_root=True)
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        sock.sendall(b"looping\n")
        assert closed_by_peer(sock)
    assert running.logged("own upstream connection: a redirect loop"), running.log_text()


def test_without_the_mark_a_root_proxy_would_loop_and_says_so(
    world: World, proxy: StartProxy
) -> None:
    """Without --mark the root proxy's own connection is redirected back to it: the loop
    guard closes it instead of proxying to itself."""
    running = proxy(None, "--allow-root", as_root=True)
    assert running.logged("running as root without --mark: the redirect must let uid 0")
    result = world.curl("-4", "-o", "/dev/null", "-w", "%{http_code}", "http://httpbin.org/get")
    assert result.stdout.decode() == "502"
    assert running.logged("own upstream connection: a redirect loop"), running.log_text()


def test_a_root_proxy_closes_a_loop_through_an_ipv4_mapped_backend(
    world: World, proxy: StartProxy
) -> None:
    """A route to `[::ffff:a.b.c.d]` connects over IPv4, so the loop guard, which keys on
    IPv4 addresses, knows the connection when it comes back. It went out of an IPv6
    socket, and each hop opened another until the connection limit stopped accepting."""
    address = world.host("httpbin.org").v4
    policy = (
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: p}\n"
        "spec:\n  default: allow\n  rules:\n"
        f'  - {{name: r, hosts: [httpbin.org], action: route, to: "[::ffff:{address}]:80"}}\n'
    )
    running = proxy(policy, "--allow-root", "--max-connections", "64", as_root=True)
    result = world.curl(
        "-4", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://httpbin.org/get"
    )
    assert result.stdout.decode() == "502"
    assert running.logged("own upstream connection: a redirect loop"), running.log_text()
    assert "connection limit reached" not in running.log_text()


def test_the_proxy_warns_when_workloads_could_get_its_source_ports(
    world: World, proxy: StartProxy
) -> None:
    setting = "net.ipv4.ip_local_port_range"
    before = " ".join(world.run(["sysctl", "-n", setting]).stdout.decode().split())
    world.run(["sysctl", "-qw", f"{setting}=10000 60999"]).check_returncode()
    try:
        running = proxy(None)
        assert running.logged("ip_local_reserved_ports=16384-32767"), running.log_text()
    finally:
        world.run(["sysctl", "-qw", f"{setting}={before}"]).check_returncode()
