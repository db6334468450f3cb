import asyncio
import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from egressproxy import verify
from egressproxy.lookups import LOOKUP_THREADS
from egressproxy.policy.decision import (
    Action,
    Backend,
    Decision,
    IPAddress,
    ParentRef,
    RouteProtocol,
    is_ip_literal,
)
from egressproxy.settings import VerifyDestination
from egressproxy.verify import Resolver, hosts_file_addresses, verification_mode


class CountingResolver(Resolver):
    """The real cache in front of a fixed table, counting the lookups it needs."""

    def __init__(self, table: dict[str, set[str]], **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.table = table
        self.lookups: list[str] = []

    async def _lookup(self, hostname: str) -> frozenset[IPAddress]:
        self.lookups.append(hostname)
        await asyncio.sleep(0.01)
        return frozenset(ipaddress.ip_address(a) for a in self.table.get(hostname, ()))


def test_localhost_resolves_through_the_system_resolver() -> None:
    async def scenario() -> tuple[bool, bool]:
        resolver = Resolver(timeout=2.0)
        inside = await resolver.matches("localhost", ipaddress.ip_address("127.0.0.1"))
        outside = await resolver.matches("localhost", ipaddress.ip_address("203.0.113.5"))
        return inside, outside

    assert asyncio.run(scenario()) == (True, False)


def test_concurrent_questions_share_one_lookup_and_answers_are_cached() -> None:
    async def scenario() -> CountingResolver:
        resolver = CountingResolver({"httpbin.org": {"203.0.113.10"}})
        answers = await asyncio.gather(
            *(
                resolver.matches("httpbin.org", ipaddress.ip_address("203.0.113.10"))
                for _ in range(5)
            )
        )
        assert all(answers)
        assert not await resolver.matches("httpbin.org", ipaddress.ip_address("203.0.113.20"))
        return resolver

    assert asyncio.run(scenario()).lookups == ["httpbin.org"]


def test_cache_is_bounded_and_forgets_the_oldest() -> None:
    async def scenario() -> CountingResolver:
        resolver = CountingResolver({}, entries=2)
        for name in ("a.test", "b.test", "c.test", "a.test"):
            await resolver.addresses(name)
        return resolver

    assert asyncio.run(scenario()).lookups == ["a.test", "b.test", "c.test", "a.test"]


def test_v4_mapped_destination_counts_as_its_v4_address() -> None:
    async def scenario() -> bool:
        resolver = CountingResolver({"httpbin.org": {"203.0.113.10"}})
        return await resolver.matches("httpbin.org", ipaddress.ip_address("::ffff:203.0.113.10"))

    assert asyncio.run(scenario())


def test_ip_literals() -> None:
    assert is_ip_literal("203.0.113.5")
    assert is_ip_literal("2001:db8::1")
    assert not is_ip_literal("httpbin.org")


NETWORK = ParentRef("policy.linkerd.io", "EgressNetwork", "egress-test", "all", "443")


def decision(action: Action, *, audit: bool = False, verify: str | None = None) -> Decision:
    backend = Backend("internal-egress.egress-test.svc.cluster.local", 80)
    return Decision(
        action,
        RouteProtocol.TLS,
        NETWORK,
        None,
        backend=backend if action is Action.ROUTE else None,
        audit=audit,
        verify_destination=verify,
    )


def test_verification_applies_to_named_traffic_that_goes_to_its_destination() -> None:
    enforce = VerifyDestination.ENFORCE
    assert verification_mode(decision(Action.PASS), "httpbin.org", enforce) is enforce
    assert verification_mode(decision(Action.PASS), None, enforce) is VerifyDestination.OFF
    assert verification_mode(decision(Action.ROUTE), "google.com", enforce) is VerifyDestination.OFF
    assert verification_mode(decision(Action.DENY), "github.com", enforce) is VerifyDestination.OFF
    audited = decision(Action.DENY, audit=True)
    assert verification_mode(audited, "github.com", VerifyDestination.LOG) is VerifyDestination.LOG
    untouched = Decision(Action.PASS, RouteProtocol.TLS, None, None)
    assert verification_mode(untouched, "cluster-service", enforce) is VerifyDestination.OFF


def test_a_network_annotation_overrides_the_flag() -> None:
    annotated = decision(Action.PASS, verify="log")
    assert (
        verification_mode(annotated, "httpbin.org", VerifyDestination.OFF) is VerifyDestination.LOG
    )
    relaxed = decision(Action.PASS, verify="off")
    assert (
        verification_mode(relaxed, "httpbin.org", VerifyDestination.ENFORCE)
        is VerifyDestination.OFF
    )


def test_an_ip_literal_name_must_be_the_destination_itself() -> None:
    async def scenario() -> tuple[bool, bool]:
        resolver = CountingResolver({})
        same = await resolver.matches("203.0.113.10", ipaddress.ip_address("203.0.113.10"))
        other = await resolver.matches("203.0.113.10", ipaddress.ip_address("203.0.113.20"))
        assert resolver.lookups == []
        return same, other

    assert asyncio.run(scenario()) == (True, False)


class HeldResolver(CountingResolver):
    """Answers from the table once `release` is set."""

    def __init__(self, table: dict[str, set[str]]) -> None:
        super().__init__(table)
        self.release = asyncio.Event()

    async def _lookup(self, hostname: str) -> frozenset[IPAddress]:
        await self.release.wait()
        return await super()._lookup(hostname)


def test_a_waiter_cancelled_leaves_the_shared_lookup_to_the_others() -> None:
    """The first to ask is a client that goes away (its task cancelled): the others asking
    meanwhile still get the answer, and it is cached."""

    async def scenario() -> tuple[HeldResolver, bool, bool]:
        resolver = HeldResolver({"httpbin.org": {"203.0.113.10"}})
        destination = ipaddress.ip_address("203.0.113.10")
        leaving = asyncio.create_task(resolver.matches("httpbin.org", destination))
        await asyncio.sleep(0)
        staying = asyncio.create_task(resolver.matches("httpbin.org", destination))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        resolver.release.set()
        stayed = await staying
        return resolver, stayed, await resolver.matches("httpbin.org", destination)

    resolver, stayed, later = asyncio.run(scenario())
    assert (stayed, later, resolver.lookups) == (True, True, ["httpbin.org"])


ADDRESS = "203.0.113.10"
HELD_AT_MOST = 5.0
"""A held getaddrinfo lets go after this whatever happens: no test leaves a thread behind."""


class SystemResolver:
    """socket.getaddrinfo as the test says: names under .slow.test wait for `release`,
    `errors` fail with their EAI_ code, the rest resolve to ADDRESS; `calls` lists names
    as asked (a verified name absolute, with its trailing dot)."""

    def __init__(self, errors: dict[str, int] | None = None) -> None:
        self.release = threading.Event()
        self.errors = errors or {}
        self.calls: list[str] = []

    def __call__(self, host: str, port: object, *args: int, **kwargs: int) -> list[object]:
        self.calls.append(host)
        name = host.removesuffix(".")
        if name.endswith(".slow.test"):
            self.release.wait(HELD_AT_MOST)
        if name in self.errors:
            raise socket.gaierror(self.errors[name], "from the test")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ADDRESS, 0))]


