"""One structured line per TCP/TLS connection or HTTP request, and the process's log output.

Every line, access lines included, goes through a queue to one thread that
formats and writes it to stderr, so a slow or blocked stderr never stalls the
event loop. An access line costs the loop only a level check and a queue put:
the finished record goes to the writer as it is (records are final once
reported), and the fields, the timestamp and the text are made there; logging's
LogRecord machinery is for diagnostics only. Admin requests (/metrics scrapes
too) are never access-logged.

A stderr that takes nothing (a pipe nobody reads) costs bounded memory and
never keeps the process from exiting: past MAX_PENDING_LINES waiting, lines are
dropped and their number is written once stderr takes lines again, and at exit
the writer is given up on after STOP_PATIENCE without progress.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import os
import queue
import re
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from logging.handlers import QueueHandler
from typing import TextIO

from egressproxy.policy.decision import GRPC_PROTOCOL, Action, Decision, Destination
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import LogFormat, Settings, host_port

ACCESS_LOGGER = "egressproxy.access"
ACCESS_ENTRY = "access"
"""The LogRecord attribute holding an access line's record and duration."""

_TEXT_SPECIAL = re.compile(r'[ "=\\]')
"""Characters that make a text value ambiguous unless quoted (so do unprintable ones)."""

AccessEntry = tuple[FlowRecord | RequestRecord, float, float]
"""A finished record, the wall-clock time it finished and its duration: one access line."""


def decision_word(decision: Decision | None) -> str:
    """allow, deny, route or would_deny (an audited denial that let the traffic pass)."""
    if decision is None:
        return ""
    if decision.action is Action.DENY:
        return "would_deny" if decision.audit else "deny"
    if decision.action is Action.ROUTE:
        return "route"
    return "allow"


def route_text(decision: Decision | None) -> str:
    """kind/namespace/name of the route (kind/name when it has no namespace)."""
    if decision is None or decision.route is None:
        return ""
    route = decision.route
    return "/".join(part for part in (route.kind, route.namespace, route.name) if part)


def address_text(destination: Destination | None) -> str:
    if destination is None:
        return ""
    return host_port(destination.host, destination.port)


CONNECTION_KEYS = (
    "client",
    "destination",
    "protocol",
    "hostname",
    "ech",
    "route",
    "decision",
    "status",
    "error",
    "bytes_sent",
    "bytes_received",
    "duration",
)
REQUEST_KEYS = (
    "client",
    "destination",
    "protocol",
    "hostname",
    "route",
    "decision",
    "method",
    "path",
    "status",
    "error",
    "bytes_sent",
    "bytes_received",
    "duration",
)
DECIDED_KEYS = frozenset({"destination", "protocol", "hostname", "ech", "route", "decision"})
"""The fields that follow the client and stay the same for every line of one destination,
hostname and decision: written once into a remembered text (LineFormatter.decided_text)."""
MAX_REMEMBERED_TEXTS = 4096
"""Per formatter: how many texts of each kind (DECIDED_KEYS, a request line's head and
tail, words) it keeps."""
REQUEST_TEMPLATES = {
    False: (
        "%s access %s path=%s %s bytes_sent=%d bytes_received=%d duration=%.6f",
        "client={} {} method={}",
        "status={} error={}",
    ),
    True: (
        '{"time":"%s","log":"access",%s,"path":%s,%s,"bytes_sent":%d,"bytes_received":%d,'
        '"duration":%.6f}',
        '"client":{},{},"method":{}',
        '"status":{},"error":{}',
    ),
}
"""By json: a request line (REQUEST_KEYS in order: the time, the remembered head, the path,
the remembered tail, the counts and the duration), and the templates of its head (the
client, the DECIDED_KEYS text and the method) and its tail (the status and the error)."""


def _line_template(keys: tuple[str, ...], json_lines: bool) -> str:
    """A str.format template of the line: the time, the client, the DECIDED_KEYS text
    (_decided_template), then each other key's encoded value."""
    rest = tuple(key for key in keys if key not in DECIDED_KEYS and key != "client")
    if json_lines:
        fields = ",".join(f'"{key}":{{}}' for key in rest)
        return f'{{{{"time":"{{}}","log":"access","client":{{}},{{}},{fields}}}}}'
    fields = " ".join(f"{key}={{}}" for key in rest)
    return f"{{}} access client={{}} {{}} {fields}"


def _decided_template(keys: tuple[str, ...], json_lines: bool) -> str:
    """A str.format template of the DECIDED_KEYS text: each of its keys' values."""
    where = tuple(key for key in keys if key in DECIDED_KEYS)
    if json_lines:
        return ",".join(f'"{key}":{{}}' for key in where)
    return " ".join(f"{key}={{}}" for key in where)


