"""The policy in force: one immutable Snapshot, replaced whole on a successful reload.

A connection reads `store.current` once and keeps that snapshot, so a reload
never changes a decision half-way. Changes are found by hashing the file's
content as the path resolves now, which sees an in-place write, an atomic
rename and a Kubernetes ConfigMap's `..data` symlink swap alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import decode_policy, load_policy_text, read_policy
from egressproxy.settings import Settings

log = logging.getLogger(__name__)


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
        self._current: Snapshot | None = None
        self._last_digest: bytes | None = None
        """Digest of the last content tried, good or bad: the same bad file is reported once."""

    @property
    def current(self) -> Snapshot:
        if self._current is None:
            raise RuntimeError("PolicyStore.current read before load_initial()")
        return self._current

    def load_initial(self) -> None:
        """Load the first policy; PolicyError when the file is unusable (the proxy cannot start)."""
        data = read_policy(self.file)
        self._last_digest = hashlib.sha256(data).digest()
        self._install(self._compile(data), generation=1)

    def reload(self, force: bool = False) -> bool:
        """Re-read the file; True when a new snapshot is in force.

        Unchanged content is a no-op unless forced (SIGHUP). An unusable file
        keeps the running policy, is logged as FILE:LINE: reason, and reported
        to on_reload(False).
        """
        try:
            data: bytes | None = read_policy(self.file)
        except PolicyError as error:
            data, unreadable = None, error
        digest = hashlib.sha256(data).digest() if data is not None else str(unreadable).encode()
        if not force and digest == self._last_digest:
            return False
        self._last_digest = digest
        try:
            if data is None:
                raise unreadable
            index = self._compile(data)
        except PolicyError as error:
            for problem in error.problems:
                log.error("%s", problem)
            if self.on_reload is not None:
                self.on_reload(False)
            return False
        previous = self._current.generation if self._current else 0
        self._install(index, generation=previous + 1)
        log.info("%s: policy reloaded, generation %d", self.file, previous + 1)
        if self.on_reload is not None:
            self.on_reload(True)
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the file's content forever; each change is one reload."""
        while True:
            await asyncio.sleep(interval)
            self.reload(force=False)

    def _compile(self, data: bytes) -> PolicyIndex:
        text = decode_policy(data, self.file)
        return compile_policy(load_policy_text(text, self.file), self.settings)

    def _install(self, index: PolicyIndex, generation: int) -> None:
        self._current = Snapshot(index, generation, datetime.now(UTC), self.file)
