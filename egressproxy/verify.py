"""Destination verification: does the name the client chose resolve to where it is going?

Without it a workload allowed `httpbin.org` reaches any address by sending
`SNI: httpbin.org` there. Answers come from the system resolver in the worker's
lookup threads (never on the event loop), cached with a bounded size and
lifetime; concurrent questions about one name share one lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import OrderedDict

from egressproxy.errors import DNS_ERROR
from egressproxy.lookups import LookupThreads
from egressproxy.policy.decision import Action, Decision, Destination, IPAddress, unmapped
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import VerifyDestination

log = logging.getLogger("egressproxy.verify")

CACHE_ENTRIES = 4096
CACHE_SECONDS = 30.0
NEGATIVE_CACHE_SECONDS = 5.0

DESTINATION_MISMATCH = "destination_mismatch"
"""The name resolved, and not to the destination (or to nothing: a definite answer too)."""
NO_ANSWER = DNS_ERROR
"""The resolver gave no answer: the destination is unverified, not shown to be elsewhere."""
REFUSALS = {
    DESTINATION_MISMATCH: "destination does not match the host",
    NO_ANSWER: "destination could not be verified: no answer from the resolver",
}
"""The text of enforce's 421 for each error Resolver.check answers: a client is told
whether its name points elsewhere or could not be looked up (and may be retried)."""


def verification_mode(
    decision: Decision, hostname: str | None, default: VerifyDestination
) -> VerifyDestination:
    """How to check this traffic's destination: OFF when nothing rests on a name.

    A network's annotation overrides --verify-destination. Traffic that is denied,
    routed to a backend (the client's address is not used), or covered by no network
    (passed untouched on its address alone) needs no check. An audited network denies
    nothing: there enforce only logs, and the traffic passes.
    """
    if hostname is None or decision.backend is not None or decision.parent is None:
        return VerifyDestination.OFF
    if decision.action is Action.DENY and not decision.audit:
        return VerifyDestination.OFF
    mode = default
    if decision.verify_destination is not None:
        mode = VerifyDestination(decision.verify_destination)
    if decision.audit and mode is VerifyDestination.ENFORCE:
        return VerifyDestination.LOG
    return mode


class Resolver:
    """Hostname → the set of its A/AAAA addresses, cached. Its lookup threads also serve
    the worker's other lookups (routes' backends), uncached."""

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
        self._lookups: dict[str, asyncio.Task[frozenset[IPAddress] | None]] = {}
        self.threads = LookupThreads()

    async def addresses(self, hostname: str) -> frozenset[IPAddress] | None:
        """The addresses hostname resolves to; empty when it does not resolve; None when
        the resolver gave no answer within the timeout. No answer is not cached: the lookup
        goes on, later questions join it, and its answer, when it comes, is."""
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
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(lookup)
        except TimeoutError:
            log.warning("%s: no answer from the resolver within %ss", hostname, self._timeout)
            return None

    async def _shared_lookup(
        self, loop: asyncio.AbstractEventLoop, hostname: str
    ) -> frozenset[IPAddress] | None:
        """One lookup in a task of its own, which every waiter shields: a client that leaves
        (its task cancelled) must not cancel the answer other clients wait for."""
        try:
            answer = await self._lookup(hostname)
        finally:
            del self._lookups[hostname]
        if answer is None:
            return None
        lifetime = self._lifetime if answer else NEGATIVE_CACHE_SECONDS
        self._cache[hostname] = (loop.time() + lifetime, answer)
        self._cache.move_to_end(hostname)
        while len(self._cache) > self._entries:
            self._cache.popitem(last=False)
        return answer

    async def _lookup(self, hostname: str) -> frozenset[IPAddress] | None:
        """The system resolver's answer: empty when the name does not exist or has no
        address; None when its servers gave no answer (EAI_AGAIN, or too many lookups
        waiting for a thread), not to be remembered, nor counted as a mismatch."""
        try:
            found = await self.threads.addresses(hostname, None)
        except socket.gaierror as error:
            if error.errno == socket.EAI_AGAIN:
                log.warning("%s: no answer from the resolver: %s", hostname, error.strerror)
                return None
            return frozenset()
        except (OSError, UnicodeError):
            return frozenset()
        return frozenset(ipaddress.ip_address(address.split("%", 1)[0]) for address in found)

    def close(self) -> None:
        self.threads.close()

    async def matches(self, hostname: str, destination: IPAddress) -> bool | None:
        """True when destination is one of hostname's addresses (v4-mapped counts as v4),
        None when the resolver gave no answer.

        An IP-literal name (an SNI RFC 6066 forbids, or a Host) must be the destination itself,
        v4-mapped or not.
        """
        destination = unmapped(destination)
        try:
            literal = ipaddress.ip_address(hostname)
        except ValueError:
            addresses = await self.addresses(hostname)
            return None if addresses is None else destination in addresses
        return unmapped(literal) == destination

    async def check(
        self,
        record: FlowRecord | RequestRecord,
        destination: Destination,
        mode: VerifyDestination,
    ) -> str:
        """The error word enforce closes with: empty when the record's hostname resolves to
        destination, else DESTINATION_MISMATCH, or NO_ANSWER when the resolver gave none (an
        outage is not spoofing). Either failure is noted on the record (its mode, for the
        metrics) and logged. The caller enforces."""
        assert record.hostname is not None
        matches = await self.matches(record.hostname, destination.ip)
        if matches:
            return ""
        if matches is None:
            record.destination_unverified = mode.value
            log.warning(
                "%s: cannot tell whether %s resolves to %s: no answer from the resolver"
                " (verify-destination %s)",
                record.client,
                record.hostname,
                destination.ip,
                mode.value,
            )
            return NO_ANSWER
        record.destination_mismatch = mode.value
        log.warning(
            "%s: %s does not resolve to %s (verify-destination %s)",
            record.client,
            record.hostname,
            destination.ip,
            mode.value,
        )
        return DESTINATION_MISMATCH
