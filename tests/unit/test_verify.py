import asyncio
import ipaddress

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
from egressproxy.verify import Resolver, verification_mode


class CountingResolver(Resolver):
    """The real cache in front of a fixed table, counting the lookups it needs."""

    def __init__(self, table: dict[str, set[str]], **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.table = table
        self.lookups: list[str] = []

    async def _lookup(self, loop: asyncio.AbstractEventLoop, hostname: str) -> frozenset[IPAddress]:
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


NETWORK = ParentRef("policy.linkerd.io", "EgressNetwork", "egress-test", "all", "443", "")


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
    assert verification_mode(audited, "github.com", enforce) is enforce
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

    async def _lookup(self, loop: asyncio.AbstractEventLoop, hostname: str) -> frozenset[IPAddress]:
        await self.release.wait()
        return await super()._lookup(loop, hostname)


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