class AccessLog:
    """Writes access lines (server.Reporting hands it the connections and requests).

    With the process's writer running (setup_logging), a line is handed to it as an
    AccessEntry. A logger given explicitly (tests, embedding) gets LogRecords instead.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self.to_writer = logger is None

    def connection_closed(self, record: FlowRecord) -> None:
        """An HTTP connection's requests have their lines; one that carried none (an h2
        protocol error, say) gets a line of its own."""
        if record.requests:
            return
        if self.logger.isEnabledFor(logging.INFO):
            self._write(record)

    def request_finished(self, record: RequestRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self._write(record)

    def _write(self, record: FlowRecord | RequestRecord) -> None:
        duration = time.monotonic() - record.started
        writer = _writer
        if self.to_writer and writer is not None:
            writer.put((record, time.time(), duration))
        else:
            self.logger.info("access", extra={ACCESS_ENTRY: (record, duration)})


def _text_value(text: str) -> str:
    """An empty value is a dash, so a value that is one is quoted, as ambiguous ones are."""
    if not text:
        return "-"
    if text.isprintable() and not _TEXT_SPECIAL.search(text) and text != "-":
        return text
    return json.dumps(text)


def _one_line(message: str) -> str:
    """A diagnostic's text with its unprintable characters escaped: it may quote a peer's
    bytes (h2's error for a header with a newline in it), which would otherwise start a
    line of their own, one that could pass for an access line, or write raw control bytes."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in message)


MILLISECOND_TEXTS = tuple(f".{millis:03d}Z" for millis in range(1000))

RequestHeadKey = tuple[str, int, int, str, str | None, str]
"""A request line's remembered head: the client, the ids of the destination and decision,
the protocol, the hostname and the method."""
DecidedKey = tuple[int, int, str, str | None, bool | None]
"""What a DECIDED_KEYS text is remembered by: the ids of its destination and decision,
the protocol, the hostname, and the ECH flag (None in request lines, which have none)."""


class LineFormatter(logging.Formatter):
    """One line per record, access lines and diagnostics alike, as text or JSON.

    An access line is one str.format of a template made once per record type, with
    every string value encoded for the format (quoted in text when needed, JSON
    string literals in JSON). What a line says about the destination, hostname and
    decision is remembered whole, and so are values with few distinct ones (methods,
    statuses, errors) and the current second's text: the data plane shares its
    destinations, the policy its decisions, and the requests of a connection, or the
    connections to one service, repeat them.
    """

    def __init__(self, log_format: LogFormat) -> None:
        super().__init__()
        self.json = log_format is LogFormat.JSON
        self.encode: Callable[[str], str] = encode_basestring_ascii if self.json else _text_value
        self.connection_template = _line_template(CONNECTION_KEYS, self.json)
        self.connection_decided = _decided_template(CONNECTION_KEYS, self.json)
        self.request_decided = _decided_template(REQUEST_KEYS, self.json)
        self.request_template, self.request_head_template, self.request_tail_template = (
            REQUEST_TEMPLATES[self.json]
        )
        self.decided: dict[DecidedKey, tuple[Destination | None, Decision | None, str]] = {}
        self.request_heads: dict[RequestHeadKey, tuple[Destination, Decision, str]] = {}
        self.request_tails: dict[tuple[int | None, str], str] = {}
        self.words: dict[str, str] = {}
        self.second = -1
        self.second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        entry: tuple[FlowRecord | RequestRecord, float] | None = getattr(record, ACCESS_ENTRY, None)
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if entry is not None:
            return self.access_line(entry[0], record.created, entry[1])
        time_text = self.timestamp(record.created)
        if self.json:
            document = {
                "time": time_text,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            }
            return json.dumps(document, separators=(",", ":"))
        return f"{time_text} {record.levelname} {record.name} {message}"

    def timestamp(self, created: float) -> str:
        """RFC 3339 in UTC with milliseconds, microseconds rounded first as datetime does.

        Lines come in bursts within one second, whose text is kept; a time within it is
        that second's text and its milliseconds (the fraction, created less the second, is
        exact: the two are within a factor of two of each other).
        """
        fraction = created - self.second
        if self.second >= 0 and 0.0 <= fraction < 1.0:
            micros = round(fraction * 1_000_000)
            if micros < 1_000_000:
                return self.second_text + MILLISECOND_TEXTS[micros // 1000]
        fraction, whole = math.modf(created)
        micros = round(fraction * 1_000_000)
        second = int(whole)
        if micros == 1_000_000:
            second, micros = second + 1, 0
        if second != self.second:
            self.second = second
            self.second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self.second_text + MILLISECOND_TEXTS[micros // 1000]

    def access_line(
        self, record: FlowRecord | RequestRecord, created: float, duration: float
    ) -> str:
        word = self.word
        if isinstance(record, RequestRecord):
            return self.request_line(record, created, duration)
        protocol = record.detected.value if record.detected else ""
        status = "" if record.status is None else str(record.status)
        return self.connection_template.format(
            self.timestamp(created),
            self.encode(record.client),
            self.decided_text(record, protocol, record.ech),
            word(status),
            word(record.error),
            record.bytes_from_client,
            record.bytes_from_upstream,
            f"{duration:.6f}",
        )

    def request_line(self, record: RequestRecord, created: float, duration: float) -> str:
        """Its client, destination, decision and method are remembered as one text (a
        connection's requests share them), and so are its status and error."""
        decision, destination = record.decision, record.destination
        if decision.protocol is GRPC_PROTOCOL:  # the metrics' family
            protocol, status = "grpc", record.grpc_status
        else:
            protocol, status = record.protocol, record.status
        key = (
            record.client,
            id(destination),
            id(decision),
            protocol,
            record.hostname,
            record.method,
        )
        head = self.request_heads.get(key)
        if head is None or head[0] is not destination or head[1] is not decision:
            if len(self.request_heads) >= MAX_REMEMBERED_TEXTS:
                self.request_heads.clear()
            text = self.request_head_template.format(
                self.encode(record.client),
                self.decided_text(record, protocol, None),
                self.word(record.method),
            )
            head = self.request_heads[key] = (destination, decision, text)
        tail = self.request_tails.get((status, record.error))
        if tail is None:
            if len(self.request_tails) >= MAX_REMEMBERED_TEXTS:
                self.request_tails.clear()
            status_text = "" if status is None else str(status)
            tail = self.request_tail_template.format(
                self.encode(status_text), self.encode(record.error)
            )
            self.request_tails[status, record.error] = tail
        return self.request_template % (
            self.timestamp(created),
            head[2],
            self.encode(record.path),
            tail,
            record.bytes_from_client,
            record.bytes_from_upstream,
            duration,
        )

    def decided_text(
        self, record: FlowRecord | RequestRecord, protocol: str, ech: bool | None
    ) -> str:
        """The DECIDED_KEYS fields, encoded; remembered by the ids of the destination and
        the decision, each checked to be the same object (an id outlives no object)."""
        destination, decision = record.destination, record.decision
        key = (id(destination), id(decision), protocol, record.hostname, ech)
        known = self.decided.get(key)
        if known is None or known[0] is not destination or known[1] is not decision:
            if len(self.decided) >= MAX_REMEMBERED_TEXTS:
                self.decided.clear()
            encode = self.encode
            texts = [encode(address_text(destination)), encode(protocol)]
            texts.append(encode(record.hostname or ""))
            if ech is not None:
                texts.append("true" if ech else "false")
            texts += (encode(route_text(decision)), encode(decision_word(decision)))
            template = self.connection_decided if ech is not None else self.request_decided
            known = self.decided[key] = (destination, decision, template.format(*texts))
        return known[2]

    def word(self, value: str) -> str:
        """A value of few distinct ones (method, status, error), encoded."""
        text = self.words.get(value)
        if text is None:
            if len(self.words) >= MAX_REMEMBERED_TEXTS:
                self.words.clear()
            text = self.words[value] = self.encode(value)
        return text


WRITER_BATCH = 4096
"""At most this many queued lines are taken at once and written with one syscall."""
WRITER_PAUSE = 0.01
WRITER_BUSY = 8
"""Lines taken at once that mean the loop is busy: the writer then rests WRITER_PAUSE
after each write, so lines gather into batches (which keeps it resting while the load
lasts) and the loop is not interrupted by a thread wake-up for every line it queues.
A quiet loop (a line or two at a time) gets its lines written at once."""


MAX_PENDING_LINES = 16_384
"""Lines waiting for the writer (about a second of a busy worker's requests, some
megabytes of records); past it, lines are dropped and counted rather than held."""
STOP_PATIENCE = 2.0
"""At exit the writer is waited for while it makes progress, and given up on after this
many seconds in which stderr took no byte."""
DROPS_LOGGER = "egressproxy.log"
LOCK_PATIENCE = STOP_PATIENCE
"""How long a writer waits for another process of the run to finish writing (the write
lock) before it writes unlocked: its lines stay whole up to PIPE_BUF even so."""
LOCK_RETRY = 0.002
WRITE_SLICE = 64 * 1024
"""Bytes written at most at once: a write returns, and counts as progress, as a slow
reader takes each slice, not only once it took the whole batch."""


class _Stop:
    """Queued by stop(): the writer ends after the lines queued before it."""


QueueItem = logging.LogRecord | AccessEntry | _Stop


class LineWriter:
    """The thread that formats and writes every line, in the order they were queued.

    It writes with os.write on stderr's descriptor, so a write stuck on a stderr nobody
    reads holds no lock of Python's: neither logging's shutdown nor the interpreter's
    last flush of sys.stderr then waits for it (the interpreter would abort).
    """

    def __init__(self, stream: TextIO, formatter: LineFormatter, *, shared: bool = False) -> None:
        """shared: other processes (the workers of --workers N) write to the same stream."""
        self.queue: queue.SimpleQueue[QueueItem] = queue.SimpleQueue()
        self.stream = stream
        self.descriptor = _descriptor(stream)
        self.whole_lines = shared
        """Write whole lines only, at most line_slice bytes at once: another process's
        lines would land in the middle of ours between two writes of a line."""
        self.line_slice = WRITE_SLICE if _is_regular_file(self.descriptor) else select.PIPE_BUF
        """A write to a pipe or a stream socket (a container's stderr, journald's) or a
        terminal is atomic only up to PIPE_BUF; one to a regular file (`2>>proxy.log`),
        whole."""
        self.write_lock: tuple[str, int, int] | None = None
        """(path, opened by, descriptor) of the file the processes of the run hold locked
        (flock) while they write (share_writes): a line longer than PIPE_BUF is written
        in pieces, between which another process's lines would land."""
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.formatter = formatter
        self.thread: threading.Thread | None = None
        self.dropped = 0
        self.drop_lock = threading.Lock()
        self.writes = 0
        """os.write calls returned, written or failed: what stop() watches for progress. A
        batch can be a megabyte, which a slow reader (journald under load) takes for
        longer than STOP_PATIENCE while taking bytes all along (WRITE_SLICE)."""

    def put(self, item: QueueItem) -> None:
        if self.queue.qsize() < MAX_PENDING_LINES:
            self.queue.put(item)
            return
        with self.drop_lock:
            self.dropped += 1

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="egressproxy-log-writer", daemon=True)
        self.thread.start()

    def stop(self, patience: float | None = None) -> None:
        """Write out everything queued so far, then end the thread. With patience, give up
        on a writer whose stderr took nothing for that many seconds (the thread is a
        daemon: it ends with the process)."""
        thread = self.thread
        if thread is None:
            return
        self.thread = None
        self.queue.put(_Stop())
        writes = -1
        while thread.is_alive() and self.writes != writes:
            writes = self.writes
            thread.join(patience)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < WRITER_BATCH and not isinstance(batch[-1], _Stop):
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines: list[str] = []
            for item in batch:
                if isinstance(item, _Stop):
                    self._write(lines)
                    return
                if isinstance(item, logging.LogRecord):
                    lines.append(self._diagnostic_line(item))
                else:
                    record, created, duration = item
                    lines.append(self.formatter.access_line(record, created, duration))
            self._write(lines)
            if self.dropped:
                self._write([self._drops_line()])
            if len(batch) >= WRITER_BUSY:
                time.sleep(WRITER_PAUSE)

    def _diagnostic_line(self, record: logging.LogRecord) -> str:
        try:
            return self.formatter.format(record)
        except Exception:  # a bad record (its arguments do not fit its message)
            return self._own_line(
                record.name,
                logging.ERROR,
                "unformattable log message %r with arguments %r",
                (record.msg, record.args),
            )

    def _drops_line(self) -> str:
        with self.drop_lock:
            dropped, self.dropped = self.dropped, 0
        return self._own_line(
            DROPS_LOGGER,
            logging.WARNING,
            "%d log lines were dropped: %d were already waiting for stderr",
            (dropped, MAX_PENDING_LINES),
        )

    def _own_line(self, logger: str, level: int, message: str, args: tuple[object, ...]) -> str:
        """A line the writer says itself, shaped as any diagnostic."""
        record = logging.LogRecord(logger, level, __file__, 0, message, args, None)
        return self.formatter.format(record)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        try:
            if self.descriptor is None:
                self.stream.write(text)
                self.stream.flush()
                return
            encoded = text.encode(self.encoding, "backslashreplace")
            if not self.whole_lines:
                self._write_out(encoded)
                return
            lock = self._lock_descriptor()
            if lock is not None and not self._take_turn(lock):
                lock = None
            try:
                for chunk in _line_chunks(encoded, self.line_slice):
                    self._write_out(chunk)
            finally:
                if lock is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except (OSError, ValueError):
            # stderr is closed or broken: there is nowhere left to report that to.
            return
        finally:
            self.writes += 1

    def _write_out(self, data: bytes) -> None:
        assert self.descriptor is not None
        rest = memoryview(data)
        while rest:
            try:
                rest = rest[os.write(self.descriptor, rest[:WRITE_SLICE]) :]
            except BlockingIOError:
                # Another process sharing stderr's open file made it non-blocking: a full
                # pipe is a wait, not a broken stderr (dropping the rest of the batch cut
                # a line, and counted nothing).
                select.select([], [self.descriptor], [])
            finally:
                self.writes += 1

    def _take_turn(self, lock: int) -> bool:
        """Wait for the write lock, at most LOCK_PATIENCE. Each try counts as progress:
        stop() must not give up on a writer whose turn waits for another's writes to a
        slow stderr, which are progress too."""
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                self.writes += 1
                time.sleep(LOCK_RETRY)
            except OSError:  # no lock to be had (ENOLCK): the lines go out all the same
                return False

    def _lock_descriptor(self) -> int | None:
        """This process's own descriptor of the write lock (each opens the file itself: the
        processes would share the lock of one inherited open file); None without one."""
        if self.write_lock is None:
            return None
        path, opened_by, descriptor = self.write_lock
        if opened_by != os.getpid():
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
            self.write_lock = (path, os.getpid(), descriptor)
        return descriptor


def _is_regular_file(descriptor: int | None) -> bool:
    if descriptor is None:
        return False
    try:
        mode = os.fstat(descriptor).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode)


def _line_chunks(data: bytes, limit: int) -> list[bytes]:
    """data (whole lines) cut at line ends into pieces of at most limit bytes; a longer
    line is a piece of its own."""
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + limit) + 1
        if end <= start:  # one line longer than limit
            end = data.find(b"\n", start) + 1 or len(data)
        chunks.append(data[start:end])
        start = end
    return chunks


