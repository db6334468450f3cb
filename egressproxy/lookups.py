"""The system resolver's getaddrinfo, in daemon threads of the worker's own.

Every name the worker resolves goes through here: a verified hostname and a route's
backend alike, so one stuck name holds one of these threads whoever asked. Not a
ThreadPoolExecutor, nor loop.getaddrinfo: the interpreter joins the executor's threads at
exit, and libuv (under uvloop, loop.getaddrinfo takes one of its four threads) joins its
own, so a lookup stuck in the resolver (30 s and more) would hold the worker's exit long
after its drain. Daemon threads are left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
import threading
from collections.abc import Callable

from egressproxy.threads import deliver

LOOKUP_THREADS = 8
"""Lookups at once. A name that never answers holds one of these threads until the system
resolver gives up; the worker's other names go on in the rest."""
QUEUED_LOOKUPS = 1024
"""Lookups waiting for a thread; more: refused at once as the resolver not answering."""

_Lookup = Callable[[], list[str]]
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[list[str]]", _Lookup]


def stream_addresses(host: str, port: int | None) -> list[str]:
    """The stream addresses getaddrinfo gives host, in its order."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)]


class LookupThreads:
    """getaddrinfo for the event loop's tasks, through a bounded queue."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Job | None] = queue.Queue(QUEUED_LOOKUPS)
        self._threads: list[threading.Thread] = []
        self._unclaimed: set[asyncio.Future[list[str]]] = set()
        """The answers of the queued lookups no thread has taken yet. A thread takes one,
        and withdraw takes one back, by removing it here: whichever removes it first has
        it (set.remove is atomic), so a lookup withdrawn is never made."""

    async def addresses(self, host: str, port: int | None) -> list[str]:
        """The stream addresses getaddrinfo gives host, in its order; socket.gaierror as it
        raises it, and EAI_AGAIN when too many lookups are waiting already."""
        return await self.run(functools.partial(stream_addresses, host, port))

    async def run(self, lookup: _Lookup) -> list[str]:
        """lookup's answer, or what it raised, from one of the threads; socket.gaierror
        EAI_AGAIN when too many lookups are waiting already. A waiter cancelled while its
        lookup is still queued withdraws it."""
        answer = self.submit(lookup)
        try:
            return await answer
        finally:
            self.withdraw(answer)

    def submit(self, lookup: _Lookup) -> asyncio.Future[list[str]]:
        """Queue lookup: the future of its answer, or of what it raised; socket.gaierror
        EAI_AGAIN when too many lookups are waiting already."""
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[str]] = loop.create_future()
        self._unclaimed.add(answer)
        try:
            self._queue.put_nowait((loop, answer, lookup))
        except queue.Full:
            self._unclaimed.discard(answer)
            raise socket.gaierror(socket.EAI_AGAIN, "too many lookups waiting") from None
        return answer

    def withdraw(self, answer: asyncio.Future[list[str]]) -> bool:
        """Take back a lookup no thread has begun (its answer cancelled): True, and it is
        never made; False when a thread has it already (or it is over)."""
        try:
            self._unclaimed.remove(answer)
        except KeyError:
            return False
        answer.cancel()
        return True

    def close(self) -> None:
        """The worker stops: queued lookups are dropped, their waiters told (EAI_AGAIN: a
        shared lookup waiting for ever would hold its name's later questions), and the
        threads end once free (one still inside getaddrinfo is not waited for)."""
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    loop, answer, _ = job
                    self._unclaimed.discard(answer)
                    deliver(loop, answer, socket.gaierror(socket.EAI_AGAIN, "lookups closed"))
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        self._threads = []

    def _start(self) -> None:
        """Started at the first lookup: in the worker (after the fork), and only if needed."""
        for number in range(LOOKUP_THREADS):
            thread = threading.Thread(target=self._work, name=f"lookup-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            loop, answer, lookup = job
            try:
                self._unclaimed.remove(answer)
            except KeyError:  # withdrawn: its waiters gave up while it was queued
                continue
            try:
                found = lookup()
            except Exception as error:  # handed to the waiter, as it came
                deliver(loop, answer, error)
            else:
                deliver(loop, answer, found)
