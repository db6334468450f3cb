"""HTTP/2 cleartext with prior knowledge, and gRPC, stream by stream on h2.

Each client stream is decided on its own :authority, :path and headers. Allowed
streams are multiplexed onto one upstream h2 connection per (host, port); denied
ones are answered here (403, or a trailers-only `grpc-status: 7` for gRPC). Data a
peer sends is acknowledged (its flow-control window reopened) only once it has been
handed to the other side, so a slow reader slows the writer end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
import hpack
import hpack.huffman
import hpack.huffman_constants
import hyperframe.exceptions
import hyperframe.frame
from h11 import _abnf

from egressproxy import upstream as upstream_connector
from egressproxy.errors import NO_FILE_DESCRIPTORS, PROXY_ERROR, UpstreamError, log_proxy_error
from egressproxy.h2_windows import ConnectionWindows, GrowthBudget, StreamWindow
from egressproxy.http1 import DENIED_BODY, LINGER_SECONDS, unavailable_status
from egressproxy.http1_lean import MAX_RESPONSE_HEAD, is_grpc_content_type
from egressproxy.policy.decision import Action, Decision, RequestFacts
from egressproxy.records import RequestRecord, grpc_code_of_answer, grpc_status_of
from egressproxy.relay import (
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_LOW,
    abort_with_reset,
    held_bytes,
    quiet_for,
)
from egressproxy.settings import VerifyDestination
from egressproxy.sniff.http import H2_PREFACE, authority_address, authority_host
from egressproxy.verify import REFUSALS, verification_mode

if TYPE_CHECKING:
    from egressproxy.flow import Flow

log = logging.getLogger("egressproxy.http2")

MAX_CONCURRENT_STREAMS = 256
UPSTREAM_STREAM_WINDOW = 65_535
"""Per-stream receive window offered to an upstream at first, the reserve each stream
keeps whatever the others hold (h2_windows): all that a stream whose client reads nothing
makes the proxy hold."""
STREAM_WINDOW = 1 << 20
"""What an upstream stream's window grows to while its client keeps up, from the growth
pool: bytes in flight per download, which keeps its speed over a wide-area path."""
UPSTREAM_GROWTH_POOL = 16 << 20
"""What the streams of one upstream connection may draw together to grow their windows
past UPSTREAM_STREAM_WINDOW: sixteen downloads at STREAM_WINDOW."""
WORKER_GROWTH_BUDGET = 64 << 20
"""What the upstream streams of one worker may draw together, whatever the number of
connections and upstreams: sixty-four downloads at STREAM_WINDOW. With a pool per upstream
connection alone, each client that let its streams grow and then stopped reading made
the worker hold 16 MiB more, without bound."""
GROWTH_BUDGET = GrowthBudget(WORKER_GROWTH_BUDGET)
"""This worker's (each forked worker has its own copy)."""
CLIENT_STREAM_WINDOW = 65_535
"""Per-stream receive window offered to a client, Linkerd's proxy's: what a client sends
on a stream is held here until the upstream takes it (or the stream gets an upstream's
slot), and the client's hop is local, so a small window costs no speed."""
REPLAY_LIMIT = CLIENT_STREAM_WINDOW // 2
"""The most of a request body sent upstream that is kept until the answer begins, to send
it again should the upstream turn out not to have processed the stream (above its
GOAWAY's last stream, REFUSED_STREAM): a gRPC call's message is in flight with its head,
and nginx past keepalive_requests says GOAWAY while calls are on their way to it. Kept
bytes are acknowledged to the client only once let go of, so they stay within its
stream's window; half of it leaves the client room to send on past the limit."""
CLIENT_CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * CLIENT_STREAM_WINDOW
"""Receive window offered to a client: its streams' windows together (16 MiB), so that
no stream whose bytes wait (for an upstream that reads nothing yet, or for one of its
stream slots, 100 on grpcio and nginx) can take the window another needs to finish:
smaller, streams waiting for a slot starved the ones holding the slots, and the whole
connection hung. It bounds what one client connection can make the proxy hold."""

MAX_ANSWERS_UNREAD = 1000
"""PINGs, SETTINGS (each answered by h2 at once), frames on streams reset before (each
answered with a RST_STREAM) and new streams (a denied or malformed one is answered at
once) a peer may send while it reads nothing of ours (its write buffer high): past that
it floods and its connection ends, as with Envoy's max_outbound_frames (CVE-2019-9512,
-9514, -9515). Pausing its reading instead could deadlock a peer that writes its
request body before it reads our response."""
MAX_NEW_STREAMS_PER_READ = 4 * MAX_CONCURRENT_STREAMS
"""More request heads than this in one read are a flood: a client keeping to our 256
concurrent streams learns that one ended only from our answers, which go out after the
read; streams it does not wait for (past the limit, denied, malformed) each cost the
worker a decoded head and an answer while every other connection waits."""
PREMATURE_RESET_SECONDS = 1.0
STREAMS_BEFORE_RESETS_COUNT = 500
"""Rapid reset (CVE-2023-44487): a client that opens streams and resets them at once
keeps within the concurrent-stream limit while every stream costs the worker a decision
and the upstream a request. As Envoy does (premature_reset_total_stream_count and its
min_stream_lifetime of 1 s): once a connection has opened this many streams, more than
half of them reset by the client before their answer began and within
PREMATURE_RESET_SECONDS is a flood. A client cancelling now and then never gets there,
and a gRPC call the client reset as its deadline ran out (see deadline_ran_out) is not
premature however short its life: a slow upstream with tight deadlines is not an attack,
and ending the connection would fail every other call on it."""
MIN_COUNTED_DEADLINE = 0.1
"""A grpc-timeout shorter than this does not excuse its call's reset: a client that sets
one and resets at once makes at most MAX_CONCURRENT_STREAMS streams per this many seconds,
as many as a client of an upstream that answers in this time would."""
DEADLINE_SHARE = 0.9
"""Of its grpc-timeout a call must have lived for its reset to be the deadline's: the
client's clock started before its head reached the proxy."""
GRPC_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
"""gRPC over HTTP/2: TimeoutValue (at most 8 digits) and TimeoutUnit."""
GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
MAX_ENCODER_TABLE = 4096
"""Our HPACK encoder's dynamic table, whatever larger size a peer allows (RFC 7541 4.2): a
peer's SETTINGS_HEADER_TABLE_SIZE of 2^31 would make us keep every distinct header we
forward to it (nghttp2's default cap, as in Envoy)."""


class AnswersUnread:
    """The frames one peer (client or upstream) sent that asked for an answer while its
    write buffer was high, against MAX_ANSWERS_UNREAD."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def flooding(self, events: list[h2.events.Event], connection: _Connection) -> bool:
        """Count the frames h2 answered the last bytes received with and the streams they
        opened; True once past the limit."""
        self.count += connection.answered + sum(map(opens_a_stream, events))
        return self.count > MAX_ANSWERS_UNREAD


Headers = list[tuple[bytes, bytes]]

TOKEN = re.compile(_abnf.method)
"""A :method as HTTP/1 takes one (RFC 9110 token): an upstream speaking HTTP/1 behind an
h2 front would build its request line from it."""
VISIBLE_ASCII = re.compile(_abnf.request_target)
"""A :path as HTTP/1 takes a target: visible ASCII, no space."""
FINAL_STATUS = re.compile(rb"[2-9][0-9][0-9]")
"""A final response's :status: three digits (RFC 9110 15), as hyper's StatusCode takes
them; `abc` or `2000` would also make a metric label of anything the upstream sends."""


_REQUEST_HEADERS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_REQUEST_TRAILERS = _REQUEST_HEADERS._replace(is_trailer=True)


class MalformedMessage(h2.events.Event):
    """A request or response h2 found malformed (RFC 9113 8.1.1), or a stream past our
    stream limit (5.1.2); _Connection has reset its stream (RST_STREAM PROTOCOL_ERROR,
    REFUSED_STREAM for the limit) and dropped the frame."""

    def __init__(self, stream_id: int, reason: str, head: bool) -> None:
        self.stream_id = stream_id
        self.reason = reason
        self.head = head
        """The opening header block itself: no RequestReceived (ResponseReceived) came."""


def opens_a_stream(event: h2.events.Event) -> bool:
    """A request head: taken, or refused (past our stream limit, or malformed)."""
    return isinstance(event, h2.events.RequestReceived) or (
        isinstance(event, MalformedMessage) and event.head
    )


OVERSIZED_HEAD_FACTOR = 4
"""A client's request head past --max-header-bytes is answered 431 on its stream, an
upstream's response head past MAX_RESPONSE_HEAD fails its stream (502, bad_response); past
this many times the limit, decoding it is already the harm (an HPACK bomb), and the
connection ends."""


def head_size(headers: Headers) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


class _BlockKeepingDecoder(hpack.Decoder):
    """hpack's Decoder, keeping the header block it decoded last: h2 refuses a 1xx response
    with END_STREAM after decoding its block, before the stream takes it, and says no more
    than a ProtocolError; the block tells _Connection which error that was."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__()
        self.max_header_list_size = max_header_list_size
        self.last_block: list[hpack.HeaderTuple] | None = None
        """Set back to None by _Connection before each HEADERS frame it receives."""

    def decode(self, data: bytes, raw: bool = False) -> list[hpack.HeaderTuple]:
        self.last_block = list(super().decode(data, raw))
        return self.last_block


