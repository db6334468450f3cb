"""Destination verification: does the name the client chose resolve to where it is going?

Without it a workload allowed `httpbin.org` reaches any address by sending
`SNI: httpbin.org` there. A name means itself: the hosts file's lines that name it,
else the system resolver's answer for the absolute name (`httpbin.org.`), never one
the search list makes of it (in a pod, `httpbin.org.svc.cluster.local` is the Service
`httpbin` of any namespace called `org`, and anyone who may create that namespace would
choose where `httpbin.org` verifies). Answers come from the worker's lookup threads
(never on the event loop), cached with a bounded size and lifetime; concurrent
questions about one name share one lookup.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from egressproxy.errors import DNS_ERROR
from egressproxy.lookups import LookupThreads, stream_addresses
from egressproxy.policy.decision import Action, Decision, Destination, IPAddress, unmapped
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import VerifyDestination

log = logging.getLogger("egressproxy.verify")

CACHE_ENTRIES = 4096
CACHE_SECONDS = 30.0
NEGATIVE_CACHE_SECONDS = 5.0

HOSTS_FILE = Path("/etc/hosts")
DEFINITE_ANSWERS = frozenset({socket.EAI_NONAME, socket.EAI_NODATA, socket.EAI_ADDRFAMILY})
"""getaddrinfo errors that say the name has no address; any other is no answer."""

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


def hosts_file_addresses(text: str, hostname: str) -> list[str]:
    """The addresses of every line of a hosts file that names hostname (case aside), in
    the file's order, as glibc's files lookup gathers them."""
    wanted = hostname.lower()
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) > 1 and wanted in (name.lower() for name in fields[1:]):
            found.append(fields[0])
    return found


def absolute_addresses(hostname: str) -> list[str]:
    """hostname's addresses with no search domain tried: the hosts file's, else those
    getaddrinfo gives its absolute form (the trailing dot also keeps the hosts file out,
    which glibc matches only without one)."""
    name = hostname.removesuffix(".")
    try:
        hosts = HOSTS_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        hosts = ""
    return hosts_file_addresses(hosts, name) or stream_addresses(name + ".", None)


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


class SharedLookup:
    """One lookup of a name, in a task of its own, and the questions waiting for it."""

    __slots__ = ("queued", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[frozenset[IPAddress] | None] | None = None
        self.waiters = 0
        self.queued: asyncio.Future[list[str]] | None = None
        """Its answer from the lookup threads, while it may still be waiting for one."""


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
        self._lookups: dict[str, SharedLookup] = {}
        self.threads = LookupThreads()

    async def addresses(self, hostname: str) -> frozenset[IPAddress] | None:
        """The addresses hostname resolves to; empty when it does not resolve; None when
        the resolver gave no answer within the timeout. No answer is not cached: a lookup
        under way goes on, later questions join it, and its answer, when it comes, is.
        A lookup still queued for a thread when its last question leaves is dropped: a
        flood of names nobody waits for any more must not take the threads, one resolver
        timeout after another, from the names asked next."""
        loop = asyncio.get_running_loop()
        cached = self._cache.get(hostname)
        if cached is not None and cached[0] > loop.time():
            self._cache.move_to_end(hostname)
            return cached[1]
        shared = self._lookups.get(hostname)
        if shared is None:
            shared = self._lookups[hostname] = SharedLookup()
            shared.task = loop.create_task(
                self._shared_lookup(loop, hostname, shared), name=f"resolve {hostname}"
            )
        assert shared.task is not None
        shared.waiters += 1
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(shared.task)
        except TimeoutError:
            log.warning("%s: no answer from the resolver within %ss", hostname, self._timeout)
            return None
        finally:
            shared.waiters -= 1
            queued = shared.queued
            if not shared.waiters and queued is not None and self.threads.withdraw(queued):
                del self._lookups[hostname]  # the next question starts a lookup afresh

    async def _shared_lookup(
        self, loop: asyncio.AbstractEventLoop, hostname: str, shared: SharedLookup
    ) -> frozenset[IPAddress] | None:
        """One lookup in a task of its own, which every waiter shields: a client that leaves
        (its task cancelled) must not cancel the answer other clients wait for."""
        try:
            answer = await self._lookup(hostname)
        finally:
            if self._lookups.get(hostname) is shared:
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
        """The name's addresses (v4-mapped ones as v4): empty when it does not exist or has
        no address; None when the resolver gave no answer (EAI_AGAIN, EAI_FAIL, too many
        lookups waiting for a thread), not to be remembered, nor counted as a mismatch."""
        shared = self._lookups[hostname]
        try:
            shared.queued = self.threads.submit(functools.partial(absolute_addresses, hostname))
            found = await shared.queued
        except socket.gaierror as error:
            if error.errno in DEFINITE_ANSWERS:
                return frozenset()
            log.warning("%s: no answer from the resolver: %s", hostname, error.strerror)
            return None
        except UnicodeError:  # no name the resolver could be asked for: it has no address
            return frozenset()
        except OSError as error:
            log.warning("%s: no answer from the resolver: %s", hostname, error)
            return None
        return frozenset(_addresses(found))

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


def _addresses(found: list[str]) -> Iterator[IPAddress]:
    """The addresses among found (a zone index dropped, v4-mapped as v4); a hosts file's
    line that is no address gives none."""
    for text in found:
        try:
            yield unmapped(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            continue
