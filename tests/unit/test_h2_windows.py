"""The receive windows offered to an upstream h2 connection (h2_windows), without I/O."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from egressproxy.h2_windows import SLOW_SECONDS, ConnectionWindows, GrowthBudget, StreamWindow

STREAMS, RESERVE, MOST, POOL = 4, 100, 1000, 1500


def connection(
    streams: int = STREAMS, most: int = MOST, pool: int = POOL, budget: GrowthBudget | None = None
) -> ConnectionWindows:
    """With a budget of its own, larger than its pool, unless given one."""
    return ConnectionWindows(streams, RESERVE, most, pool, budget or GrowthBudget(2 * pool))


def take_everything(window: StreamWindow) -> int:
    """The upstream sends the whole window, the client takes all of it: the increment."""
    size = window.window
    window.received(size, size, 0.0)
    window.forwarded(size, 0.0)
    return window.increment()


def test_a_stream_its_client_keeps_up_with_grows_to_the_most() -> None:
    """By most / reserve (10) times what went out at once: a whole reserve is enough."""
    windows = connection()
    stream = windows.open()
    stream.received(10, 10, 0.0)
    stream.forwarded(10, 0.0)
    assert (stream.limit, stream.increment()) == (RESERVE + 100, 110)
    assert [take_everything(stream) for _ in range(2)] == [MOST, MOST]
    assert (stream.limit, windows.free) == (MOST, POOL - (MOST - RESERVE))


def test_a_stream_whose_client_leaves_bytes_held_does_not_grow() -> None:
    windows = connection()
    stream = windows.open()
    stream.received(RESERVE, RESERVE, 0.0)
    stream.forwarded(RESERVE // 2, 0.0)
    assert (stream.increment(), stream.limit, windows.free) == (RESERVE // 2, RESERVE, POOL)
    stream.forwarded(RESERVE // 20, 0.0)
    assert stream.increment() == 0, "a twentieth of the window is not worth a WINDOW_UPDATE"
    stream.forwarded(RESERVE // 20, 0.0)
    assert stream.increment() == RESERVE // 10


def test_streams_grow_while_the_pool_has_room_and_give_it_back() -> None:
    windows = connection()
    first, second, third = windows.open(), windows.open(), windows.open()
    take_everything(first)
    take_everything(second)
    assert (first.limit, second.limit, windows.free) == (MOST, 700, 0), "the pool's 1500"
    assert take_everything(third) == RESERVE, "nothing left to grow from: the reserve"
    first.close()
    assert windows.free == MOST - RESERVE
    assert take_everything(third) == MOST


def test_an_ended_stream_gives_its_draw_back_as_the_client_takes_the_rest() -> None:
    windows = connection()
    stream = windows.open()
    for _ in range(4):
        take_everything(stream)
    stream.received(600, 600, 0.0)
    stream.end()
    assert (stream.limit, windows.free, stream.increment()) == (600, POOL - 500, 0)
    stream.forwarded(450, 0.0)
    assert (stream.limit, windows.free, windows.held) == (150, POOL - 50, 150)
    stream.close()
    assert (windows.free, windows.held) == (POOL, 0)


def test_the_connection_window_goes_back_in_steps_of_a_reserve() -> None:
    windows = connection()
    stream = windows.open()
    stream.received(RESERVE, RESERVE, 0.0)
    window = windows.size - RESERVE
    assert windows.due(window) == 0
    stream.forwarded(RESERVE - 1, 0.0)
    assert windows.due(window) == 0
    stream.forwarded(1, 0.0)
    assert windows.due(window) == RESERVE


def test_streams_grow_only_while_the_workers_budget_has_room() -> None:
    """Two connections, each with a pool of its own, one budget: what one drew, the other
    cannot, until it is given back."""
    budget = GrowthBudget(MOST)
    first, second = connection(budget=budget).open(), connection(budget=budget).open()
    take_everything(first)
    assert (first.limit, budget.free) == (MOST, RESERVE)
    assert take_everything(second) == 2 * RESERVE, "the reserve and what was left"
    first.close()
    assert budget.free == MOST - RESERVE
    assert take_everything(second) == MOST


def test_a_slow_client_gives_back_what_its_stream_drew_as_it_takes_its_bytes() -> None:
    """Once its client took nothing for SLOW_SECONDS, a stream is not sent for again past
    its reserve; it grows again when its client next keeps up."""
    windows = connection()
    stream = windows.open()
    for _ in range(2):
        take_everything(stream)
    stream.received(MOST, MOST, 1.0)
    stream.forwarded(300, 1.0 + SLOW_SECONDS)
    assert (stream.increment(), stream.limit, windows.free) == (0, 700, POOL - 600)
    stream.forwarded(300, 1.0 + SLOW_SECONDS)
    stream.forwarded(350, 1.0 + SLOW_SECONDS)
    assert (stream.increment(), stream.limit, windows.free) == (50, RESERVE, POOL)
    stream.received(50, 50, 1.5 + SLOW_SECONDS)
    stream.forwarded(100, 1.5 + SLOW_SECONDS)
    assert stream.limit == MOST, "it keeps up: it grows again"


def test_a_client_that_stopped_reading_for_a_while_does_not_grow_by_emptying_its_stream() -> None:
    windows = connection()
    stream = windows.open()
    stream.received(RESERVE, RESERVE, 0.0)
    stream.forwarded(RESERVE, SLOW_SECONDS)
    assert (stream.limit, stream.increment()) == (RESERVE, RESERVE)


def test_a_client_slow_since_its_first_untaken_bytes_does_not_grow_when_more_arrive() -> None:
    """Slowness counts from when the client first left bytes untaken, not from the latest
    DATA frame: counted from that, a client that read nothing for 1.5 s while the upstream
    kept sending looked quick, and its stream drew from the pool for a reader that lags."""
    windows = connection()
    stream = windows.open()
    stream.received(RESERVE // 2, RESERVE // 2, 0.0)
    stream.received(RESERVE // 2, RESERVE // 2, 0.9 * SLOW_SECONDS)
    stream.forwarded(RESERVE, 1.5 * SLOW_SECONDS)
    assert (stream.limit, windows.free) == (RESERVE, POOL)
    assert stream.increment() == RESERVE


def test_a_window_update_is_sent_once_exactly_a_sixteenth_is_due() -> None:
    """An update goes once a sixteenth of the window is due (4 KiB of 64 KiB, where Go's
    transport refreshes its windows), not a byte later: the upstream is sent for as soon
    as Go's own client would send for it."""
    windows = ConnectionWindows(STREAMS, 65536, 65536, 0, GrowthBudget(0))
    stream = windows.open()
    stream.received(4095, 4095, 0.0)
    stream.forwarded(4095, 0.1)
    assert stream.increment() == 0, "less than a sixteenth"
    stream.received(1, 1, 0.2)
    stream.forwarded(1, 0.3)
    assert stream.increment() == 4096