WINDOW_UPDATE = hyperframe.frame.WindowUpdateFrame.type
RST_STREAM = hyperframe.frame.RstStreamFrame.type


class LinearHuffmanEncoder(hpack.huffman.HuffmanEncoder):
    """hpack's Huffman coding in time linear in a value's length. hpack's own shifts one
    integer as long as the value once per byte: quadratic, 0.2 s for 64 KiB, so a few KB
    of HPACK references to one long cookie made a worker spend seconds re-encoding the
    heads it forwards while every other connection waited."""

    CODES = tuple(
        format(code, f"0{length}b")
        for code, length in zip(
            hpack.huffman_constants.REQUEST_CODES,
            hpack.huffman_constants.REQUEST_CODES_LENGTH,
            strict=True,
        )
    )

    def __init__(self) -> None:
        super().__init__(
            hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
        )

    def encode(self, bytes_to_encode: bytes | None) -> bytes:
        if not bytes_to_encode:
            return b""
        bits = "".join(map(self.CODES.__getitem__, bytes_to_encode))
        padding = -len(bits) % 8  # with ones (RFC 7541 5.2)
        value = ((int(bits, 2) + 1) << padding) - 1
        return value.to_bytes((len(bits) + padding) // 8, "big")


class _Connection(h2.connection.H2Connection):
    """h2, where a malformed message is a stream error, as RFC 9113 8.1.1 asks.

    h2 judges a message after its stream's state machine has taken the HEADERS or DATA
    frame: a bad or conflicting content-length, a body longer or shorter than it, trailers
    without END_STREAM, (upstream) a response header block it validates. Any of these it
    raises as a ProtocolError, which ends the whole connection (GOAWAY). Here such an
    error resets that stream alone, the way h2 itself treats a frame on a stream it reset
    (StreamClosedError carrying events, caught in _receive_frame), and becomes a
    MalformedMessage event; so does (upstream) a header block over the limit the peer was
    told (SETTINGS_MAX_HEADER_LIST_SIZE), decoded whole all the same (up to
    OVERSIZED_HEAD_FACTOR times it) to keep HPACK in step. What is caught is told apart
    without reading error messages: for DATA, h2's own class, InvalidBodyLengthError; for
    HEADERS, an error raised once the stream's state machine recorded the block
    (headers_received or trailers_received changed), so the block decoded (HPACK state
    intact) on a valid stream. Errors before that (HPACK, stream ids, a frame on a closed
    stream) stay connection errors, but for TooManyStreamsError (_refuse) and (upstream) a
    1xx response with END_STREAM, which h2 refuses before its stream takes it
    (_ended_informational). A body a header block's END_STREAM ends short of its
    content-length, which h2 lets through, is a stream error too (_length_at_end).
    These override and read h2's private parts, so pyproject.toml pins h2's minor version.
    """

    decoder: _BlockKeepingDecoder

    def __init__(self, client_side: bool, max_header_bytes: int) -> None:
        """h2 validates the upstream's header blocks itself, and here their size; the
        client's are checked by `malformed` and against max_header_bytes after the stream
        is decided, so a bad request is counted on its route."""
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=client_side
        )
        super().__init__(config=config)
        self.encoder.huffman_coder = LinearHuffmanEncoder()
        self.max_header_bytes = max_header_bytes
        self.frames_queued = 0
        self.answered = 0
        """Frames h2 queued in answer to the last bytes receive() took (PING and SETTINGS
        ACKs, a RST_STREAM for each frame on a stream reset before): what a peer that reads
        nothing makes us hold."""
        self.decoder = _BlockKeepingDecoder(OVERSIZED_HEAD_FACTOR * max_header_bytes)
        self.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (
                    UPSTREAM_STREAM_WINDOW if client_side else CLIENT_STREAM_WINDOW
                ),
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
            },
        )

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        """Counted: every frame but WINDOW_UPDATEs, which only give back window the peer
        spent."""
        self.frames_queued += sum(frame.type != WINDOW_UPDATE for frame in frames)
        super()._prepare_for_sending(frames)

    def _handle_data_on_closed_stream(
        self,
        events: list[h2.events.Event],
        exc: h2.exceptions.StreamClosedError,
        frame: hyperframe.frame.DataFrame,
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        """As h2, but DATA on a stream we reset draws no RST_STREAM: the peer may have sent
        it before ours reached it, and it is ignored (RFC 9113 5.1; its window is given
        back). Answered, a client uploading or an upstream streaming at the time counted as
        a flood of answers."""
        frames, events = super()._handle_data_on_closed_stream(events, exc, frame)
        if self._stream_closed_by(frame.stream_id) is h2.stream.StreamClosedBy.SEND_RST_STREAM:
            frames = [answer for answer in frames if answer.type != RST_STREAM]
        return frames, events

    def _acknowledge_settings(self) -> list[hyperframe.frame.Frame]:
        """As h2 does, with our encoder's table kept to MAX_ENCODER_TABLE: the size update
        then announced is that one alone."""
        frames = super()._acknowledge_settings()
        encoder = self.encoder
        if encoder.header_table_size > MAX_ENCODER_TABLE:
            encoder.table_size_changes.clear()
            encoder.header_table_size = MAX_ENCODER_TABLE
        return frames

    def _receive_headers_frame(
        self, frame: hyperframe.frame.HeadersFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        before = self._blocks_received(frame.stream_id)
        stream = self.streams.get(frame.stream_id)
        declared = stream._expected_content_length if stream is not None else None
        self.decoder.last_block = None
        try:
            received = super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError as error:
            return self._refuse(frame, str(error))
        except h2.exceptions.StreamClosedError:
            raise
        except h2.exceptions.ProtocolError as error:
            if self._blocks_received(frame.stream_id) != before:
                return self._stream_error(frame.stream_id, str(error), head=not before[0])
            if stream is None or not self._ended_informational(frame):
                raise
            self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
            return self._stream_error(frame.stream_id, str(error), head=not before[0])
        if self.config.client_side and self.decoder.last_block is not None:
            size = head_size(self.decoder.last_block)
            if size > self.max_header_bytes:
                problem = f"header block of {size} bytes, over {self.max_header_bytes}"
                return self._stream_error(frame.stream_id, problem, head=not before[0])
        if "END_STREAM" in frame.flags:
            problem = self._length_at_end(frame.stream_id, declared, trailers=bool(before[0]))
            if problem:
                return self._stream_error(frame.stream_id, problem, head=not before[0])
        return received

    def _ended_informational(self, frame: hyperframe.frame.HeadersFrame) -> bool:
        """Whether h2 refused this block, decoded (HPACK state intact), as a 1xx response
        with END_STREAM: malformed (RFC 9113 8.1.1), and its stream the only one at fault.
        The connection has yet to take the frame (ConnectionInputs.RECV_HEADERS)."""
        block = self.decoder.last_block
        return (
            self.config.client_side
            and block is not None
            and "END_STREAM" in frame.flags
            and h2.utilities.is_informational_response(block)
        )

    def _length_at_end(self, stream_id: int, declared: int | None, trailers: bool) -> str:
        """Why a header block's END_STREAM ends a body short of its content-length; "" if
        not. h2 checks only a DATA frame's END_STREAM: not a request head's (a response
        head's may declare a length it has no content for: HEAD, 304), nor trailers', whose
        block it reads a new content-length from (none) after the head's was `declared`."""
        stream = self.streams[stream_id]
        if trailers:
            expected = declared
        elif self.config.client_side:
            return ""
        else:
            expected = stream._expected_content_length
        received = stream._actual_content_length
        if expected is None or expected == received:
            return ""
        return f"content-length {expected}, body of {received} bytes"

    def _refuse(
        self, frame: hyperframe.frame.HeadersFrame, reason: str
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        """A stream past our SETTINGS_MAX_CONCURRENT_STREAMS: RFC 9113 5.1.2 allows a stream
        error, REFUSED_STREAM so the client may retry it, where h2 raises a connection error.
        Its block is still read, as if the stream were allowed, to keep HPACK in step."""
        self._begin_new_stream(
            frame.stream_id, h2.connection.AllowedStreamIDs(not self.config.client_side)
        )
        self._receive_headers_frame(frame)
        return self._stream_error(
            frame.stream_id, reason, head=True, code=h2.errors.ErrorCodes.REFUSED_STREAM
        )

    def _receive_data_frame(
        self, frame: hyperframe.frame.DataFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError as error:
            frames, events = self._stream_error(frame.stream_id, str(error), head=False)
            self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return frames, events

    def _blocks_received(self, stream_id: int) -> tuple[bool | None, bool | None]:
        stream = self.streams.get(stream_id)
        if stream is None:
            return None, None
        machine = stream.state_machine
        return machine.headers_received, machine.trailers_received

    def _stream_error(
        self,
        stream_id: int,
        reason: str,
        head: bool,
        code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.PROTOCOL_ERROR,
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        """RST_STREAM with code, unless the stream is closed both ways (or reset) already."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.reset_stream(stream_id, code)
        return [], [MalformedMessage(stream_id, reason, head)]


def deadline_ran_out(headers: Headers, lived: float) -> bool:
    """Whether a call reset after `lived` seconds was reset by its client's deadline: it
    carried a grpc-timeout of at least MIN_COUNTED_DEADLINE and lived DEADLINE_SHARE of it."""
    for name, value in headers:
        if name == b"grpc-timeout":
            timeout = GRPC_TIMEOUT.fullmatch(value)
            if timeout is None:
                return False
            seconds = int(timeout[1]) * GRPC_TIMEOUT_UNITS[timeout[2]]
            return seconds >= MIN_COUNTED_DEADLINE and lived >= seconds * DEADLINE_SHARE
    return False


def stream_facts(headers: Headers, flow: Flow) -> tuple[RequestFacts, str]:
    """RequestFacts of one stream's request headers (pseudo-headers give method and path),
    and what is wrong with them for the policy, "" when nothing: an :authority (or Host)
    that is not `host[:port]` (sniff.http.authority_host), or a :path no server reads as
    the policy would (as http1.ParsedRequest.bad_target: not `/…` nor OPTIONS' `*`, or
    with a `#`)."""
    assert flow.record.destination is not None
    authority: str | None = None
    host: str | None = None
    method = path = ""
    extended_connect = False
    grpc = False
    plain: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name.startswith(":"):
            if name == ":authority":
                authority = value
            elif name == ":method":
                method = value
            elif name == ":path":
                path = value
            elif name == ":protocol":
                extended_connect = True
            continue
        plain.append((name, value))
        if name == "host":
            host = value
        elif name == "content-type":
            grpc = is_grpc_content_type(value)
    plain_connect = method == "CONNECT" and not extended_connect  # no :path (RFC 9113 8.5)
    bad_path = (
        "#" in path
        or not VISIBLE_ASCII.fullmatch(path or "/")
        or not (path.startswith("/") or (path == "*" and method == "OPTIONS") or plain_connect)
    )
    path, _, query = path.partition("?")
    named = authority if authority is not None else host
    hostname = authority_host(named) if named else None
    facts = RequestFacts(
        destination=flow.record.destination,
        hostname=hostname,
        method=method,
        path=path or "/",
        query=query,
        headers=tuple(plain),
        grpc=grpc,
        authority=named,
    )
    if named and hostname is None:
        return facts, "malformed :authority"
    if plain_connect:  # its :authority is host and port to tunnel to (RFC 9113 8.5)
        address = authority_address(authority or "", 0)
        if address is None or not address[1]:
            return facts, "CONNECT :authority without a port"
    if not TOKEN.fullmatch(method):
        return facts, "malformed :method"
    return facts, "malformed :path" if bad_path else ""


def malformed(headers: Headers, trailers: bool) -> str:
    """Why a client's request header block (or trailers) is malformed (RFC 9113 8.1.1:
    an uppercase name, a connection-specific field, a pseudo-header missing, repeated or
    misplaced, `te` other than trailers …), by h2's own rules; "" when it is not."""
    flags = _REQUEST_TRAILERS if trailers else _REQUEST_HEADERS
    try:
        for _ in h2.utilities.validate_headers(headers, flags):
            pass
    except h2.exceptions.ProtocolError as error:
        return str(error)
    return ""


_GOAWAY = hyperframe.frame.GoAwayFrame.type
_HEADER_BLOCK = (
    hyperframe.frame.HeadersFrame.type,
    hyperframe.frame.PushPromiseFrame.type,
    hyperframe.frame.ContinuationFrame.type,
)
_END_HEADERS = 0x4


class GoawayFilter:
    """Takes GOAWAY frames out of a peer's bytes before h2 sees them, and refuses a frame
    longer than SETTINGS_MAX_FRAME_SIZE by its 9-byte header (FrameTooLargeError): h2
    checks the length only once the whole frame is buffered, so a peer could make each
    connection hold up to 16 MiB (RFC 9113 4.2 asks for a FRAME_SIZE_ERROR).

    h2 moves its whole connection to CLOSED on a GOAWAY it receives and refuses every frame
    after it either way (h2/connection.py, RECV_GOAWAY), yet a GOAWAY only says which
    streams its sender will still process (RFC 9113 6.8): those in flight may finish. Only
    frame boundaries are followed here; h2 still checks every frame, and gets to see (and
    refuse) a GOAWAY that is malformed, too long or inside a header block.
    """

    def __init__(self, preface: int) -> None:
        self.passing = preface
        """Bytes of the current frame (at first the client's preface) that go to h2 as they are."""
        self.held = b""
        """A frame header, or a whole GOAWAY frame, begun but not complete yet."""
        self.in_header_block = False
        self.passing_header_block = False
        """The frame whose bytes are passing is a HEADERS or CONTINUATION frame."""

    @property
    def head_incomplete(self) -> bool:
        """A header block (a request's head) is begun and not whole yet."""
        return self.in_header_block or (self.passing > 0 and self.passing_header_block)

    def split(
        self, data: bytes, max_frame_size: int
    ) -> tuple[bytes, list[hyperframe.frame.GoAwayFrame]]:
        """The bytes for h2, and the GOAWAY frames taken out of them, in order."""
        if self.held:
            data, self.held = self.held + data, b""
        end = len(data)
        position = min(self.passing, end)
        self.passing -= position
        kept: list[bytes] = []
        goaways: list[hyperframe.frame.GoAwayFrame] = []
        keep_from = 0
        while end - position >= 9:
            length = int.from_bytes(data[position : position + 3], "big")
            kind, flags = data[position + 3], data[position + 4]
            size = 9 + length
            if length > max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {length} bytes announced, max {max_frame_size}"
                )
            if kind == _GOAWAY and not self.in_header_block:
                if end - position < size:
                    break
                frame = _goaway_frame(data[position : position + size])
                if frame is not None:
                    kept.append(data[keep_from:position])
                    goaways.append(frame)
                    position = keep_from = position + size
                    continue
            self.passing_header_block = kind in _HEADER_BLOCK
            if self.passing_header_block:
                self.in_header_block = not flags & _END_HEADERS
            step = min(size, end - position)
            position += step
            self.passing = size - step
        if self.passing == 0:
            self.held = data[position:]
            end = position
        kept.append(data[keep_from:end])
        return b"".join(kept), goaways


def receive(
    connection: _Connection, frames: GoawayFilter, data: bytes
) -> tuple[list[h2.events.Event], list[hyperframe.frame.GoAwayFrame]]:
    """A peer's bytes through its filter and h2: the events, and the GOAWAYs taken out.
    Raises h2's ProtocolError, with h2's GOAWAY queued (FRAME_SIZE_ERROR for an oversized
    frame the filter refused)."""
    try:
        data, goaways = frames.split(data, connection.max_inbound_frame_size)
    except h2.exceptions.FrameTooLargeError:
        connection.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
        raise
    queued = connection.frames_queued
    events = connection.receive_data(data)
    connection.answered = connection.frames_queued - queued
    return events, goaways


def _goaway_frame(raw: bytes) -> hyperframe.frame.GoAwayFrame | None:
    try:
        frame, _ = hyperframe.frame.Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9:]))
    except (hyperframe.exceptions.InvalidDataError, hyperframe.exceptions.InvalidFrameError):
        return None
    return cast(hyperframe.frame.GoAwayFrame, frame)