def test_slow_names_and_a_busy_shared_pool_do_not_hold_up_other_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lookups have threads of their own: names that never answer, and the loop's default
    pool taken (under uvloop, getaddrinfo's four libuv threads serve the whole worker),
    leave a lookup of another name unhindered."""
    system = SystemResolver()
    monkeypatch.setattr(socket, "getaddrinfo", system)

    async def scenario() -> frozenset[IPAddress]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        loop.run_in_executor(None, system.release.wait, HELD_AT_MOST)
        resolver = Resolver(timeout=2.0)
        slow = [asyncio.create_task(resolver.addresses(f"n{i}.slow.test")) for i in range(4)]
        try:
            return await resolver.addresses("fast.test")
        finally:
            system.release.set()
            await asyncio.gather(*slow)
            resolver.close()

    assert asyncio.run(scenario()) == {ipaddress.ip_address(ADDRESS)}


def test_no_answer_in_time_fails_closed_and_is_not_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lookup that outlasts the timeout is no answer (None, not "no addresses": the check
    fails closed, but not as a mismatch), and is not cached as the name's answer: the one
    lookup goes on, and what it finds serves the next question."""
    system = SystemResolver()
    monkeypatch.setattr(socket, "getaddrinfo", system)

    async def scenario() -> list[frozenset[IPAddress] | None]:
        resolver = Resolver(timeout=0.2)
        try:
            answers = [await resolver.addresses("a.slow.test") for _ in range(2)]
            system.release.set()
            return [*answers, await resolver.addresses("a.slow.test")]
        finally:
            resolver.close()

    assert asyncio.run(scenario()) == [None, None, {ipaddress.ip_address(ADDRESS)}]
    assert system.calls == ["a.slow.test."]


def test_a_name_that_does_not_exist_is_remembered_a_silent_server_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name that does not exist is a definite answer, no addresses; a server that gives
    none (EAI_AGAIN) is no answer, None."""
    system = SystemResolver({"gone.test": socket.EAI_NONAME, "flaky.test": socket.EAI_AGAIN})
    monkeypatch.setattr(socket, "getaddrinfo", system)

    async def scenario() -> list[frozenset[IPAddress] | None]:
        resolver = Resolver()
        try:
            names = ("gone.test", "gone.test", "flaky.test", "flaky.test")
            return [await resolver.addresses(name) for name in names]
        finally:
            resolver.close()

    assert asyncio.run(scenario()) == [frozenset(), frozenset(), None, None]
    assert system.calls == ["gone.test.", "flaky.test.", "flaky.test."]


def test_a_v4_mapped_ip_literal_name_is_its_v4_address() -> None:
    async def scenario() -> list[bool]:
        resolver = CountingResolver({})
        return [
            await resolver.matches(name, ipaddress.ip_address(destination))
            for name, destination in [
                ("::ffff:127.0.0.1", "127.0.0.1"),
                ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                ("127.0.0.1", "::ffff:127.0.0.1"),
                ("::ffff:127.0.0.1", "127.0.0.2"),
            ]
        ]

    assert asyncio.run(scenario()) == [True, True, True, False]


def test_an_audited_network_only_logs_what_enforce_would_deny() -> None:
    """Audit denies nothing: neither its would-be denials nor its allowed traffic are held
    to enforce, whether the flag or the network's annotation asks for it."""
    enforce, log, off = VerifyDestination.ENFORCE, VerifyDestination.LOG, VerifyDestination.OFF
    for action in (Action.PASS, Action.DENY):
        assert verification_mode(decision(action, audit=True), "github.com", enforce) is log
        annotated = decision(action, audit=True, verify="enforce")
        assert verification_mode(annotated, "github.com", off) is log
        relaxed = decision(action, audit=True, verify="off")
        assert verification_mode(relaxed, "github.com", enforce) is off


HOSTS = """\
127.0.0.1 localhost
# 203.0.113.99 httpbin.org
203.0.113.10 HttpBin.org www.httpbin.org  # the first
2001:db8::10 httpbin.org
203.0.113.11 api.httpbin.org
fe80::1%eth0 linklocal.test
not-an-address broken.test
"""


def test_a_hosts_file_gives_every_line_that_names_the_host_case_aside() -> None:
    assert hosts_file_addresses(HOSTS, "httpbin.org") == ["203.0.113.10", "2001:db8::10"]
    assert hosts_file_addresses(HOSTS, "WWW.httpbin.org") == ["203.0.113.10"]
    assert hosts_file_addresses(HOSTS, "the") == []
    assert hosts_file_addresses(HOSTS, "org") == []


def resolved(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    hosts: str,
    system: SystemResolver,
    hostname: str,
) -> frozenset[IPAddress] | None:
    """What a Resolver answers for hostname, with this hosts file and this getaddrinfo."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts)
    monkeypatch.setattr(verify, "HOSTS_FILE", hosts_file)
    monkeypatch.setattr(socket, "getaddrinfo", system)

    async def scenario() -> frozenset[IPAddress] | None:
        resolver = Resolver(timeout=2.0)
        try:
            return await resolver.addresses(hostname)
        finally:
            resolver.close()

    return asyncio.run(scenario())


def test_a_name_in_the_hosts_file_is_answered_from_it_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As glibc's files-then-dns does: a name the hosts file has is not asked of DNS, and
    its lines that are no address (or carry a zone) give what they can."""
    system = SystemResolver()
    answer = resolved(monkeypatch, tmp_path, HOSTS, system, "linklocal.test")
    assert answer == {ipaddress.ip_address("fe80::1")}
    assert resolved(monkeypatch, tmp_path, HOSTS, system, "broken.test") == frozenset()
    assert system.calls == []


def test_a_name_not_in_the_hosts_file_is_asked_absolute_without_the_search_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """getaddrinfo is asked for `name.` (the trailing dot: no search domain is tried)."""
    system = SystemResolver()
    answer = resolved(monkeypatch, tmp_path, HOSTS, system, "example.test")
    assert answer == {ipaddress.ip_address(ADDRESS)}
    assert system.calls == ["example.test."]


def test_a_v4_mapped_answer_is_its_v4_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def mapped(host: str, port: object, *args: int, **kwargs: int) -> list[object]:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"::ffff:{ADDRESS}", 0, 0, 0))]

    answer = resolved(monkeypatch, tmp_path, "", mapped, "mapped.test")  # type: ignore[arg-type]
    assert answer == {ipaddress.ip_address(ADDRESS)}


