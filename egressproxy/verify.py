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

from egressproxy.errors import DNS_ERROR, log_proxy_error
from egressproxy.lookups import LookupThreads, stream_addresses
from egressproxy.policy.decision import Action, Decision, Destination, IPAddress, unmapped
from egressproxy.records import Accounting
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
    """How to check this traffic's destination: OFF when it names no host.

    Named traffic is checked whatever let it through, a host rule or a network's default:
    the name is what the metrics and the access log show. A route's or network's
    annotation overrides --verify-destination. Traffic that is denied,
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
        self._observed: dict[tuple[str, Destination], tuple[str, int]] = {}
        """Per name and destination whose answer log mode awaits: the first client that
        asked, and how many did."""
        self._observing: set[asyncio.Task[None]] = set()
        self.threads = LookupThreads()

    async def addresses(self, hostname: str) -> frozenset[IPAddress] | None:
        """The addresses hostname resolves to; empty when it does not resolve; None when
        the resolver gave no answer within the timeout. No answer is not cached: a lookup
        under way goes on, later questions join it, and its answer, when it comes, is.
        A lookup still queued for a thread when its last question leaves is dropped: a
        flood of names nobody waits for any more must not take the threads, one resolver
        timeout after another, from the names asked next."""
        loop = asyncio.get_running_loop()
        cached = self._cached(hostname, loop.time())
        if cached is not None:
            return cached
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

    def _cached(self, hostname: str, now: float) -> frozenset[IPAddress] | None:
        """hostname's remembered addresses, None when there are none still fresh."""
        cached = self._cache.get(hostname)
        if cached is None or cached[0] <= now:
            return None
        self._cache.move_to_end(hostname)
        return cached[1]

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

    def known_match(self, hostname: str, destination: IPAddress) -> bool | None:
        """Whether destination is one of hostname's addresses (v4-mapped counts as v4), when
        that is known without a lookup; None when only the resolver can tell.

        An IP-literal name (an SNI RFC 6066 forbids, or a Host) must be the destination itself,
        v4-mapped or not.
        """
        destination = unmapped(destination)
        try:
            literal = ipaddress.ip_address(hostname)
        except ValueError:
            cached = self._cached(hostname, asyncio.get_running_loop().time())
            return None if cached is None else destination in cached
        return unmapped(literal) == destination

    async def matches(self, hostname: str, destination: IPAddress) -> bool | None:
        """Whether destination is one of hostname's addresses, from the cache or the
        resolver; None when the resolver gave no answer."""
        known = self.known_match(hostname, destination)
        if known is not None:
            return known
        addresses = await self.addresses(hostname)
        return None if addresses is None else unmapped(destination) in addresses

    async def check(
        self,
        hostname: str,
        destination: Destination,
        client: str,
        accounting: Accounting,
    ) -> str:
        """enforce: the error word to close with, once the resolver has answered: empty when
        hostname resolves to destination, else DESTINATION_MISMATCH, or NO_ANSWER when the
        resolver gave none (an outage is not spoofing). Either failure is counted and
        logged. The caller enforces."""
        matches = await self.matches(hostname, destination.ip)
        return _judged(
            matches, hostname, destination, VerifyDestination.ENFORCE, client, 1, accounting
        )

    def observe(
        self, hostname: str, destination: Destination, client: str, accounting: Accounting
    ) -> None:
        """log: the traffic goes on at once, and a mismatch or a missing answer is counted
        and logged when the resolver has answered. Observing mode must not slow the traffic
        it observes: a resolver that does not answer would otherwise hold every request for
        an unverified name for the whole lookup timeout. The clients that ask about one
        name and address while its answer is awaited wait on one task."""
        known = self.known_match(hostname, destination.ip)
        if known is not None:
            _judged(known, hostname, destination, VerifyDestination.LOG, client, 1, accounting)
            return
        key = (hostname, destination)
        awaited = self._observed.get(key)
        if awaited is not None:
            self._observed[key] = (awaited[0], awaited[1] + 1)
            return
        self._observed[key] = (client, 1)
        task = asyncio.get_running_loop().create_task(
            self._observe(key, accounting), name=f"verify {hostname} {destination.ip} (log)"
        )
        self._observing.add(task)
        task.add_done_callback(self._observing.discard)

    async def _observe(self, key: tuple[str, Destination], accounting: Accounting) -> None:
        hostname, destination = key
        try:
            matches = await self.matches(hostname, destination.ip)
        except Exception as unforeseen:  # a bug: the traffic has gone on, the check is lost
            log_proxy_error(log, f"verifying {hostname} (log)", unforeseen)
            return
        finally:
            client, times = self._observed.pop(key)
        _judged(matches, hostname, destination, VerifyDestination.LOG, client, times, accounting)


def _judged(
    matches: bool | None,
    hostname: str,
    destination: Destination,
    mode: VerifyDestination,
    client: str,
    times: int,
    accounting: Accounting,
) -> str:
    """The error word of a check's answer, counted (times: once for each client that
    asked, client the first) and logged."""
    if matches:
        return ""
    asked = client if times == 1 else f"{client} and {times - 1} more"
    if matches is None:
        log.warning(
            "%s: cannot tell whether %s resolves to %s: no answer from the resolver"
            " (verify-destination %s)",
            asked,
            hostname,
            destination.ip,
            mode.value,
        )
        error = NO_ANSWER
    else:
        log.warning(
            "%s: %s does not resolve to %s (verify-destination %s)",
            asked,
            hostname,
            destination.ip,
            mode.value,
        )
        error = DESTINATION_MISMATCH
    accounting.destination_unconfirmed(error, hostname, mode.value, times)
    return error


def _addresses(found: list[str]) -> Iterator[IPAddress]:
    """The addresses among found (a zone index dropped, v4-mapped as v4); a hosts file's
    line that is no address gives none."""
    for text in found:
        try:
            yield unmapped(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            continue