class _Stream:
    """One client stream and, once forwarded, its upstream twin."""

    __slots__ = (
        "client_id",
        "done",
        "end_sent",
        "headers",
        "kept",
        "last_activity",
        "own_answer",
        "record",
        "request_ended",
        "request_trailers",
        "response_ended",
        "response_started",
        "response_trailers",
        "retried",
        "to_client",
        "to_upstream",
        "upstream",
        "upstream_id",
        "upstream_window",
    )

    def __init__(self, client_id: int, record: RequestRecord, headers: Headers, now: float) -> None:
        self.client_id = client_id
        self.record = record
        self.headers = headers
        self.last_activity = now
        """When a byte of its own last moved either way (H2Proxy.tick)."""
        self.upstream: _Upstream | None = None
        self.upstream_id = 0
        self.upstream_window: StreamWindow | None = None
        """The receive window of its upstream twin, from its opening to the end of what
        the client takes of the answer."""
        self.to_upstream = bytearray()
        self.kept: bytearray | None = bytearray()
        """The body sent upstream so far, kept until the answer begins (REPLAY_LIMIT);
        None once some of it was let go of."""
        self.request_ended = False
        self.request_trailers: Headers | None = None
        self.end_sent = False
        """The end of the request (END_STREAM or trailers) went upstream."""
        self.to_client = bytearray()
        self.own_answer = False
        """to_client holds the proxy's own answer, not bytes from the upstream."""
        self.response_ended = False
        self.response_trailers: Headers | None = None
        self.response_started = False
        self.retried = False
        self.done = False

    @property
    def replayable(self) -> bool:
        """Nothing of the request is lost yet: its headers are kept and so is what of its
        body went upstream (up to REPLAY_LIMIT), so it can be sent again, once."""
        return not self.retried and not self.response_started and self.kept is not None

    def close_upstream_window(self) -> None:
        """Its upstream twin is done with: what it held and drew of the upstream
        connection's window goes back."""
        if self.upstream_window is not None:
            self.upstream_window.close()
            self.upstream_window = None

    @property
    def answered_here(self) -> bool:
        """The proxy answers this stream itself (its body may still wait for a window)."""
        return self.response_started and self.upstream is None


