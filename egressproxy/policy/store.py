"""The policy in force: one immutable Snapshot, replaced whole on a successful reload.

A connection reads `store.current` once and keeps that snapshot, so a reload
never changes a decision half-way. Changes are found by hashing the file's
content as the path resolves now, which sees an in-place write, an atomic
rename and a Kubernetes ConfigMap's `..data` symlink swap alike.

With --workers, only the supervisor reads the file: it sends each policy it
reloads (the bytes and their generation) down a pipe to every worker, which
compiles them and runs them under that generation. So all processes run one
policy, read at one moment, and a change or a bad file is reported once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import decode_policy, load_policy_text, read_policy
from egressproxy.settings import Settings
from egressproxy.threads import in_daemon_thread

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.1
SETTLE_READS = 5
"""A changed file is put in force once two reads SETTLE_SECONDS apart agree, within this
many reads (else it is looked at again at the next poll)."""
FEED_HEADER = struct.Struct("!QQ")
"""A policy sent to a worker: its generation and length, then its bytes."""


class StillChanging(enum.Enum):
    STILL_CHANGING = "still changing"


STILL_CHANGING = StillChanging.STILL_CHANGING
"""A reload found the file still being written: nothing was tried."""


@dataclass(frozen=True)
class Snapshot:
    index: PolicyIndex
    generation: int
    """1 for the first policy loaded, +1 for each successful reload."""
    loaded_at: datetime
    file: str


class PolicyStore:
    def __init__(self, settings: Settings, on_reload: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.file = str(settings.policy_file)
        self.on_reload = on_reload
        self.on_adopted: Callable[[int], None] | None = None
        """A worker's: told each generation it puts in force (adopt)."""
        self.current: Snapshot
        """The policy in force: from load_initial() on (read before it, AttributeError);
        a plain attribute, since every HTTP request reads it."""
        self._last_digest: bytes | None = None
        """Digest of the last content tried, good or bad: the same content again is no
        change, so a bad file is reported once; a file back as it was after a failed read
        (a bad edit reverted, a file gone for a moment) is one, and reloads: its success
        counted is how a dashboard sees the failure is over."""
        self._forced = False
        """A forced reload is asked for and not yet begun."""
        self._owed = False
        """A forced reload found the file still changing: the next poll's is forced."""
        self._wake: asyncio.Event | None = None
        """Set by request_reload() to wake watch() before its next poll."""
        self.feeds: list[asyncio.WriteTransport] = []
        """The workers' pipes (a supervisor's): each reloaded policy goes down every one."""

    def load_initial(self) -> None:
        """Load the first policy; PolicyError when the file is unusable (the proxy cannot start)."""
        data = read_policy(self.file)
        self._last_digest = hashlib.sha256(data).digest()
        self._install(self._compile(data), generation=1)

    def request_reload(self) -> None:
        """A forced reload (SIGHUP), made by watch(); requests while one runs fold into one
        more after it, never a pile-up."""
        self._forced = True
        if self._wake is not None:
            self._wake.set()

    async def watch(self, interval: float = 1.0) -> None:
        """Reload on each request_reload() and each change of the file's content (polled every
        interval), forever; being the only caller of reload(), one reload at a time."""
        self._wake = asyncio.Event()
        while True:
            if not self._forced:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            force, self._forced, self._owed = self._forced or self._owed, False, False
            try:
                await self.reload(force)
            except Exception:  # memory, a bug: the running policy stays, watching goes on
                log.exception("%s: reload failed", self.file)
                if self.on_reload is not None:
                    self.on_reload(False)

    async def reload(self, force: bool = False) -> bool:
        """Re-read the file; True when a new snapshot is in force.

        Reading, parsing and compiling run in a daemon thread (threads.py): a large policy
        takes seconds, which on the loop would stall every connection, and a read stuck in
        the kernel must not hold the exit. The swap, the generation, on_reload and the log
        line stay on the loop. Unchanged content is a no-op unless
        forced (SIGHUP). An unusable file keeps the running policy, is logged as
        FILE:LINE: reason, and reported to on_reload(False).
        """
        last_digest = self._last_digest
        attempt = await in_daemon_thread(
            lambda: self._attempt(force, last_digest), name="policy reload"
        )
        if attempt is None:
            return False
        if isinstance(attempt, StillChanging):  # looked at again, as forced
            self._owed = self._owed or force
            return False
        self._last_digest, outcome = attempt
        if isinstance(outcome, PolicyError):
            for problem in outcome.problems:
                log.error("%s", problem)
            if self.on_reload is not None:
                self.on_reload(False)
            return False
        index, data = outcome
        generation = self.current.generation + 1
        self._install(index, generation)
        log.info("%s: policy reloaded, generation %d", self.file, generation)
        for feed in self.feeds:
            if not feed.is_closing():
                feed.write(FEED_HEADER.pack(generation, len(data)) + data)
        if self.on_reload is not None:
            self.on_reload(True)
        return True

    async def follow(self, feed: int) -> None:
        """A worker's reloads: each policy its supervisor sends down the pipe `feed`, in
        force under the supervisor's generation, until the supervisor closes it."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(feed, "rb", buffering=0)
        )
        try:
            while True:
                try:
                    generation, length = FEED_HEADER.unpack(
                        await reader.readexactly(FEED_HEADER.size)
                    )
                    data = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    return
                await self.adopt(data, generation)
        finally:
            transport.close()

    async def adopt(self, data: bytes, generation: int) -> None:
        """Put in force a policy the supervisor read and compiled. Compiled here with the
        same settings it cannot fail but for want of memory: that keeps the running policy,
        logged, and the next one sent is still adopted."""
        try:
            index = await in_daemon_thread(lambda: self._compile_quietly(data), name="policy adopt")
        except Exception:
            log.exception("%s: policy generation %d not adopted", self.file, generation)
            return
        self._install(index, generation)
        log.debug("%s: policy generation %d adopted", self.file, generation)
        if self.on_adopted is not None:
            self.on_adopted(generation)

    def _attempt(
        self, force: bool, last_digest: bytes | None
    ) -> tuple[bytes, tuple[PolicyIndex, bytes] | PolicyError] | StillChanging | None:
        """The file's digest and its compiled index (with the bytes it came from) or its
        problems, off the loop; None when the content is the last one tried and the
        reload is not forced; STILL_CHANGING when the file is being written (_settled)."""
        try:
            data = read_policy(self.file)
        except PolicyError as unreadable:
            digest = str(unreadable).encode()
            return None if not force and digest == last_digest else (digest, unreadable)
        if not force and hashlib.sha256(data).digest() == last_digest:
            return None
        settled = self._settled(data)
        if settled is None:
            return STILL_CHANGING
        data = settled
        digest = hashlib.sha256(data).digest()
        if not force and digest == last_digest:
            return None
        try:
            return digest, (self._compile(data), data)
        except PolicyError as error:
            return digest, error

    def _settled(self, data: bytes) -> bytes | None:
        """The file's content once two reads SETTLE_SECONDS apart agree, starting from data;
        None if it is still changing after SETTLE_READS reads. A file written in place is
        read mid-write now and then: its first part is often a valid policy with fewer
        rules (a prefix without the routes that deny), or empty, and put in force it
        would pass traffic until the next poll."""
        previous: bytes | None = data
        for _ in range(SETTLE_READS):
            time.sleep(SETTLE_SECONDS)
            try:
                again = read_policy(self.file)
            except PolicyError:  # gone (between a delete and a write): agrees with nothing
                previous = None
                continue
            if again == previous:
                return again
            previous = again
        return None

    def _compile_quietly(self, data: bytes) -> PolicyIndex:
        """_compile without the loader's warnings and notes: the supervisor logged them
        when it loaded these very bytes. (The policy modules log nothing but while
        loading, and this is a worker's only load.)"""
        policy_log = logging.getLogger("egressproxy.policy")
        level = policy_log.level
        policy_log.setLevel(logging.ERROR)
        try:
            return self._compile(data)
        finally:
            policy_log.setLevel(level)

    def _compile(self, data: bytes) -> PolicyIndex:
        text = decode_policy(data, self.file)
        return compile_policy(load_policy_text(text, self.file), self.settings)

    def _install(self, index: PolicyIndex, generation: int) -> None:
        replacing = hasattr(self, "current")
        self.current = Snapshot(index, generation, datetime.now(UTC), self.file)
        if replacing and gc.get_freeze_count():
            refreeze()


def refreeze() -> None:
    """Keep a reloaded policy out of the full collections, as the first one is.

    A serving process freezes what it made at start-up (server.py), the policy index
    with it, so that the full collections every few thousand connections bring do not
    walk it: a policy of 100,000 hostnames is some 800,000 objects, 260 ms for each
    full collection, the loop stalled. A reloaded index would be walked by every one of
    them. What is frozen is let go and collected once first, so that cyclic garbage
    frozen with it (say, of connections that were closing then) is freed, not kept for
    good: one full collection per reload.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
