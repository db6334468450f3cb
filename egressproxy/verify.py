"""Destination verification: does the name the client chose resolve to where it is going?

Without it a workload allowed `httpbin.org` reaches any address by sending
`SNI: httpbin.org` there. Answers come from the system resolver through the
loop's executor (never on the event loop), cached with a bounded size and
lifetime; concurrent questions about one name share one lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import OrderedDict

from egressproxy.policy.decision import Action, Decision, Destination, IPAddress
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import VerifyDestination

log = logging.getLogger("egressproxy.verify")

CACHE_ENTRIES = 4096
CACHE_SECONDS = 30.0
NEGATIVE_CACHE_SECONDS = 5.0


def verification_mode(
    decision: Decision, hostname: str | None, default: VerifyDestination
) -> VerifyDestination:
    """How to check this traffic's destination: OFF when nothing rests on a name.

    A network's annotation overrides --verify-destination. Traffic that is denied,
    routed to a backend (the client's address is not used), or covered by no network
    (passed untouched on its address alone) needs no check.
    """
    if hostname is None or decision.backend is not None or decision.parent is None:
        return VerifyDestination.OFF
    if decision.action is Action.DENY and not decision.audit:
        return VerifyDestination.OFF
    if decision.verify_destination is not None:
        return VerifyDestination(decision.verify_destination)
    return default


class Resolver:
    """Hostname → the set of its A/AAAA addresses, cached."""

    def __init__(
        self,
        entries: int = CACHE_ENTRIES,
        lifetime: float = CACHE_SECONDS,
        timeout: float = 5.0,
    ) -> None:
        self._entries = entries
        self._lifetime = lifetime
        self._timeout = timeout
        self._cache: OrderedDict[str, tuple[float, frozenset[IPAddress]]] = OrderedDict()
        self._lookups: dict[str, asyncio.Task[frozenset[IPAddress]]] = {}

    async def addresses(self, hostname: str) -> frozenset[IPAddress]:
        """The addresses hostname resolves to; empty when it does not resolve."""
        loop = asyncio.get_running_loop()
        cached = self._cache.get(hostname)
        if cached is not None and cached[0] > loop.time():
            self._cache.move_to_end(hostname)
            return cached[1]
        lookup = self._lookups.get(hostname)
        if lookup is None:
            lookup = loop.create_task(
                self._shared_lookup(loop, hostname), name=f"resolve {hostname}"
            )
            self._lookups[hostname] = lookup
        return await asyncio.shield(lookup)

    async def _shared_lookup(
        self, loop: asyncio.AbstractEventLoop, hostname: str
    ) -> frozenset[IPAddress]:
        """One lookup in a task of its own, which every waiter shields: a client that leaves
        (its task cancelled) must not cancel the answer other clients wait for."""
        try:
            answer = await self._lookup(loop, hostname)
        finally:
            del self._lookups[hostname]
        lifetime = self._lifetime if answer else NEGATIVE_CACHE_SECONDS
        self._cache[hostname] = (loop.time() + lifetime, answer)
        self._cache.move_to_end(hostname)
        while len(self._cache) > self._entries:
            self._cache.popitem(last=False)
        return answer

    async def _lookup(self, loop: asyncio.AbstractEventLoop, hostname: str) -> frozenset[IPAddress]:
        try:
            async with asyncio.timeout(self._timeout):
                infos = await loop.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError, UnicodeError):
            return frozenset()
        return frozenset(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos)

    async def matches(self, hostname: str, destination: IPAddress) -> bool:
        """True when destination is one of hostname's addresses (v4-mapped counts as v4).

        An IP-literal name (an SNI RFC 6066 forbids, or a Host) must be the destination itself.
        """
        if isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped:
            destination = destination.ipv4_mapped
        try:
            return ipaddress.ip_address(hostname) == destination
        except ValueError:
            return destination in await self.addresses(hostname)

    async def check(
        self,
        record: FlowRecord | RequestRecord,
        destination: Destination,
        mode: VerifyDestination,
    ) -> bool:
        """Whether the record's hostname resolves to destination; a mismatch is noted
        on the record (its mode, for the metrics) and logged. The caller enforces."""
        assert record.hostname is not None
        if await self.matches(record.hostname, destination.ip):
            return True
        record.destination_mismatch = mode.value
        log.warning(
            "%s: %s does not resolve to %s (verify-destination %s)",
            record.client,
            record.hostname,
            destination.ip,
            mode.value,
        )
        return False
