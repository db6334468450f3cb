"""Blocking calls that may never return, in daemon threads the worker's exit leaves behind.

Not a ThreadPoolExecutor (loop.run_in_executor): the interpreter joins the executor's
threads at exit, and asyncio's runner waits for the default executor when the loop
closes, so one call stuck in the kernel (a policy file that is a FIFO nobody writes, a
hung network mount, a resolver that does not answer) would hold a SIGTERM's exit for
as long as it is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(call: Callable[[], T], name: str) -> T:
    """call() in a daemon thread of its own; its result or exception, on this loop."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            outcome: T | Exception = call()
        except Exception as error:  # handed to the waiter, as it came
            outcome = error
        deliver(loop, answer, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await answer


def deliver(
    loop: asyncio.AbstractEventLoop, answer: asyncio.Future[T], outcome: T | Exception
) -> None:
    """Hand a thread's outcome to the waiter, on its loop (unless it gave up meanwhile)."""

    def settle() -> None:
        if answer.done():
            return
        if isinstance(outcome, Exception):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(settle)
