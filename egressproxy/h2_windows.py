"""The receive windows the proxy offers upstream h2 connections, sans I/O.

What an upstream sends on a stream is held by the proxy until the client takes it, and
only then given back (acknowledged). Were its streams' windows together larger than the
connection's window, streams whose client reads nothing would fill the connection
window with what they hold, and every other stream on it would stall (forty unread gRPC
streams of 1 MiB windows in a 16 MiB connection window: the next call hung). Here they
never are:

- each stream starts with a reserve (the SETTINGS_INITIAL_WINDOW_SIZE offered), which is
  all a stream whose client reads nothing from the start ever holds;
- the connection window is the reserves of the most streams one client connection can
  open, a growth pool, and one reserve more for batching its own WINDOW_UPDATEs;
- a stream whose client takes its data as fast as it comes (nothing left held) grows its
  window, up to `most`, while its connection's pool and the worker's GrowthBudget both
  have room: a lone download keeps a large window for a long round trip. What it drew
  goes back as its response ends and the client takes the rest, or when the stream is
  closed; and, once its client left bytes untaken for SLOW_SECONDS, as that client
  takes them (they are not sent for again past the reserve) until it keeps up again.

So what the streams hold and may still be sent never exceeds what the connection window
lets the upstream send: the connection window is never what stops a stream. And what a
worker holds for clients that stopped reading is at most a reserve per stream and the
worker's budget, however many connections, upstreams and streams there are.
"""

from __future__ import annotations

SLOW_SECONDS = 1.0
"""A stream whose client took none of what it holds for this long is slow: what it drew
to grow goes back as its client takes its bytes. A client that keeps reading, however
small its own window, opens it many times a second."""


class GrowthBudget:
    """What the upstream streams of one worker may draw together to grow their windows
    past their reserves: each connection's pool bounds what one connection may draw,
    this what all of them may, so many clients that stop reading (or one with many
    upstreams) cannot make the worker hold more."""

    __slots__ = ("free",)

    def __init__(self, size: int) -> None:
        self.free = size


class ConnectionWindows:
    """One upstream connection's window and the pool its streams grow from."""

    __slots__ = ("budget", "free", "held", "most", "reserve", "size")

    def __init__(
        self, streams: int, reserve: int, most: int, pool: int, budget: GrowthBudget
    ) -> None:
        self.reserve = reserve
        self.most = most
        self.size = (streams + 1) * reserve + pool
        """The connection window offered: see the module's docstring."""
        self.free = pool
        """What no stream has drawn of the growth pool."""
        self.held = 0
        """Bytes the streams received and hold for their clients (not given back)."""
        self.budget = budget

    def open(self) -> StreamWindow:
        """A new stream's window: the reserve (SETTINGS_INITIAL_WINDOW_SIZE)."""
        return StreamWindow(self)

    def due(self, window: int) -> int:
        """The connection WINDOW_UPDATE to send, its window being `window` now; 0: none
        yet. All that is not held goes back, once a reserve's worth is due."""
        due = self.size - self.held - window
        return due if due >= self.reserve else 0


class StreamWindow:
    """One upstream stream's receive window: `window` + `held` never exceed `limit`."""

    __slots__ = (
        "closed",
        "connection",
        "ended",
        "held",
        "limit",
        "shrinking",
        "untaken_since",
        "window",
    )

    def __init__(self, connection: ConnectionWindows) -> None:
        self.connection = connection
        self.window = connection.reserve
        """What the upstream may still send on the stream."""
        self.held = 0
        """What it sent that the client has yet to take."""
        self.limit = connection.reserve
        """The reserve and what the stream drew from the pool."""
        self.ended = False
        """The upstream sends no more on it."""
        self.closed = False
        self.untaken_since = 0.0
        """When the client last took bytes of it, or its held bytes began."""
        self.shrinking = False
        """Its client was slow: until it holds nothing, what it takes is not sent for
        again past the reserve."""

    def received(self, size: int, kept: int, now: float) -> None:
        """A DATA frame of `size` flow-controlled bytes, `kept` of them held for the client
        (the rest is padding, given back at once), at time `now`."""
        if not self.held:
            self.untaken_since = now
        self.window -= size
        self._hold(kept)

    def forwarded(self, size: int, now: float) -> None:
        """`size` held bytes went to the client at time `now`. Left with none, the client
        keeps up: the window grows, up to `most`, from what the pool and the budget have,
        by `most / reserve` times what went out, so one whole reserve passed on at once is
        enough (a slower start costs a long download round trips; doubling: four). A
        client that took nothing for SLOW_SECONDS before is slow: what it drew goes back
        as it takes its bytes, and it grows again once it keeps up."""
        slow = now - self.untaken_since >= SLOW_SECONDS
        self.untaken_since = now
        self._hold(-size)
        self.shrinking = self.shrinking or slow
        if self.ended or self.shrinking:
            self._shrink()
        if self.held:
            return
        self.shrinking = False
        if not self.ended and not slow:
            connection = self.connection
            grown = size * connection.most // connection.reserve
            budget = connection.budget
            growth = min(grown, connection.most - self.limit, connection.free, budget.free)
            self.limit += growth
            connection.free -= growth
            budget.free -= growth

    def end(self) -> None:
        """The upstream sent the end of the stream (or reset it after): its window is
        spent, and what it drew goes back to the pool as the client takes the rest."""
        self.ended = True
        self.window = 0
        self._shrink()

    def close(self) -> None:
        """The stream is done: what it held is given back, and what it drew."""
        if self.closed:
            return
        self.end()
        self._hold(-self.held)
        self._shrink()
        self.closed = True

    def increment(self) -> int:
        """The stream WINDOW_UPDATE to send now, 0 for none: the window back to its limit,
        once a sixteenth of it is due (4 KiB of 64 KiB; Go's transport refreshes at 4 KiB).
        At h2's half, a download whose bursts were half its window got one update per
        burst, and half its window per round trip."""
        if self.ended:
            return 0
        due = self.limit - self.window - self.held
        if due * 16 < self.limit:
            return 0
        self.window += due
        return due

    def _hold(self, size: int) -> None:
        self.held += size
        self.connection.held += size

    def _shrink(self) -> None:
        """Down to what it holds and what the upstream may still send on it (a window
        given cannot be taken back), not below the reserve: what it drew past that goes
        back to its connection's pool and the worker's budget."""
        connection = self.connection
        limit = max(connection.reserve, self.held + self.window)
        connection.free += self.limit - limit
        connection.budget.free += self.limit - limit
        self.limit = limit