@pytest.mark.parametrize(
    ("error", "answer"),
    [
        (socket.EAI_NONAME, frozenset()),
        (socket.EAI_NODATA, frozenset()),
        (socket.EAI_FAIL, None),
        (socket.EAI_AGAIN, None),
        (socket.EAI_SYSTEM, None),
    ],
)
def test_only_a_name_without_addresses_is_a_definite_answer(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    error: int,
    answer: frozenset[IPAddress] | None,
) -> None:
    """EAI_FAIL (the server failed for good) is no answer, like EAI_AGAIN: not a mismatch."""
    system = SystemResolver({"failing.test": error})
    assert resolved(monkeypatch, tmp_path, "", system, "failing.test") == answer


class SlowNames:
    """socket.getaddrinfo whose names under .slow.test each take `seconds` to answer (a
    resolver waiting out its own timeout for a nameserver that never answers); `calls`
    lists the names asked, absolute."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[str] = []

    def __call__(self, host: str, port: object, *args: int, **kwargs: int) -> list[object]:
        self.calls.append(host)
        if host.removesuffix(".").endswith(".slow.test"):
            time.sleep(self.seconds)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ADDRESS, 0))]


def test_a_flood_of_names_nobody_waits_for_any_more_does_not_starve_the_next_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of unique SNIs whose lookups hang (names under a domain whose nameserver
    never answers): their clients give up after the resolver's timeout. The lookups still
    queued then are nobody's: they must not be made, one thread-timeout after another, in
    front of the next client's name, which would get no answer (enforce: every new
    connection refused) for as long as the queue takes to drain."""
    slow = SlowNames(seconds=1.6)
    monkeypatch.setattr(socket, "getaddrinfo", slow)
    flood = [f"n{number}.slow.test" for number in range(LOOKUP_THREADS * 8)]

    async def scenario() -> frozenset[IPAddress] | None:
        resolver = Resolver(timeout=1.0)
        try:
            answers = await asyncio.gather(*(resolver.addresses(name) for name in flood))
            assert answers == [None] * len(flood)  # each client gave up after 1 s
            return await resolver.addresses("fast.test")  # a thread is free within 0.6 s
        finally:
            resolver.close()

    assert asyncio.run(scenario()) == {ipaddress.ip_address(ADDRESS)}
    made = [name.removesuffix(".") for name in slow.calls]
    assert sorted(made) == sorted([*flood[:LOOKUP_THREADS], "fast.test"]), "only those begun"