class _Upstream(asyncio.Protocol):
    """One upstream h2 connection carrying many client streams."""

    def __init__(self, proxy: H2Proxy, key: tuple[str, int], extra: bool) -> None:
        self.proxy = proxy
        self.key = key
        self.extra = extra
        """Counted in OpenFlows.extra until it is closed, or never connected."""
        self.h2 = _Connection(True, MAX_RESPONSE_HEAD)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.waiting: deque[_Stream] = deque()
        """Streams not yet opened upstream (connecting, or at the peer's stream limit)."""
        self.goaways = GoawayFilter(0)
        self.answers_unread = AnswersUnread()
        self.windows = ConnectionWindows(
            MAX_CONCURRENT_STREAMS,
            UPSTREAM_STREAM_WINDOW,
            STREAM_WINDOW,
            UPSTREAM_GROWTH_POOL,
            GROWTH_BUDGET,
        )
        self.settled = False
        """The upstream's first SETTINGS came: until then its stream limit is unknown (h2
        assumes none), so no stream is opened and a burst is not refused wholesale."""
        self.failure = ""
        """Why the proxy cut it (bad_response, flood); else its streams fail as "reset"."""
        self.went_away = False
        """It said GOAWAY: written to only while it waits for a window (may_write)."""
        self.owed = False
        """Frames written at the next flush whatever may_write says: a WINDOW_UPDATE given
        while it waited (the window it opens means it waits no more), a stream's reset,
        a request's body and end."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(self.windows.size - 65535)

    def data_received(self, data: bytes) -> None:
        self.proxy.upstream_data(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.upstream_lost(self, self.failure or "reset")

    def fail(self, failure: str) -> None:
        """Cut the connection; its streams fail with this cause."""
        self.failure = failure
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """GOAWAY, then close. One that left bytes unsent (it reads nothing) is cut instead:
        once the client's side lets go of it, nothing else would end its connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.h2.close_connection()
        self.flush()
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def pause_writing(self) -> None:
        self.proxy.upstream_full(self, True)

    def resume_writing(self) -> None:
        self.proxy.upstream_full(self, False)

    def flush(self) -> None:
        """What h2 has to send, after a WINDOW_UPDATE giving back the connection window
        its streams no longer hold (h2_windows); none once h2 has closed the connection."""
        if self.transport is not None and (self.owed or self.may_write()):
            self.owed = False
            due = self.windows.due(self.h2.inbound_flow_control_window)
            if due:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.increment_flow_control_window(due)
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def may_write(self) -> bool:
        """A server that said GOAWAY closes as soon as its last answer is written (grpc-go
        and grpc-core, max_connection_age in Kubernetes), some of it maybe still unsent
        while the proxy has yet to read what came before; a byte that reaches it after
        that close makes its kernel abort the connection and drop what is unsent, and the
        calls failed mid-stream. So such a server is written to (its WINDOW_UPDATEs, its
        PING's ACK) only while it cannot finish without a window: a stream of it not
        ended, or the connection, has none left. It has not closed then."""
        if not self.went_away or self.h2.inbound_flow_control_window <= 0:
            return True
        return any(
            window is not None and not window.ended and window.window <= 0
            for window in (stream.upstream_window for stream in self.streams.values())
        )


