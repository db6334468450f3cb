"""Sniffing a first flight that comes in many reads (detect.Sniffer, as the flow does it):
the answer is the one sniff gives the bytes so far, at every read, and the work a read
costs is bounded by what came in it, not by all that came before."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from egressproxy.flow import _classify
from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    HttpRequestHead,
    NeedMore,
    NotThis,
    Sniffed,
    tls,
)
from egressproxy.sniff.detect import Sniffer, sniff
from egressproxy.sniff.http import (
    EMPTY_LINES_ALLOWED,
    H2_PREFACE,
    loose_request_line,
    parse_request_head,
)
from tests.unit.test_sniff_detect import (
    IRREGULAR_REQUEST_LINES,
    P_HEADS,
    bytes_sniffed_one_byte_a_read,
)
from tests.unit.test_sniff_tls import client_hello, extension, frame, sni_extension

TESTS = Path(__file__).resolve().parent.parent
FLIGHTS = sorted((TESTS / "corpus").glob("*.bin")) + sorted((TESTS / "captures").glob("*.bin"))


def reads(data: bytes, sizes: Sequence[int]) -> Iterator[int]:
    """Where each read ends: data cut after each of sizes in turn, the rest in one read."""
    end = 0
    for size in sizes:
        if end + size >= len(data):
            break
        end += size
        yield end
    yield len(data)


def assert_sniffed_as_one_read(data: bytes, sizes: Sequence[int]) -> Sniffed | NeedMore:
    """Read by read, as the flow sniffs: each answer is the one-shot sniff of the buffer."""
    sniffer: Sniffer | None = None
    answer: Sniffed | NeedMore = NEED_MORE
    for end in reads(data, sizes):
        buffer = data[:end]
        if sniffer is None:
            answer = sniff(buffer)
            if answer is NEED_MORE:
                sniffer = Sniffer(buffer)
        else:
            answer = sniffer.sniff(buffer)
        whole = sniff(buffer)
        assert answer == whole, (end, answer, whole)
        if answer is not NEED_MORE:
            assert not isinstance(whole, NeedMore)
            assert _classify(answer, buffer) == _classify(whole, buffer)
            break
    return answer


READ_SIZES = st.lists(st.integers(1, 8) | st.integers(9, 3000), max_size=40)
GRAMMAR_PIECES = st.sampled_from(
    [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"/", b"G", b"ET", b"P", b"get", b"a",
     b"HTTP/1.1", b"HTTP/", b"1", b".", b":", b"Host: a.test", b"\x00", b"\x01", b"\x0b",
     b"\x1c", b"\x7f", b"\xa0", b"\xc3\xa9", b"\x16\x03\x01", b"PRI * HTTP/2.0"]
)  # fmt: skip
"""Pieces the request grammars tell apart: lines and heads made of them go through every
state the sniffer holds in, with runs long enough to reach the buffer limit."""


@st.composite
def grammar_pieces(draw: st.DrawFn) -> list[bytes]:
    """Pieces of request grammar, each repeated a few times or many (up to past the limit)."""
    pieces = []
    for piece in draw(st.lists(GRAMMAR_PIECES, min_size=1, max_size=12)):
        count = draw(st.integers(1, 3) | st.integers(1, SNIFF_BUFFER_LIMIT // len(piece) + 2))
        pieces.append(piece * count)
    return pieces


@st.composite
def damaged_flights(draw: st.DrawFn) -> bytes:
    """A corpus file, capture or head, maybe with a byte changed, cut short or extended."""
    base = draw(
        st.sampled_from([path.read_bytes() for path in FLIGHTS] + [*P_HEADS, *(
            b"\r\n" * count + line + b"\r\nHost: a.test\r\n\r\n"
            for count in (0, 1, EMPTY_LINES_ALLOWED) for line in IRREGULAR_REQUEST_LINES
        )])
    )  # fmt: skip
    data = bytearray(base[: SNIFF_BUFFER_LIMIT + 64])
    if data and draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data) or 1))]) + draw(st.binary(max_size=32))


@st.composite
def split_hellos(draw: st.DrawFn) -> bytes:
    """A hello in fragments of drawn sizes, empty records among them, maybe cut short."""
    name = draw(st.sampled_from([b"example.com", b"a.test", b"x" * 300]))
    padding = draw(st.sampled_from([0, 100, 5000, 17000]))
    message = client_hello([sni_extension(name), extension(21, bytes(padding))])
    sizes = draw(st.lists(st.integers(0, 40) | st.integers(41, 4000), max_size=300))
    records = frame(message, [size for size in sizes if size])
    return records[: draw(st.integers(1, len(records)))] + draw(st.binary(max_size=16))


@given(
    st.binary(min_size=1, max_size=200)
    | grammar_pieces().map(b"".join)
    | damaged_flights()
    | split_hellos(),
    READ_SIZES,
)
@example(b"GET /" + b"a" * SNIFF_BUFFER_LIMIT, [1] * 40)
@example(b"\r\n" * 3 + b"GET /" + b"a" * SNIFF_BUFFER_LIMIT, [1] * 30 + [SNIFF_BUFFER_LIMIT - 30])
@example(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", [1] * 30)
@example(b"\r\n" * EMPTY_LINES_ALLOWED + b"\r\n", [2 * EMPTY_LINES_ALLOWED, 1])
@example(b"\r\n\x00", [2, 1])
@example(b"GET / HTTP/1.1\r\n\r\n", [15, 2, 1])
@example(b"GET / HTTP/1.0\n\n", [14, 1, 1])
@example(H2_PREFACE, [1] * 30)
@example(b"a" * 64 + b" /", [10, 54, 1, 1])
@example(b"a" * 65 + b" /", [10, 54, 1, 1])
@example(b"  \x01", [2, 1])
@example(b"x \x01", [2, 1])
@example(b"x /\x01\x00", [3, 1, 1])
def test_a_flight_in_any_reads_is_answered_as_in_one(data: bytes, sizes: list[int]) -> None:
    """At every read the answer is sniff's for the bytes so far: NEED_MORE up to the same
    read, then the same protocol, hostname and outcome."""
    assert_sniffed_as_one_read(data, sizes)


@given(grammar_pieces())
def test_a_flight_read_piece_by_piece_is_answered_as_in_one(pieces: list[bytes]) -> None:
    """Each piece in a read of its own: a byte that changes what the bytes so far are comes
    first in its read."""
    assert_sniffed_as_one_read(b"".join(pieces), [len(piece) for piece in pieces])


@pytest.mark.parametrize("path", FLIGHTS, ids=lambda path: path.name)
def test_every_corpus_file_and_capture_a_byte_a_read_is_answered_as_in_one(path: Path) -> None:
    data = path.read_bytes()[:2048]
    assert_sniffed_as_one_read(data, [1] * len(data))


# -- the work a read costs -----------------------------------------------------------------

L = SNIFF_BUFFER_LIMIT
TRICKLED_HEADS = {
    "long-target": b"GET /" + b"a" * L,
    "short-header-lines": b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"X: y\r\n" * (L // 6),
    "one-long-header": b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"y" * L,
    "long-target-then-head": b"GET /" + b"a" * (L - 40) + b" HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "empty-lines-then-long-target": b"\r\n" * 3 + b"GET /" + b"a" * L,
    "empty-lines-then-header-lines": b"\r\n" * 3 + b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (L // 6),
    "p-then-long-target": b"POST /" + b"a" * L,
    "h2-preface-then-long-target": H2_PREFACE[:5] + b"a" * L,
    "lower-case-method": b"get /" + b"a" * L,
    "spaces-then-method": b" " * (L - 100) + b"a" * 64 + b" x" * 30,
    "words": b"hello world " * (L // 12 + 2),
    "text-then-path": b"x /" + bytes(range(1, 10)) * (L // 9 + 2),
}
"""Request heads, irregular lines and text up to the buffer limit (or a head end near it),
each in a shape the sniffer holds in its own way."""
WORK_PER_HEAD = 8 * L
"""Bytes handed to sniff and hold (each reads them all) for one of those heads sent a byte
at a time, all reads together: a few whole readings, where a byte changes what the bytes
so far are. Sniffed whole at every read, a head cost about L * L / 2, 0.06 to 0.4 s of the
worker's loop."""