def test_an_ended_stream_is_sent_no_window_update() -> None:
    """The upstream sends nothing more on a stream it ended: an update there is a frame
    for nothing, and one h2 refuses once the stream is closed."""
    windows = connection()
    stream = windows.open()
    stream.received(RESERVE // 2, RESERVE // 2, 0.0)
    stream.end()
    stream.forwarded(RESERVE // 2, 0.1)
    assert (stream.increment(), stream.window) == (0, 0)


def all_or_some(most: int) -> st.SearchStrategy[int]:
    """Often all (what a window allows, what the client has), else any part of it."""
    return st.one_of(st.just(most), st.integers(0, most))


class UpstreamConnection(RuleBasedStateMachine):
    """An upstream sending on the streams as their windows and the connection's allow, a
    client taking some of it, at once or after a while, streams ending and closing; after
    each step the proxy's WINDOW_UPDATEs are sent, as after each read. Few streams, a
    small pool and `most`, so that a few steps open them all and exhaust it; the worker's
    budget smaller still, another connection having drawn the rest."""

    streams, most, pool, budget = 2, 3 * RESERVE, 2 * RESERVE + RESERVE // 2, 2 * RESERVE

    def __init__(self) -> None:
        super().__init__()
        self.growth_budget = GrowthBudget(self.budget)
        self.windows = connection(self.streams, self.most, self.pool, self.growth_budget)
        self.now = 0.0
        self.open: list[StreamWindow] = []
        self.connection_window = self.windows.size
        """What the upstream may still send on the connection, as it sees it."""
        self.after_close = 0
        """What the upstream may still send on closed streams: h2 takes it at once."""

    def flush(self) -> None:
        self.connection_window += self.windows.due(self.connection_window)

    @precondition(lambda self: len(self.open) < self.streams)
    @rule()
    def open_stream(self) -> None:
        self.open.append(self.windows.open())

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def upstream_sends(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.open))
        most = min(stream.window, self.connection_window)
        size = data.draw(all_or_some(most))
        kept = data.draw(all_or_some(size))
        stream.received(size, kept, self.now)
        self.connection_window -= size
        self.reopen(stream)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def client_keeps_up(self, data: st.DataObject) -> None:
        """The upstream sends all it may, the client takes all of it: the window grows."""
        stream = data.draw(st.sampled_from(self.open))
        size = min(stream.window, self.connection_window)
        stream.received(size, size, self.now)
        self.connection_window -= size
        stream.forwarded(stream.held, self.now)
        self.reopen(stream)

    @precondition(lambda self: self.after_close)
    @rule(data=st.data())
    def upstream_sends_on_a_closed_stream(self, data: st.DataObject) -> None:
        size = data.draw(st.integers(1, min(self.after_close, self.connection_window)))
        self.after_close -= size
        self.connection_window -= size
        self.flush()

    @precondition(lambda self: any(stream.held for stream in self.open))
    @rule(data=st.data())
    def client_takes(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from([stream for stream in self.open if stream.held]))
        stream.forwarded(data.draw(all_or_some(stream.held)), self.now)
        self.reopen(stream)

    def reopen(self, stream: StreamWindow) -> None:
        """As H2Proxy does after each DATA frame and what the client took of it."""
        stream.increment()
        self.flush()

    @rule(seconds=st.sampled_from([SLOW_SECONDS / 2, SLOW_SECONDS]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def upstream_ends(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.open)).end()
        self.flush()

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def stream_closes(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.open))
        self.open.remove(stream)
        self.after_close += stream.window
        stream.close()
        self.flush()

    @invariant()
    def the_connection_window_never_stops_a_stream(self) -> None:
        assert self.connection_window >= sum(stream.window for stream in self.open)
        assert self.connection_window <= self.windows.size

    @invariant()
    def each_stream_keeps_within_its_limit(self) -> None:
        for stream in self.open:
            assert stream.window >= 0 and stream.held >= 0
            assert stream.window + stream.held <= stream.limit
            assert RESERVE <= stream.limit <= max(self.most, stream.held)

    @invariant()
    def what_is_drawn_is_what_the_open_streams_have(self) -> None:
        drawn = sum(stream.limit - RESERVE for stream in self.open)
        assert 0 <= self.windows.free == self.pool - drawn
        assert 0 <= self.growth_budget.free == self.budget - drawn
        assert self.windows.held == sum(stream.held for stream in self.open)

    @invariant()
    def a_stream_is_due_less_than_a_sixteenth_of_its_limit(self) -> None:
        """So one whose client took what it held can be sent on."""
        for stream in self.open:
            if not stream.ended:
                assert (stream.limit - stream.window - stream.held) * 16 < stream.limit


TestUpstreamConnection = UpstreamConnection.TestCase
