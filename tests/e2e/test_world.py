"""The world itself: the redirect really captures the client's traffic.

The fixture already proved that the fake internet answers every host and port
from the client namespace (before installing the redirect); this proves that
afterwards nothing reaches it except through whatever listens on :15001, so a
passing data-plane test went through the proxy.
"""

from __future__ import annotations

import pytest

from . import servers
from .world import World

pytestmark = pytest.mark.e2e

CURL_CONNECT_FAILED = 7


def test_without_a_proxy_the_redirect_leaves_nothing_reachable(world: World) -> None:
    for flag in ("-4", "-6"):
        result = world.curl(flag, "http://httpbin.org/get", timeout=5)
        assert result.returncode == CURL_CONNECT_FAILED, result
    host = world.host("github.com")
    for address in host.addresses:
        with pytest.raises(ConnectionRefusedError):
            world.connect(address, servers.ECHO_PORT, timeout=2).close()