@pytest.mark.parametrize("name", sorted(TRICKLED_HEADS))
def test_a_head_a_byte_a_read_costs_work_bounded_by_its_length(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flight = TRICKLED_HEADS[name]
    answer, handed, end = bytes_sniffed_one_byte_a_read(flight, monkeypatch)
    assert handed <= WORK_PER_HEAD, handed
    assert answer is not NEED_MORE
    assert answer == sniff(flight[:end])
    assert sniff(flight[: end - 1]) is NEED_MORE, "it answers where sniff first does"


TINY_RECORDS = frame(
    client_hello([sni_extension(b"example.com"), extension(21, bytes(15500))]), [1] * 254
)


@pytest.mark.parametrize(
    "flight",
    [TINY_RECORDS, frame(client_hello([sni_extension(b"a.test")]), [3, 0, 1, 0, 40, 2] * 20)],
    ids=["tiny-records", "records-of-every-size"],
)
def test_a_hello_a_byte_a_read_reads_each_record_a_few_times(
    flight: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records of a hello in pieces are read from where the last read left them: walked
    from the first at every record's end (and its header's first bytes), 256 tiny records
    then a long one, a byte a read, cost 261,373 record readings, 70 ms of the loop."""
    headers = 0
    check_record_header = tls._check_record_header

    def counted(header: bytes, *, first: bool) -> NotThis | None:
        nonlocal headers
        headers += 1
        return check_record_header(header, first=first)

    monkeypatch.setattr(tls, "_check_record_header", counted)
    answer, _, end = bytes_sniffed_one_byte_a_read(flight[:L], monkeypatch)
    records = flight[:end].count(b"\x16\x03\x01")
    assert headers <= 10 * records, (headers, records)
    assert answer == sniff(flight[:end])
    assert sniff(flight[: end - 1]) is NEED_MORE


@given(grammar_pieces().map(b"".join) | st.binary(max_size=100))
def test_a_request_line_still_growing_is_a_loose_one_still_growing(data: bytes) -> None:
    """What request_hold rests on: a first line parse_request_head may still read (no line
    end yet), loose_request_line may too, so the head is incomplete while that one says so."""
    line = data.split(b"\n", 1)[0][: SNIFF_BUFFER_LIMIT - 1]
    if parse_request_head(line) is NEED_MORE:
        assert loose_request_line(line) is NEED_MORE


SPLIT_HEADS = [
    *(path.read_bytes()[:600] for path in FLIGHTS),
    *P_HEADS,
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET / HTTP/1.0\n\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    *(line + b"\r\nHost: a.test\r\n\r\n" for line in IRREGULAR_REQUEST_LINES[:8]),
]
"""Every head of the corpus and captures (their first bytes) and heads of every shape."""


@pytest.mark.parametrize("flight", SPLIT_HEADS)
def test_a_flight_in_two_reads_is_answered_as_in_one_at_every_split(flight: bytes) -> None:
    """The first Sniffer searches for a head's end from just before the bytes that came
    since its first read: searched from the end of that read, a head whose last CRLF came
    in the second read ("...Host: a.example\\r\\n" then "\\r\\n") needed more for ever."""
    for cut in range(1, len(flight)):
        assert_sniffed_as_one_read(flight, [cut])
    assert_sniffed_as_one_read(flight, [1] * len(flight))


def test_a_head_end_split_over_the_first_two_reads_is_found() -> None:
    """The shape of the split above, spelt out: the head's final CRLF in the second read."""
    first = b"GET / HTTP/1.1\r\nHost: a.example\r\n"
    assert sniff(first) is NEED_MORE
    assert Sniffer(first).sniff(first + b"\r\n") == sniff(first + b"\r\n")
    assert isinstance(sniff(first + b"\r\n"), HttpRequestHead)