def _descriptor(stream: TextIO) -> int | None:
    """The descriptor under a real stderr, flushed of what Python buffered; None for a
    stream of Python's only (a test's StringIO)."""
    try:
        descriptor = stream.fileno()
        stream.flush()
    except (AttributeError, OSError, ValueError):
        return None
    return descriptor


class _ToWriter(QueueHandler):
    """Hands diagnostics to the writer, which bounds what waits."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__(writer.queue)
        self.writer = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """As QueueHandler's (the message made, a traceback appended), a text message made
        one line first: see _one_line."""
        message = record.getMessage()
        if not self.writer.formatter.json and not message.isprintable():
            record = copy.copy(record)
            record.msg, record.args = _one_line(message), None
        prepared: logging.LogRecord = super().prepare(record)
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        self.writer.put(record)


_writer: LineWriter | None = None
_fork_hooks_registered = False


QUIET_LIBRARIES = ("hpack",)
"""Loggers kept at INFO or above whatever --log-level says: at DEBUG, hpack writes every
header it decodes or encodes, Authorization and Cookie values too, a line each."""


def setup_logging(settings: Settings) -> None:
    """Route every log record and access line through a queue to a writer thread."""
    global _writer, _fork_hooks_registered
    shutdown_logging()
    formatter = LineFormatter(settings.log_format)
    writer = LineWriter(sys.stderr, formatter, shared=settings.workers > 1)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_ToWriter(writer))
    root.setLevel(settings.log_level.upper())
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(max(logging.INFO, root.level))
    writer.start()
    _writer = writer
    if not _fork_hooks_registered:
        # A writer thread does not survive fork(), and one caught holding
        # stderr's lock would hang the child: stop it around every fork.
        os.register_at_fork(
            before=_pause_writer, after_in_parent=_resume_writer, after_in_child=_resume_writer
        )
        _fork_hooks_registered = True


def share_writes(lock_path: str) -> None:
    """The processes of this run (the supervisor and the workers it forks) take turns at
    stderr, holding the file at lock_path locked while they write."""
    if _writer is not None and _writer.whole_lines:
        _writer.write_lock = (lock_path, 0, -1)


def shutdown_logging() -> None:
    """Write out every queued line stderr takes, and stop the writer thread."""
    global _writer
    if _writer is not None:
        _writer.stop(STOP_PATIENCE)
        _writer = None


def _pause_writer() -> None:
    if _writer is not None:
        _writer.stop()


def _resume_writer() -> None:
    if _writer is not None:
        _writer.start()