class H2Proxy(asyncio.Protocol):
    """The client side of an h2c connection after sniffing the preface."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.settings = flow.context.settings
        self.accounting = flow.context.accounting
        self.transport = flow.transport
        self.loop = flow.context.loop
        self.h2 = _Connection(False, self.settings.max_header_bytes)
        self.goaways = GoawayFilter(len(H2_PREFACE))
        self.head_timer: asyncio.TimerHandle | None = None
        """Runs while a request head is incomplete: --header-timeout, as for HTTP/1."""
        self.streams: dict[int, _Stream] = {}
        self.upstreams: dict[tuple[str, int], _Upstream] = {}
        """The upstream new streams to (host, port) go to."""
        self.retired: set[_Upstream] = set()
        """Upstreams that said GOAWAY: they take no new stream, and finish the ones they took."""
        self.connecting: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.verifying: set[asyncio.Task[None]] = set()
        self.full_upstreams: set[_Upstream] = set()
        """Upstreams whose write buffer is high: the client is not read meanwhile."""
        self.client_full = False
        self.answers_unread = AnswersUnread()
        self.streams_opened = 0
        self.premature_resets = 0
        """Streams the client reset before their answer began, within a second: see
        STREAMS_BEFORE_RESETS_COUNT."""
        self.closed = False
        self.goaway_sent = False
        self.error = ""
        self.last_activity = self.loop.time()
        self.held = 0
        """Bytes written that had not left the proxy, as the idle sweep last saw them:
        their going out to a slow reader is traffic too."""

    def start(self) -> None:
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.transport.set_protocol(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CLIENT_CONNECTION_WINDOW - 65535)
        self.flow.context.idle_sweep.add(self)
        buffered, self.flow.buffer = self.flow.buffer, b""
        self.transport.resume_reading()
        if buffered:
            self.data_received(buffered)
        else:
            self._flush()
        if self.flow.client_eof and not self.closed:
            self._close()

    # ---- client side ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.flow.record.bytes_from_client += len(data)
        if self.closed:  # after our FIN (_close): dropped, and no sign of life
            return
        self.last_activity = self.loop.time()
        try:
            events, goaways = receive(self.h2, self.goaways, data)
        except h2.exceptions.ProtocolError as error:
            log.info("%s: h2 protocol error: %s", self.flow.record.client, error)
            self.error = self.flow.record.error = "bad_request"  # the cause of the streams cut
            self._flush()
            self._close()
            return
        if sum(map(opens_a_stream, events)) > MAX_NEW_STREAMS_PER_READ:
            self._flooded("new streams in one read")
            return
        for event in events:
            self._client_event(event)
            if self.closed:  # flooded, or closed: the events left change nothing
                return
        if self.client_full and self.answers_unread.flooding(events, self.h2):
            self._flooded("PING/SETTINGS/RST_STREAM answers or new streams while not reading")
            return
        if goaways:
            self._client_goaway()
        self._flush()
        if self.goaways.head_incomplete != (self.head_timer is not None) and not self.closed:
            if self.head_timer is None:
                timeout = self.settings.header_timeout
                self.head_timer = self.loop.call_later(timeout, self._head_timed_out)
            else:
                self.head_timer.cancel()
                self.head_timer = None

    def _head_timed_out(self) -> None:
        """A request head still incomplete at --header-timeout (a client trickling it,
        slowloris): no stream to answer 408 on yet, so the connection takes no new stream
        (GOAWAY) and closes once those in flight are done, as after a drain's GOAWAY."""
        self.head_timer = None
        log.info(
            "%s: h2 request head incomplete after %ss",
            self.flow.record.client,
            self.settings.header_timeout,
        )
        self.error = self.flow.record.error = "header_timeout"
        self._goaway()
        self._flush()
        if not self.streams:
            self._close()

    def _flooded(self, what: str) -> None:
        log.warning("%s: h2 flood (%s), cut", self.flow.record.client, what)
        self.error = self.flow.record.error = "flood"
        self.closed = True
        self.transport.abort()

    def eof_received(self) -> bool:
        """The client sends no more: its connection closes, as on an EOF before start (or
        after our own FIN, both sides being done)."""
        self.flow.client_eof = True
        if self.closed:
            self.transport.close()
        else:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        closed_here, self.closed = self.closed, True
        if self.head_timer is not None:
            self.head_timer.cancel()
        self._cut_streams()
        self.flow.context.idle_sweep.discard(self)
        self.flow.finish(self.error or ("reset" if exc and not closed_here else ""))

    def pause_writing(self) -> None:
        self.client_full = True
        for upstream in self._all_upstreams():
            if upstream.transport is not None:
                upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        self.answers_unread.count = 0
        for upstream in self._all_upstreams():
            if upstream.transport is not None:
                upstream.transport.resume_reading()

    def drain(self) -> None:
        """The server is stopping: refuse new streams, finish the open ones, then close."""
        self._goaway()
        self._flush()
        if not self.streams:
            self._close()

    def cut(self) -> None:
        """The drain timeout ends the connection. No reset: every stream cut short shows
        it without one (no END_STREAM), and a reset would drop what is still unsent."""
        self.transport.abort()

    def _client_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._request_data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request_started(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_ended(event.stream_id, None)
        elif isinstance(event, h2.events.TrailersReceived):
            trailers: Headers = list(event.headers)
            stream = self.streams.get(event.stream_id or 0)
            problem = malformed(trailers, trailers=True)
            if problem and stream is not None and not stream.done:
                self._malformed(stream, problem)
                self._count_premature_reset(stream)
            else:
                self._request_ended(event.stream_id, trailers)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._client_window_opened(getattr(event, "stream_id", None))
        elif isinstance(event, h2.events.StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, MalformedMessage):
            self._malformed_frame(event)

    def _client_goaway(self) -> None:
        """The client opens no more streams: the ones in flight are still answered, then
        the connection closes (after our own GOAWAY, which refuses any it opens still)."""
        self._goaway()
        if not self.streams:
            self._close()

    def _request_started(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None and event.headers is not None
        if self.goaway_sent:  # past our GOAWAY's last stream: not processed
            with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset by the client
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers: Headers = list(event.headers)
        facts, bad_request = stream_facts(headers, self.flow)
        policy = self.flow.context.policy.current  # a reload reaches the next stream
        decision = policy.index.decide_request(facts)
        assert self.flow.record.destination is not None
        record = RequestRecord(
            client=self.flow.record.client,
            destination=self.flow.record.destination,
            protocol="h2",
            hostname=facts.hostname,
            method=facts.method,
            path=facts.path,
            grpc=facts.grpc,
            decision=decision,
        )
        stream = _Stream(event.stream_id, record, headers, self.last_activity)
        self.streams[event.stream_id] = stream
        self.streams_opened += 1
        if event.stream_ended is not None:
            stream.request_ended = True
        if head_size(headers) > self.settings.max_header_bytes:  # before malformed's scan
            text = "request header fields too large"
            self._answer(stream, 431, text, "header_too_large")
            return
        problem = malformed(headers, trailers=False)
        if problem:
            self._malformed(stream, problem)
            return
        if bad_request:
            self._answer(stream, 400, f"bad request: {bad_request}", "bad_request")
            return
        if decision.action is Action.DENY:
            if not decision.audit:
                self._deny(stream)
                return
            log.info(
                "%s: would deny %s %s (audit)",
                self.flow.record.client,
                facts.method,
                facts.hostname,
            )
        mode = verification_mode(decision, facts.hostname, self.settings.verify_destination)
        if mode is VerifyDestination.LOG:
            record, destination = stream.record, self.flow.record.destination
            assert record.hostname is not None and destination is not None
            resolver = self.flow.context.resolver
            resolver.observe(record.hostname, destination, record.client, self.accounting)
        elif mode is VerifyDestination.ENFORCE:
            task = self.loop.create_task(
                self._verify_then_forward(stream, decision),
                name=f"h2 verify {self.flow.record.client} {facts.hostname}",
            )
            self.verifying.add(task)
            task.add_done_callback(self.verifying.discard)
            return
        self._forward(stream, self._target(decision))

    async def _verify_then_forward(self, stream: _Stream, decision: Decision) -> None:
        """--verify-destination enforce: the :authority must resolve to the original
        destination."""
        record, destination = stream.record, self.flow.record.destination
        assert record.hostname is not None and destination is not None
        try:
            resolver = self.flow.context.resolver
            error = await resolver.check(
                record.hostname, destination, record.client, self.accounting
            )
            if stream.done or self.closed:
                return
            if error:
                self._answer(stream, 421, REFUSALS[error], error)
                self._flush()
                return
            self._forward(stream, self._target(decision))
            self._flush()
        except Exception as unforeseen:
            self._failed_in_task(unforeseen, f"verifying {record.hostname}")

    def _target(self, decision: Decision) -> tuple[str, int]:
        destination = self.flow.record.destination
        assert destination is not None
        return upstream_connector.address_for(decision, destination)

    def _deny(self, stream: _Stream) -> None:
        self._answer(stream, 403, DENIED_BODY, "")

    def _answer(self, stream: _Stream, status: int, text: str, error: str) -> None:
        """The proxy's own answer for a cause of HTTP status 400, 403, 421, 431, 502 or 504:
        to a gRPC call the trailers-only form of the same cause, to anything else that
        status."""
        if stream.record.grpc:
            self._grpc_answer(stream, status, text, error)
        else:
            self._local_answer(stream, status, text, error)

    def _local_answer(self, stream: _Stream, status: int, text: str, error: str) -> None:
        """Answer a stream here (403, 421, 502, 504); whatever the client still sends is
        dropped. The body waits for the client's window like an upstream's would; once it
        is out, a request still being sent is reset (NO_ERROR)."""
        body = (text + "\n").encode()
        stream.record.answered_by_proxy(status, error)
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
        ]
        stream.upstream, stream.upstream_id = None, 0  # a failed upstream's, if any
        stream.own_answer = True
        stream.close_upstream_window()
        stream.response_started = stream.response_ended = True
        head_only = stream.record.method == "HEAD"  # the length a GET's body would have
        if not self._send_answer_head(stream, headers, ended=head_only):
            return
        if head_only:
            self._answered_locally(stream)
            return
        stream.to_client += body
        self._pump_client(stream)

    def _grpc_answer(self, stream: _Stream, status: int, text: str, error: str) -> None:
        """A trailers-only gRPC answer: HTTP 200 with the code of the cause (`status`, or a
        resolver's missing answer) in the only HEADERS frame. The record keeps that status,
        so a denied call counts as a deny (http_status 403) where its route is an HTTP one,
        not as a 200 without error."""
        code = grpc_code_of_answer(status, error)
        assert code is not None
        stream.record.answered_by_proxy(status, error)
        stream.record.grpc_status = code
        headers = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code),
            (b"grpc-message", text.replace(" ", "%20").encode()),
        ]
        if self._send_answer_head(stream, headers, ended=True):
            self._answered_locally(stream)

    def _send_answer_head(self, stream: _Stream, headers: Headers, ended: bool) -> bool:
        """The head of the proxy's own answer; False if h2 has closed the client's stream:
        its head and RST_STREAM came in one read, and the RST_STREAM's event, still to come,
        will find the stream gone."""
        try:
            self.h2.send_headers(stream.client_id, headers, end_stream=ended)
        except h2.exceptions.StreamClosedError:
            self._reset_by_client(stream)
            return False
        return True

    def _answered_locally(self, stream: _Stream) -> None:
        if not stream.request_ended:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(stream.client_id, h2.errors.ErrorCodes.NO_ERROR)
        self._finish_stream(stream, stream.record.error)

    def _forward(self, stream: _Stream, key: tuple[str, int]) -> None:
        upstream = self.upstreams.get(key)
        if upstream is None:
            # The connection's first upstream is in the two descriptors it is counted
            # for; each other one (another backend, or a new one after a GOAWAY while
            # the old one finishes) takes room from the accepting: one client must not
            # use up the descriptors every other connection needs.
            extra = bool(self._all_upstreams())
            if extra and not self.flow.context.open_flows.take_extra():
                self.accounting.upstream_failed(NO_FILE_DESCRIPTORS)
                error = NO_FILE_DESCRIPTORS
                self._answer(stream, unavailable_status(error), f"upstream {error}", error)
                return
            upstream = _Upstream(self, key, extra)
            self.upstreams[key] = upstream
            self.connecting[key] = self.loop.create_task(
                self._connect(upstream),
                name=f"h2 connect {self.flow.record.client}→{key[0]}:{key[1]}",
            )
        stream.upstream = upstream
        upstream.waiting.append(stream)
        if upstream.transport is not None:
            self._open_waiting(upstream)

    async def _connect(self, upstream: _Upstream) -> None:
        key = upstream.key
        connected = False
        try:
            await upstream_connector.connect(
                key[0],
                key[1],
                lambda: upstream,
                timeouts=self.flow.context.connect_timeouts,
                mark=self.settings.mark,
                connector=self.flow.context.splicer.connect,
                lookups=self.flow.context.resolver.threads,
            )
            connected = True
            self.connecting.pop(key, None)
            assert upstream.transport is not None
            if self.closed:
                upstream.transport.abort()
                return
            if self.client_full:  # not read, as the others are not (pause_writing); here,
                # as Python 3.11 reads a transport paused in connection_made all the same
                upstream.transport.pause_reading()
            self._open_waiting(upstream)
            self._flush()
        except UpstreamError as error:
            log.info("%s → %s:%s: %s", self.flow.record.client, key[0], key[1], error)
            self.accounting.upstream_failed(error.kind)
            self.connecting.pop(key, None)
            if self.upstreams.get(key) is upstream:
                del self.upstreams[key]
            self._fail_streams(upstream, error.kind)
            self._flush()
        except Exception as unforeseen:
            self._failed_in_task(unforeseen, f"connecting to {key[0]}:{key[1]}")
        finally:
            if not connected:  # failed or cancelled: no connection_lost need come (uvloop
                # closes a transport made just before the cancel without telling it)
                self._give_back(upstream)

    def _give_back(self, upstream: _Upstream) -> None:
        """The upstream holds no descriptor any more: its room goes back, once."""
        if upstream.extra:
            upstream.extra = False
            self.flow.context.open_flows.give_back_extra()

    def _failed_in_task(self, error: Exception, doing: str) -> None:
        """The proxy itself failed while a task waited (a bug, or a resource the kernel
        refused): the connection is reset, its streams counted as proxy_error once
        connection_lost comes. A task has no transport to close it as a failing callback
        has."""
        log_proxy_error(log, f"{self.flow.record.client}: {doing}", error)
        self.error = self.flow.record.error = PROXY_ERROR
        abort_with_reset(self.transport)

    def _fail_streams(self, upstream: _Upstream, error: str) -> None:
        """Streams that never got an answer from a failed upstream: 502/504 or UNAVAILABLE."""
        streams = [*upstream.waiting, *upstream.streams.values()]
        upstream.waiting.clear()
        upstream.streams.clear()
        for stream in streams:
            if stream.done:
                continue
            if stream.response_ended:
                self._detach_answered(stream)
            elif stream.response_started:
                self.h2.reset_stream(stream.client_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                self._finish_stream(stream, error)
            else:
                self._answer(stream, unavailable_status(error), f"upstream {error}", error)

    def _detach_answered(self, stream: _Stream) -> None:
        """The upstream's whole answer is in, and its stream or connection ended before
        the client took all of it: the rest goes out as the client's window allows, as if
        the proxy answered, and what the client still sends is dropped."""
        stream.upstream, stream.upstream_id, stream.end_sent = None, 0, True
        if stream.to_upstream:
            self.h2.acknowledge_received_data(len(stream.to_upstream), stream.client_id)
            stream.to_upstream.clear()

    def _open_waiting(self, upstream: _Upstream) -> None:
        if not upstream.settled or upstream in self.retired:  # its waiting ones go elsewhere
            return
        limit = upstream.h2.remote_settings.max_concurrent_streams
        while upstream.waiting and upstream.h2.open_outbound_streams < limit:
            stream = upstream.waiting.popleft()
            if stream.done:
                continue
            stream.upstream_id = upstream.h2.get_next_available_stream_id()
            upstream.streams[stream.upstream_id] = stream
            stream.upstream_window = upstream.windows.open()
            ended = stream.request_ended and not stream.to_upstream and not stream.request_trailers
            upstream.h2.send_headers(stream.upstream_id, stream.headers, end_stream=ended)
            stream.end_sent = ended
            self._pump_upstream(stream)

    def _request_data(self, event: h2.events.DataReceived) -> None:
        assert event.stream_id is not None and event.data is not None
        stream = self.streams.get(event.stream_id)
        padding = (event.flow_controlled_length or 0) - len(event.data)
        if stream is None or stream.done or stream.answered_here:
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            return
        if padding:
            self.h2.acknowledge_received_data(padding, event.stream_id)
        stream.last_activity = self.last_activity
        stream.to_upstream += event.data
        if stream.upstream_id:
            self._pump_upstream(stream)

    def _request_ended(self, stream_id: int | None, trailers: Headers | None) -> None:
        stream = self.streams.get(stream_id or 0)
        if stream is None or stream.done:
            return
        stream.request_ended = True
        if trailers is not None:
            stream.request_trailers = trailers
        if stream.upstream_id:
            self._pump_upstream(stream)

    def _pump_upstream(self, stream: _Stream) -> None:
        """Send what the client sent, as far as the upstream's window allows; ack as sent."""
        upstream = stream.upstream
        assert upstream is not None
        connection = upstream.h2
        pending = stream.to_upstream
        try:
            while pending:
                size = min(
                    connection.local_flow_control_window(stream.upstream_id),
                    connection.max_outbound_frame_size,
                    len(pending),
                )
                if size <= 0:
                    return
                chunk = bytes(pending[:size])
                connection.send_data(stream.upstream_id, chunk)
                upstream.owed = True  # a stream whose request goes on is not finished
                del pending[:size]
                stream.last_activity = self.last_activity
                stream.record.bytes_from_client += size  # counted once it goes upstream
                kept = stream.kept
                if kept is not None and len(kept) + size <= REPLAY_LIMIT:
                    kept += chunk
                else:
                    self._let_go_of_kept(stream)
                    self.h2.acknowledge_received_data(size, stream.client_id)
            if stream.request_ended and not stream.end_sent:
                stream.end_sent = upstream.owed = True
                if stream.request_trailers is not None:
                    trailers = stream.request_trailers
                    connection.send_headers(stream.upstream_id, trailers, end_stream=True)
                else:
                    connection.end_stream(stream.upstream_id)
                self._free_slot_if_closed(stream)
        except h2.exceptions.StreamClosedError:
            return

    def _let_go_of_kept(self, stream: _Stream) -> None:
        """The body kept to send the stream again is not needed (its answer began, it
        ended) or past REPLAY_LIMIT: acknowledged to the client, which may send more."""
        kept, stream.kept = stream.kept, None
        if kept:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.acknowledge_received_data(len(kept), stream.client_id)

    def _client_window_opened(self, stream_id: int | None) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._pump_client(stream)
            return
        for stream in list(self.streams.values()):
            if stream.to_client or stream.response_ended:
                self._pump_client(stream)

    def _malformed(self, stream: _Stream, problem: str) -> None:
        """A malformed request (RFC 9113 8.1.1): a stream error, RST_STREAM PROTOCOL_ERROR,
        counted as HTTP/1 counts a bad request; the other streams carry on. What went
        upstream of it (headers before bad trailers) is cancelled there."""
        log.info("%s: bad h2 request: %s", self.flow.record.client, problem)
        self._client_cancelled(stream)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.reset_stream(stream.client_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self._finish_stream(stream, "bad_request")

    def _malformed_frame(self, event: MalformedMessage) -> None:
        """A request h2 found malformed, its stream already reset. A head refused before the
        proxy read it (a bad content-length) is counted under the connection's decision,
        as HTTP/1 counts a head it cannot parse. A bad body (or, in _client_event, bad
        trailers) ending a stream the proxy took on is the client's reset by other means
        (MadeYouReset, CVE-2025-8671), and counted as one."""
        stream = self.streams.get(event.stream_id)
        if event.head:
            record = RequestRecord.unread(self.flow.record, "h2")
            stream = _Stream(event.stream_id, record, [], self.last_activity)
            self.streams[event.stream_id] = stream
        if stream is not None:
            self._malformed(stream, event.reason)
            if not event.head:
                self._count_premature_reset(stream)

    def _client_reset(self, stream_id: int | None) -> None:
        stream = self.streams.get(stream_id or 0)
        if stream is not None:
            self._reset_by_client(stream)

    def _reset_by_client(self, stream: _Stream) -> None:
        """The client reset the stream: on its RST_STREAM's event, or found closed in h2
        before that event came, when sending on it (the event then finds it gone)."""
        self._client_cancelled(stream)
        self._finish_stream(stream, "reset")
        self._count_premature_reset(stream)

    def _count_premature_reset(self, stream: _Stream) -> None:
        """A stream the client ended before its answer began: within PREMATURE_RESET_SECONDS
        it counts against STREAMS_BEFORE_RESETS_COUNT, unless its gRPC deadline ran out."""
        lived = time.monotonic() - stream.record.started
        if (
            not stream.response_started
            and lived < PREMATURE_RESET_SECONDS
            and not deadline_ran_out(stream.headers, lived)
        ):
            self.premature_resets += 1
            if (
                self.streams_opened >= STREAMS_BEFORE_RESETS_COUNT
                and self.premature_resets * 2 > self.streams_opened
            ):
                self._flooded("streams reset as soon as opened")

    def _client_cancelled(self, stream: _Stream) -> None:
        """The client ended the stream before its answer did: its upstream twin is
        cancelled, and the stream slot it held on that upstream goes to one waiting."""
        upstream = stream.upstream
        self._cancel_upstream(stream)
        if upstream is not None:
            self._open_waiting(upstream)

    def _cancel_upstream(self, stream: _Stream) -> None:
        """The stream will not be finished: its upstream twin is cancelled (or, not yet
        opened, no longer waits). A twin already closed needs no reset, and neither does
        one on an upstream h2 has failed (it refuses every frame from then on, and the
        connection is being cut)."""
        upstream = stream.upstream
        if upstream is None:
            return
        if stream.upstream_id:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                upstream.h2.reset_stream(stream.upstream_id, h2.errors.ErrorCodes.CANCEL)
                upstream.owed = True
            upstream.streams.pop(stream.upstream_id, None)
        elif stream in upstream.waiting:
            upstream.waiting.remove(stream)

    # ---- upstream side -------------------------------------------------------------

    def upstream_data(self, upstream: _Upstream, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.flow.record.bytes_from_upstream += len(data)
        try:
            events, goaways = receive(upstream.h2, upstream.goaways, data)
        except h2.exceptions.ProtocolError as error:
            log.info("%s: bad h2 from %s:%s: %s", self.flow.record.client, *upstream.key, error)
            upstream.flush()
            self._cut_upstream(upstream, "bad_response")
            return
        if goaways:  # no stream is opened on it from now on (RFC 9113 6.8), though one of
            self._retire(upstream)  # the frames read with the GOAWAY frees a slot
        for event in events:
            self._upstream_event(upstream, event)
        if upstream in self.full_upstreams and upstream.answers_unread.flooding(
            events, upstream.h2
        ):
            log.warning("%s: h2 answer flood from %s:%s", self.flow.record.client, *upstream.key)
            self._cut_upstream(upstream, "flood")
            return
        for goaway in goaways:
            self._upstream_goaway(upstream, goaway.last_stream_id)
        self._flush()

    def _upstream_event(self, upstream: _Upstream, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = upstream.streams.get(event.stream_id or 0)
            if stream is None or stream.done or stream.upstream_window is None:
                return  # its connection window goes back in upstream.flush
            assert event.data is not None
            size, now = event.flow_controlled_length or 0, self.last_activity
            stream.last_activity = now
            stream.upstream_window.received(size, len(event.data), now)
            stream.record.bytes_from_upstream += len(event.data)
            stream.to_client += event.data
            self._pump_client(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = upstream.streams.get(event.stream_id or 0)
            if stream is not None and not stream.done:
                stream.last_activity = self.last_activity
                headers: Headers = list(event.headers or [])
                self._response_started(upstream, stream, headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream = upstream.streams.get(event.stream_id or 0)
            if stream is not None and not stream.done:
                stream.last_activity = self.last_activity
                headers = list(event.headers or [])
                if (b":status", b"101") in headers:  # RFC 9113 8.6: none in HTTP/2
                    self._malformed_response(upstream, stream, "a 101 response")
                    return
                self.h2.send_headers(stream.client_id, headers)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = upstream.streams.get(event.stream_id or 0)
            if stream is not None and not stream.done:
                stream.response_trailers = list(event.headers or [])
                self._response_ended(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = upstream.streams.get(event.stream_id or 0)
            if stream is not None and not stream.done:
                self._response_ended(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = upstream.streams.pop(event.stream_id or 0, None)
            if stream is not None and not stream.done:
                code = event.error_code
                if not event.remote_reset:  # h2's own reset: the upstream's fault, not the client's
                    code = h2.errors.ErrorCodes.INTERNAL_ERROR
                if stream.response_ended:  # RFC 9113 8.1: the answer stands
                    self._detach_answered(stream)
                    self._open_waiting(upstream)
                elif code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    self._refused(stream, upstream.key)
                else:
                    self._upstream_reset(stream, code)
                    self._open_waiting(upstream)
        elif isinstance(event, MalformedMessage):
            self._bad_response(upstream, event.stream_id, event.reason)
        elif isinstance(event, h2.events.WindowUpdated):
            streams = (
                [upstream.streams[event.stream_id]]
                if event.stream_id and event.stream_id in upstream.streams
                else list(upstream.streams.values())
            )
            for stream in streams:
                self._pump_upstream(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            upstream.settled = True
            self._open_waiting(upstream)
            for stream in list(upstream.streams.values()):  # a larger initial window
                self._pump_upstream(stream)

    def _response_ended(self, stream: _Stream) -> None:
        """The upstream's answer is all in."""
        stream.response_ended = True
        if stream.upstream_window is not None:
            stream.upstream_window.end()
        self._pump_client(stream)
        self._free_slot_if_closed(stream)

    def _free_slot_if_closed(self, stream: _Stream) -> None:
        """With the request sent whole and the answer all in (whichever came last), the
        stream is closed upstream: its slot goes to a stream waiting for one now, not once
        the client has taken the answer (which it may do only after that other one's)."""
        upstream = stream.upstream
        if stream.end_sent and stream.response_ended and upstream is not None and not stream.done:
            self._open_waiting(upstream)

    def _upstream_goaway(self, upstream: _Upstream, last_stream_id: int) -> None:
        """The upstream takes no new stream: those up to last_stream_id finish on it, the
        ones it did not process (above it) and those still waiting for it go elsewhere,
        once (_refused): an upstream that says GOAWAY before it takes any stream would
        else have them open connection after connection without end."""
        self._retire(upstream)
        waiting = list(upstream.waiting)
        upstream.waiting.clear()
        unprocessed = [s for up_id, s in upstream.streams.items() if up_id > last_stream_id]
        for stream in unprocessed:
            del upstream.streams[stream.upstream_id]
        for stream in [*waiting, *unprocessed]:
            if not stream.done:
                self._refused(stream, upstream.key)

    def _retire(self, upstream: _Upstream) -> None:
        """New streams go to another connection; this one's finish on it."""
        if self.upstreams.get(upstream.key) is upstream:
            del self.upstreams[upstream.key]
        self.retired.add(upstream)
        upstream.went_away = True

    def _response_started(
        self, upstream: _Upstream, stream: _Stream, headers: Headers, ended: bool
    ) -> None:
        status = next((value for name, value in headers if name == b":status"), b"")
        if not FINAL_STATUS.fullmatch(status):  # h2 took it for a final status, not 1xx
            self._malformed_response(upstream, stream, f"malformed :status {status!r}")
            return
        if ended and status not in (b"204", b"304") and stream.record.method != "HEAD":
            length = next((value for name, value in headers if name == b"content-length"), b"0")
            if length.lstrip(b"0"):  # RFC 9113 8.1.1: a body it says it has is missing
                self._malformed_response(upstream, stream, f"content-length {length!r}, no body")
                return
        stream.response_started = True
        self._let_go_of_kept(stream)
        stream.record.status = int(status)
        grpc_status = grpc_status_of(headers)
        if grpc_status is not None:
            stream.record.grpc_status = grpc_status
        self.h2.send_headers(stream.client_id, headers, end_stream=ended)
        if ended:
            self._stream_complete(stream)

    def _malformed_response(self, upstream: _Upstream, stream: _Stream, reason: str) -> None:
        """A response head we found malformed: its stream is reset upstream, and fails."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            upstream.h2.reset_stream(stream.upstream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            upstream.owed = True
        self._bad_response(upstream, stream.upstream_id, reason)

    def _bad_response(self, upstream: _Upstream, upstream_id: int, reason: str) -> None:
        """A response h2 or we found malformed: its stream alone fails, as bad_response."""
        stream = upstream.streams.pop(upstream_id, None)
        if stream is not None and not stream.done:
            client = self.flow.record.client
            log.info("%s: bad h2 response from %s:%s: %s", client, *upstream.key, reason)
            self._upstream_reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR, "bad_response")
            self._open_waiting(upstream)  # its slot is free: the stream is reset both ways

    def _refused(self, stream: _Stream, key: tuple[str, int]) -> None:
        """The upstream did not process the stream (RST_STREAM REFUSED_STREAM, above its
        GOAWAY's last stream, or still waiting for it at its GOAWAY): sent again once, where
        a new stream would go, with what of its body was sent, if nothing of it is lost;
        else answered as a reset."""
        if not stream.replayable:
            self._upstream_reset(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream.retried = True
        stream.upstream_id, stream.end_sent = 0, False
        stream.to_upstream[:0] = stream.kept or b""
        stream.record.bytes_from_client -= len(stream.kept or b"")  # counted when sent again
        stream.kept = None  # sent again once only: acknowledged as it goes
        stream.close_upstream_window()
        self._forward(stream, key)

    def _upstream_reset(
        self, stream: _Stream, code: h2.errors.ErrorCodes | int, error: str = "reset"
    ) -> None:
        """Before a response: 502 (gRPC UNAVAILABLE), as HTTP/1 answers. After: the client
        stream is reset with the upstream's code, which says why (INTERNAL_ERROR, CANCEL).
        error: reset, or bad_response for a response h2 found malformed."""
        if not stream.response_started:
            self._answer(stream, 502, f"upstream {error}", error)
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.reset_stream(stream.client_id, code)
        self._finish_stream(stream, error)

    def _pump_client(self, stream: _Stream) -> None:
        """Send the upstream's data as far as the client's window allows; the upstream's
        window reopens as it goes."""
        pending = stream.to_client
        window = stream.upstream_window
        now = self.loop.time()
        try:
            while pending:
                size = min(
                    self.h2.local_flow_control_window(stream.client_id),
                    self.h2.max_outbound_frame_size,
                    len(pending),
                )
                if size <= 0:
                    break
                self.h2.send_data(stream.client_id, bytes(pending[:size]))
                del pending[:size]
                stream.last_activity = now
                if window is not None:
                    window.forwarded(size, now)
            self._reopen_upstream(stream)
            if stream.response_ended and not pending:
                if stream.response_trailers is not None:
                    self.h2.send_headers(
                        stream.client_id, stream.response_trailers, end_stream=True
                    )
                    # the status the client got: trailers it never got (it reset the
                    # stream, or the idle timeout cut it, first) leave UNKNOWN counted
                    status = grpc_status_of(stream.response_trailers)
                    if status is not None:
                        stream.record.grpc_status = status
                else:
                    self.h2.end_stream(stream.client_id)
                self._stream_complete(stream)
        except h2.exceptions.StreamClosedError:  # reset in the read that opened its window
            self._reset_by_client(stream)

    def _reopen_upstream(self, stream: _Stream) -> None:
        """The WINDOW_UPDATE its upstream window is due, if any (h2_windows). None goes
        to a twin h2 has reset and forgotten already (a malformed response whose events
        are still being read), nor on a connection h2 has closed."""
        window, upstream = stream.upstream_window, stream.upstream
        if window is None or upstream is None or not upstream.may_write():
            return
        increment = window.increment()
        if increment and stream.upstream_id in upstream.h2.streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                upstream.h2.increment_flow_control_window(increment, stream.upstream_id)
                upstream.owed = True

    def _stream_complete(self, stream: _Stream) -> None:
        upstream = stream.upstream
        if upstream is not None:
            if not stream.end_sent and stream.upstream_id:  # answered before the request ended
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    upstream.h2.reset_stream(stream.upstream_id, h2.errors.ErrorCodes.NO_ERROR)
                    upstream.owed = True
                upstream.flush()
            upstream.streams.pop(stream.upstream_id, None)
            self._open_waiting(upstream)
        if not stream.request_ended:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(stream.client_id, h2.errors.ErrorCodes.NO_ERROR)
        self._finish_stream(stream, "")

    def _finish_stream(self, stream: _Stream, error: str) -> None:
        if stream.done:
            return
        stream.done = True
        if stream.to_client and not stream.own_answer:  # counted as it came, never sent
            stream.record.bytes_from_upstream -= len(stream.to_client)
        self._give_back_windows(stream)
        self.streams.pop(stream.client_id, None)
        stream.record.error = stream.record.error or error
        self.flow.record.requests += 1
        self.accounting.request_finished(stream.record)
        if not self.streams and (self.goaway_sent or self.flow.context.draining):
            self._goaway()
            self._close()

    def _give_back_windows(self, stream: _Stream) -> None:
        """Bytes a stream held that will never be sent on: acknowledged to whoever sent
        them, or their connection's window would shrink by them for good."""
        upstream = stream.upstream
        stream.close_upstream_window()
        self._let_go_of_kept(stream)
        if stream.to_client and upstream is not None:
            stream.to_client.clear()
            upstream.flush()
        if stream.to_upstream:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.acknowledge_received_data(len(stream.to_upstream), stream.client_id)
            stream.to_upstream.clear()

    def upstream_full(self, upstream: _Upstream, full: bool) -> None:
        was_full = bool(self.full_upstreams)
        if full:
            self.full_upstreams.add(upstream)
        else:
            self.full_upstreams.discard(upstream)
            upstream.answers_unread.count = 0
        if was_full != bool(self.full_upstreams) and not self.closed:
            if full:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _cut_upstream(self, upstream: _Upstream, failure: str) -> None:
        """h2 has closed the upstream's connection: it is lost now, not when its transport
        says so on a later turn of the loop, so that no client frame read meanwhile is
        sent to it (h2 would refuse that with a ProtocolError)."""
        upstream.fail(failure)
        self.upstream_lost(upstream, failure)

    def upstream_lost(self, upstream: _Upstream, error: str) -> None:
        """Its streams fail, but for those that waited for one of the stream slots of a
        working connection (it said its SETTINGS): never sent, they go to a new connection,
        once (_refused)."""
        self._give_back(upstream)
        self.upstream_full(upstream, False)
        self._forget(upstream)
        if not self.closed:
            resent = [s for s in upstream.waiting if s.replayable] if upstream.settled else []
            for stream in resent:
                upstream.waiting.remove(stream)
            self._fail_streams(upstream, error)
            for stream in resent:
                if not stream.done:
                    self._refused(stream, upstream.key)
            self._flush()

    # ---- connection ----------------------------------------------------------------

    def _flush(self) -> None:
        if self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        for upstream in self._all_upstreams():
            upstream.flush()
        finishing = self._all_upstreams() if self.goaway_sent else self.retired
        for upstream in [
            upstream
            for upstream in finishing
            if not upstream.streams and not upstream.waiting and upstream.transport is not None
        ]:
            self._forget(upstream)
            upstream.close()

    def _all_upstreams(self) -> list[_Upstream]:
        return [*self.upstreams.values(), *self.retired]

    def _forget(self, upstream: _Upstream) -> None:
        """No stream goes to this upstream any more."""
        if self.upstreams.get(upstream.key) is upstream:
            del self.upstreams[upstream.key]
        self.retired.discard(upstream)

    def _cut_streams(self) -> None:
        """The client's connection ended, or can carry no more answers: the streams in
        flight are cancelled upstream, each counted once with the cause ("drain" when the
        drain timeout cut it), and every upstream connection is closed."""
        cut = self.flow.record.error or "reset"
        for stream in list(self.streams.values()):
            self._cancel_upstream(stream)
            self._finish_stream(stream, cut)
        for task in [*self.connecting.values(), *self.verifying]:
            task.cancel()
        for upstream in self._all_upstreams():
            if upstream.transport is None:  # a connect cancelled before it ever ran
                self._give_back(upstream)  # has no finally to do it
            upstream.close()
        self.upstreams.clear()
        self.retired.clear()

    def _goaway(self) -> None:
        """No new stream is taken. With streams in flight the GOAWAY frame is written past
        h2, whose close_connection() would forbid answering them; a stream the client opens
        after it is refused (REFUSED_STREAM: the client may retry it elsewhere)."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        if not self.streams:
            self.h2.close_connection()
            return
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._flush()
        self.transport.write(frame.serialize())

    def _close(self) -> None:
        """Close once what is written has gone out. Nothing more will: the streams still in
        flight are cut and the upstreams closed now, not when the client has read the rest.

        A client that has not sent its EOF gets our FIN after the rest, and is read (what
        it sends dropped) until it closes too or all that was written has left the proxy
        (_close_once_sent): closed with its bytes unread (the WINDOW_UPDATEs that follow
        the last DATA frames), the connection would be reset, and the reset drops what the
        socket has not sent yet, so a stream that finished in the drain lost its end. While
        bytes are still unsent the idle sweep stays on, as for HTTP/1: a client that stopped
        reading would otherwise hold the connection (its place against --max-connections)
        for ever."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        if self.head_timer is not None:
            self.head_timer.cancel()
        self._cut_streams()
        if self.flow.client_eof or not self.transport.can_write_eof():
            self.transport.close()
        else:
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self._close_once_sent)
        self.last_activity = self.loop.time()
        if not held_bytes(self.transport):
            self.flow.context.idle_sweep.discard(self)

    def _close_once_sent(self) -> None:
        """After our FIN: closed once every byte written has left the proxy (a reset then
        drops nothing), looked at again until then."""
        if self.transport.is_closing():
            return
        if held_bytes(self.transport):
            self.loop.call_later(LINGER_SECONDS, self._close_once_sent)
        else:
            self.transport.close()

    def tick(self) -> None:
        """The idle sweep's check, every quarter of --idle-timeout: no bytes either way for
        a whole timeout ends the connection with a GOAWAY; closing, none of the unsent
        bytes going out for a whole timeout cuts it. A stream none of whose bytes moved for
        a whole timeout times out alone (an upstream that took it and never answers, while
        PINGs or other streams keep the connection busy), as an HTTP/1 request does."""
        now = self.loop.time()
        timeout = self.settings.idle_timeout
        if quiet_for(self, held_bytes(self.transport), now) < timeout:
            quiet = [s for s in self.streams.values() if now - s.last_activity >= timeout]
            for stream in quiet:
                upstream = stream.upstream
                self._timed_out(stream)
                if upstream is not None:  # its slot goes to one waiting
                    self._open_waiting(upstream)
            if quiet:
                self._flush()
            return
        if self.closed:
            log.info(
                "%s: closing, nothing read for %ss",
                self.flow.record.client,
                self.settings.idle_timeout,
            )
            self.error = self.error or "idle_timeout"
            self.transport.abort()
            return
        self.error = "idle_timeout"
        for stream in list(self.streams.values()):
            self._timed_out(stream)
        self._goaway()
        self._flush()
        self.transport.abort()

    def _timed_out(self, stream: _Stream) -> None:
        """A stream still waiting when it, or its whole connection, went idle: 504 (gRPC:
        UNAVAILABLE), as HTTP/1 answers, or a reset once its response has begun."""
        if stream.done:
            return
        self._cancel_upstream(stream)
        if stream.response_started:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(stream.client_id, h2.errors.ErrorCodes.CANCEL)
            self._finish_stream(stream, "idle_timeout")
        else:
            self._answer(stream, 504, "upstream idle_timeout", "idle_timeout")
