"""Timers shared by the connections of a worker.

A loop timer of its own costs a connection about 5 µs (uvloop makes, arms, stops and
frees a libuv timer), and a new connection used to start three (sniff, connect, request
head) only to cancel them milliseconds later: a sixteenth of all it cost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

CLOCK_RESOLUTION = 0.001
"""uvloop's time counts milliseconds: a timer may fire up to one before its time is due."""


class PendingTimeout:
    """One timeout of a TimeoutQueue; cancel() lets go of its callback at once."""

    __slots__ = ("args", "callback", "when")

    def __init__(self, when: float, callback: Callable[..., None], args: tuple[object, ...]):
        self.when = when
        self.callback: Callable[..., None] | None = callback
        self.args = args

    def cancel(self) -> None:
        self.callback = None
        self.args = ()


class TimeoutQueue:
    """Timeouts of one fixed length, on one loop timer.

    Started in time order and all equally long, they expire in the order they were
    started, so the loop need only know the oldest one still pending. A cancelled one
    stays queued, small and without its callback, until its time would have come.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.pending: deque[PendingTimeout] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.expiring = False

    def start(self, callback: Callable[..., None], *args: object) -> PendingTimeout:
        """Call callback(*args) `delay` seconds from now unless cancelled first."""
        timeout = PendingTimeout(self.loop.time() + self.delay, callback, args)
        self.pending.append(timeout)
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
                oldest = pending[0]
                callback = oldest.callback
                if callback is not None and oldest.when > due:
                    break
                pending.popleft()
                if callback is not None:
                    args = oldest.args
                    oldest.cancel()
                    callback(*args)
        finally:
            self.expiring = False
            if pending:
                self.timer = self.loop.call_at(pending[0].when, self._expire)


class Ticking(Protocol):
    """What an IdleSweep asks, every quarter of the idle timeout."""

    def tick(self) -> None: ...


class IdleSweep:
    """The idle timeout of every relay and HTTP/1 connection of a worker, on one timer.

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
