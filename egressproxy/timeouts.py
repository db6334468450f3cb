"""Timers shared by the connections of a worker.

A loop timer of its own costs a connection about 5 µs (uvloop makes, arms, stops and
frees a libuv timer), and a new connection used to start three (sniff, connect, request
head) only to cancel them milliseconds later: a sixteenth of all it cost.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

CLOCK_RESOLUTION = 0.001
"""uvloop's time counts milliseconds: a timer may fire up to one before its time is due."""


class PendingTimeout:
    """One timeout of a TimeoutQueue; cancel() takes it out at once."""

    __slots__ = ("args", "callback", "queue", "when")

    def __init__(
        self,
        queue: TimeoutQueue,
        when: float,
        callback: Callable[..., None],
        args: tuple[object, ...],
    ) -> None:
        self.queue = queue
        self.when = when
        self.callback: Callable[..., None] | None = callback
        self.args = args

    def cancel(self) -> None:
        self.queue.pending.pop(self, None)
        self.callback = None
        self.args = ()


class TimeoutQueue:
    """Timeouts of one fixed length, on one loop timer.

    Started in time order and all equally long, they expire in the order they were
    started, so the loop need only know the oldest one still pending. An ordered dict
    keeps them: the oldest is first, and a cancelled one leaves at once, so a burst of
    connections leaves nothing behind (a queue of cancelled ones would hold a connect
    timeout's worth of them).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.pending: OrderedDict[PendingTimeout, None] = OrderedDict()
        self.timer: asyncio.TimerHandle | None = None
        self.expiring = False

    def start(self, callback: Callable[..., None], *args: object) -> PendingTimeout:
        """Call callback(*args) `delay` seconds from now unless cancelled first."""
        timeout = PendingTimeout(self, self.loop.time() + self.delay, callback, args)
        self.pending[timeout] = None
        if self.timer is None and not self.expiring:
            self.timer = self.loop.call_at(timeout.when, self._expire)
        return timeout

    def _expire(self) -> None:
        self.timer = None
        self.expiring = True
        pending = self.pending
        due = self.loop.time() + CLOCK_RESOLUTION
        try:
            while pending:
                oldest = next(iter(pending))
                if oldest.when > due:
                    break
                callback, args = oldest.callback, oldest.args
                oldest.cancel()
                if callback is not None:
                    callback(*args)
        finally:
            self.expiring = False
            if pending:
                self.timer = self.loop.call_at(next(iter(pending)).when, self._expire)


class Ticking(Protocol):
    """What an IdleSweep asks, every quarter of the idle timeout."""

    def tick(self) -> None: ...


class IdleCounting:
    """A relay in an IdleSweep: it counts the sweeps in which it moved no byte."""

    __slots__ = ("_idle_seen", "_idle_ticks")

    def __init__(self) -> None:
        self._idle_seen = -1
        self._idle_ticks = 0

    def idle_for_the_timeout(self, moved: int) -> bool:
        """Whether `moved` (a count that grows with every byte moved) stayed the same for
        four sweeps, a whole timeout."""
        if moved != self._idle_seen:
            self._idle_seen = moved
            self._idle_ticks = 0
            return False
        self._idle_ticks += 1
        return self._idle_ticks >= 4


class IdleSweep:
    """The idle timeout of every relay and HTTP connection of a worker, on one timer.

    Each quarter of the timeout, every member is asked whether it moved a byte (tick);
    one that moved none for a whole timeout closes, at most a quarter late. A timer per
    connection would cost each idle one a timer handle (a few hundred bytes) and a
    re-arm every quarter.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float) -> None:
        self.loop = loop
        self.interval = idle_timeout / 4
        self.members: set[Ticking] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, member: Ticking) -> None:
        self.members.add(member)
        if self.timer is None:
            self.timer = self.loop.call_later(self.interval, self._sweep)

    def discard(self, member: Ticking) -> None:
        self.members.discard(member)

    def _sweep(self) -> None:
        self.timer = None
        for member in list(self.members):
            member.tick()
        if self.members:
            self.timer = self.loop.call_later(self.interval, self._sweep)
