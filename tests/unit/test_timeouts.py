"""TimeoutQueue: timeouts of one length on one loop timer fire when due, in order, once,
and never once cancelled; checked on a stand-in clock and on a real uvloop."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import cast

import uvloop
from hypothesis import given
from hypothesis import strategies as st

from egressproxy.timeouts import CLOCK_RESOLUTION, PendingTimeout, TimeoutQueue


class _Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """Just what TimeoutQueue asks of a loop, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[tuple[float, int, _Handle]] = []
        self.order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(when, callback)
        heapq.heappush(self.handles, (when, next(self.order), handle))
        return handle

    def armed(self) -> int:
        return sum(not handle.cancelled for _, _, handle in self.handles)

    def advance_to(self, moment: float) -> None:
        while self.handles and self.handles[0][0] <= moment:
            when, _, handle = heapq.heappop(self.handles)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback()
        self.now = moment


def _queue(loop: ManualLoop, delay: float) -> TimeoutQueue:
    return TimeoutQueue(cast(asyncio.AbstractEventLoop, loop), delay)


@given(
    delay=st.floats(min_value=0.01, max_value=10.0),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans(), st.booleans()),
        max_size=40,
    ),
)
def test_each_timeout_fires_once_at_its_time_unless_cancelled(
    delay: float, steps: list[tuple[float, bool, bool]]
) -> None:
    """Start a timeout after each pause; cancel some at once, others after a later one."""
    loop = ManualLoop()
    queue = _queue(loop, delay)
    fired: list[tuple[int, float]] = []
    started: list[tuple[int, float, PendingTimeout]] = []
    cancelled: set[int] = set()
    for number, (pause, cancel_now, cancel_later) in enumerate(steps):
        loop.advance_to(loop.now + pause)
        timeout = queue.start(lambda n: fired.append((n, loop.time())), number)
        started.append((number, loop.now + delay, timeout))
        if cancel_now:
            timeout.cancel()
            cancelled.add(number)
        elif cancel_later and number > 0 and started[number - 1][0] not in cancelled:
            previous, when, earlier = started[number - 1]
            if when > loop.now + CLOCK_RESOLUTION:
                earlier.cancel()
                cancelled.add(previous)
        assert loop.armed() <= 1, "one loop timer for the whole queue"
    loop.advance_to(loop.now + delay + 1.0)
    assert [number for number, _ in fired] == [
        number for number, _, _ in started if number not in cancelled
    ]
    due = {number: when for number, when, _ in started}
    assert all(at >= due[number] - CLOCK_RESOLUTION for number, at in fired)
    assert not queue.pending and queue.timer is None and loop.armed() == 0


def test_a_timeout_started_by_an_expiring_one_still_fires() -> None:
    loop = ManualLoop()
    queue = _queue(loop, 1.0)
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        queue.start(fired.append, "second")

    queue.start(first)
    loop.advance_to(1.0)
    assert fired == ["first"]
    assert loop.armed() == 1
    loop.advance_to(2.0)
    assert fired == ["first", "second"]


def test_a_cancelled_timeout_leaves_at_once_and_lets_go_of_its_callback() -> None:
    """A burst of connections, each cancelling its timeout, leaves nothing queued."""
    loop = ManualLoop()
    queue = _queue(loop, 5.0)
    timeouts = [queue.start(print, "never") for _ in range(1000)]
    for timeout in timeouts:
        timeout.cancel()
    assert not queue.pending
    assert all(timeout.callback is None and timeout.args == () for timeout in timeouts)
    loop.advance_to(5.0)
    assert queue.timer is None and loop.armed() == 0


def test_on_uvloop_a_failing_callback_does_not_stop_the_rest() -> None:
    async def scenario() -> tuple[list[int], list[str]]:
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        loop.set_exception_handler(lambda _, context: errors.append(str(context["exception"])))
        queue = TimeoutQueue(loop, 0.05)
        fired: list[int] = []

        def fail() -> None:
            raise RuntimeError("boom")

        queue.start(fail)
        queue.start(fired.append, 1)
        queue.start(fired.append, 2).cancel()
        await asyncio.sleep(0.01)
        queue.start(fired.append, 3)
        await asyncio.sleep(0.3)
        return fired, errors

    fired, errors = uvloop.run(scenario())
    assert fired == [1, 3]
    assert errors == ["boom"]
