"""Lean HTTP/1.1 heads for the common exchange; everything else is left to h11.

h11 costs tens of microseconds per message, and most keep-alive traffic is a bodiless
request answered with a Content-Length response. These parsers accept exactly that, with
h11's own grammar, and answer None for anything else so that h11 handles it (and its
errors); tests/unit/test_http1_lean.py proves that what they accept h11 reads the same.

A head written the way h11 writes one (`Name: value` lines, nothing to tidy) is checked
by one regular expression over the whole head; only other heads are taken apart line by
line. Both ways share the reading of the fields that matter.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import NamedTuple

from h11 import _abnf, _readers


class Incomplete(enum.Enum):
    NEED_MORE = "need more"


NEED_MORE = Incomplete.NEED_MORE
MAX_RESPONSE_HEAD = 65536
"""A longer response head is h11's to judge."""

_REQUEST_LINE = re.compile(_abnf.request_line.encode("ascii"))
_STATUS_LINE = re.compile(_abnf.status_line.encode("ascii"))
HEADER_FIELD = re.compile(
    rb"(?P<field_name>%s):[ \t]*+(?P<field_value>%s)[ \t]*"
    % (_abnf.field_name.encode("ascii"), _abnf.field_value.encode("ascii"))
)
"""h11's header_field with its first OWS possessive: the same fields (a value never starts
with whitespace), but h11's own pattern tries an empty value's whitespace split every way
between its two OWS: 9 s on the event loop for one 60 KiB field line that fails to match.
h11 is given this one too, for every head and trailer it reads (requests the lean parsers
leave to it, and upstream responses)."""
_readers.header_field_re = HEADER_FIELD
MAX_LENGTH_DIGITS = 18
_TIDY_FIELD = _abnf.field_name.encode("ascii") + rb"+:(?: [!-\xff][ -\xff]*+(?<! )| )\r\n"
"""`Name: value` as h11 writes it, said narrower than h11's grammar so that the regex engine
reads it fast: the value is a visible byte (or obs-text), then visible bytes and spaces, up to
a last byte that is no space. h11's field_value (`[^\\x00\\s]+` words joined by spaces and
tabs) takes every such value; a value with a tab or a control byte in it is not tidy and is
read line by line instead. Each class is one byte range, the cheapest test per byte, and the
name (h11's `token+`, made `token++`) and the run are possessive, so the engine never backs
into them. An empty value is the second branch, not an optional group: the group costs a
fifth more, and Python 3.11.2's possessive `(?:…)?+` accepts a value that ends in a space
(the h11 agreement tests in tests/unit/test_http1_lean.py find that at once)."""
_TIDY_LINE = rb"(%s+) ([\x21-\x7e]++) HTTP/1\.1\r\n" % _abnf.method.encode("ascii")
_TIDY_REQUEST = re.compile(rb"%s((?:%s)*+)\r\n" % (_TIDY_LINE, _TIDY_FIELD))
_TIDY_REQUEST_LINE = re.compile(_TIDY_LINE)
"""_TIDY_REQUEST's request line alone (parse_request_like)."""
_TIDY_RESPONSE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [ -\xff]*+\r\n(?:%s)*+\r\n" % _TIDY_FIELD)
"""h11's status line with a reason (maybe empty, without tabs or control bytes) and tidy
fields."""
_FIELD_ITEM = re.compile(rb"(%s+): ([^\r]*+)\r\n" % _abnf.field_name.encode("ascii"))
"""The name and value of each line of fields already known to be tidy."""
_TIDY_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding|connection): ([^\r]*)")
"""The framing fields of a tidy head, found in its lower-cased copy."""
_REFUSED_REQUEST_HEADERS = frozenset((b"transfer-encoding", b"upgrade", b"expect"))


def is_grpc_content_type(value: str) -> bool:
    """gRPC's content-type (its HTTP/2 protocol spec): application/grpc, alone or with a
    +subtype or ;parameters, and gRPC-Web's application/grpc-web…; application/grpcx is
    some other type, whose request a gRPC rule must not take for a call."""
    kind = value.partition(";")[0].strip().lower()
    return kind == "application/grpc" or kind.startswith(
        ("application/grpc+", "application/grpc-web")
    )


class LeanRequest(NamedTuple):
    """A bodiless HTTP/1.1 request, the last of its connection or not."""

    method: bytes
    target: bytes
    headers: tuple[tuple[str, str], ...]
    """Lower-case names and values as latin-1 text, in order (RequestFacts' form)."""
    host: str
    grpc: bool
    head: bytes
    """The head as it goes upstream: h11's raw items written back as `Name: value`."""
    size: int
    """Bytes the head took in the buffer."""
    head_size: int
    """As http1.ParsedRequest.head_size."""
    close: bool
    """Connection: close: the client sends nothing after it (h11 refuses bytes that follow)."""


class LeanResponse(NamedTuple):
    """A final HTTP/1.1 response whose body length its head tells."""

    status: int
    head: bytes
    """The head as the client gets it (as http1.response_head writes h11's event)."""
    size: int
    body_length: int
    close: bool
    """Connection: close: neither the upstream nor the client connection is used again."""


def _head_lines(buffer: bytes, limit: int) -> tuple[list[bytes], int] | Incomplete | None:
    """The lines of a head ended by CRLF CRLF, where h11 would find the same lines."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > limit or b"\n\n" in buffer or b"\n\r\n" in buffer:
            return None
        if buffer and buffer[0] < 0x21:
            return None  # h11 refuses such a start line before it is complete
        return NEED_MORE
    if end + 4 > limit or end == 0:
        return None
    head = buffer[:end]
    if b"\n\r\n" in head or b"\n\n" in head:
        return None
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\n" in line:
            return None
    return lines, end + 4


def _untidy_head(
    buffer: bytes, limit: int, start_line: re.Pattern[bytes]
) -> tuple[re.Match[bytes], list[tuple[bytes, bytes]], list[bytes], int] | Incomplete | None:
    """A head taken apart line by line as h11 reads it: its HTTP/1.1 start line, the name
    and value of each field, each field line as h11 writes it, and the head's size."""
    found = _head_lines(buffer, limit)
    if found is None or isinstance(found, Incomplete):
        return found
    lines, size = found
    start = start_line.fullmatch(lines[0])
    if start is None or start["http_version"] != b"1.1":
        return None
    items: list[tuple[bytes, bytes]] = []
    written: list[bytes] = []
    for line in lines[1:]:
        field = HEADER_FIELD.fullmatch(line)
        if field is None:
            return None
        name, value = field["field_name"], field["field_value"]
        items.append((name, value))
        written.append(name + b": " + value)
    return start, items, written, size


def _is_length(value: bytes) -> bool:
    """A Content-Length h11 takes (its grammar is 1*DIGIT), short enough to be sane."""
    return value.isdigit() and len(value) <= MAX_LENGTH_DIGITS


def _says_close(value: bytes) -> bool:
    """A Connection header h11 reads as closing (a `close` token). The common keep-alive
    value is ruled out by one find, not `in`: `bytes in bytes` first tries its operand as
    an integer and formats and clears a TypeError every time (CPython's
    _Py_bytes_contains)."""
    lowered = value.lower()
    if lowered == b"close":  # what a closing client or server sends: no generator made
        return True
    if lowered.find(b"close") < 0:
        return False
    return any(token.strip(b" \t") == b"close" for token in lowered.split(b","))


def still_incomplete(buffer: bytes, scanned: int, limit: int) -> bool:
    """Whether buffer, whose first `scanned` bytes the parsers here found to be a head not
    yet whole (NEED_MORE), still is one. Only a line end can end a head, so one that comes
    a few bytes at a time need not be parsed again whole at every read: a 64 KiB head sent
    a byte at a time took 4.6 s of the worker's loop."""
    if not scanned or len(buffer) > limit:
        return False
    start = max(0, scanned - 2)
    return buffer.find(b"\n\n", start) < 0 and buffer.find(b"\n\r\n", start) < 0


def refused_request_line(buffer: bytes, scanned: int) -> bytes | None:
    """The first line of a head not yet whole, if it has just ended (after the first
    `scanned` bytes, found before to be no whole head) and is no request line h11 takes;
    else None. HTTP/0.9's `GET /path` is all its client sends: waiting for the rest of
    its head ran into the header timeout (408), where h11 answers such a line 400."""
    start = max(0, scanned - 1)
    end = buffer.find(b"\n", start)
    if end < 0 or (start and buffer.find(b"\n", 0, start) >= 0):
        return None  # not ended yet, or ended before and looked at then
    line = buffer[:end].removesuffix(b"\r")
    return line if _REQUEST_LINE.fullmatch(line) is None else None


def parse_request(buffer: bytes, limit: int) -> LeanRequest | Incomplete | None:
    """The request at the start of buffer, NEED_MORE, or None: h11's to handle."""
    tidy = _TIDY_REQUEST.match(buffer, 0, limit)
    if tidy is not None:
        method, target = tidy[1], tidy[2]
        size = tidy.end()
        fields_start = tidy.start(3)
        items = _FIELD_ITEM.findall(buffer, fields_start, size)
        head_size = len(method) + len(target) + 14 + size - 2 - fields_start
        return _request(buffer, method, target, items, buffer[:size], size, head_size, limit)
    untidy = _untidy_head(buffer, limit, _REQUEST_LINE)
    if untidy is None or isinstance(untidy, Incomplete):
        return untidy
    start, items, written, size = untidy
    method, target = start["method"], start["target"]
    head_size = len(method) + len(target) + 14 + sum(len(line) + 2 for line in written)
    head = b"\r\n".join([start[0], *written]) + b"\r\n\r\n"
    return _request(buffer, method, target, items, head, size, head_size, limit)


def field_lines(request: LeanRequest, raw: bytes) -> bytes:
    """The field lines and empty line of a request head that came as raw, when its head goes
    upstream as it came; else b"" (parse_request_like then never applies)."""
    if request.head != raw:
        return b""
    return raw[raw.index(b"\r\n") + 2 :]


def parse_request_like(
    buffer: bytes, like: LeanRequest, fields: bytes, limit: int
) -> LeanRequest | None:
    """parse_request's answer for a head made of a tidy request line and the field lines of
    the request like (field_lines(like, …)): only the request line is read. None: not such a
    head, or parse_request's to answer. fields must not be empty. A client's requests mostly
    share their fields."""
    line = _TIDY_REQUEST_LINE.match(buffer, 0, limit)
    if line is None:
        return None
    line_end = line.end()
    if not buffer.startswith(fields, line_end):
        return None
    method, target = line.groups()
    size = line_end + len(fields)
    head_size = len(method) + len(target) + 12 + len(fields)
    if method == b"CONNECT" or size > limit or head_size > limit or like.close:
        return None
    headers, host, grpc = like.headers, like.host, like.grpc
    return tuple.__new__(  # a C call, where LeanRequest(...) runs a Python __new__
        LeanRequest, (method, target, headers, host, grpc, buffer[:size], size, head_size, False)
    )


def _request(
    buffer: bytes,
    method: bytes,
    target: bytes,
    items: list[tuple[bytes, bytes]],
    head: bytes,
    size: int,
    head_size: int,
    limit: int,
) -> LeanRequest | None:
    """The request the parsed head makes, if it is one the lean path can take."""
    if method == b"CONNECT":
        return None
    host: str | None = None
    grpc = False
    close = False
    content_length = False
    headers: list[tuple[str, str]] = []
    for name, value in items:
        lower = name.lower()
        text_value = value.decode("latin-1")
        if lower == b"host":
            if host is not None:
                return None
            host = text_value
        elif lower == b"content-length":
            if content_length or not _is_length(value) or int(value):
                return None
            content_length = True
        elif lower in _REFUSED_REQUEST_HEADERS:
            return None
        elif lower == b"connection":
            close = close or _says_close(value)
        elif lower == b"content-type":
            grpc = is_grpc_content_type(text_value)
        headers.append((lower.decode("latin-1"), text_value))
    if host is None or head_size > limit or (close and len(buffer) > size):
        return None
    return LeanRequest(method, target, tuple(headers), host, grpc, head, size, head_size, close)


def parse_response(buffer: bytes, request_method: bytes) -> LeanResponse | Incomplete | None:
    """The final response at the start of buffer, NEED_MORE, or None: h11's to handle."""
    tidy = _TIDY_RESPONSE.match(buffer, 0, MAX_RESPONSE_HEAD)
    if tidy is not None:
        size = tidy.end()
        head = buffer[:size]
        framing: Iterable[tuple[bytes, bytes]] = _TIDY_FRAMING.findall(head.lower())
        return _response(int(tidy[1]), request_method, framing, head, size)
    untidy = _untidy_head(buffer, MAX_RESPONSE_HEAD, _STATUS_LINE)
    if untidy is None or isinstance(untidy, Incomplete):
        return untidy
    start, items, written, size = untidy
    status = int(start["status_code"])
    first = b"HTTP/1.1 %d %s" % (status, start["reason"] or b"")
    head = b"\r\n".join([first, *written]) + b"\r\n\r\n"
    framing = ((name.lower(), value) for name, value in items)
    return _response(status, request_method, framing, head, size)


def _response(
    status: int,
    request_method: bytes,
    framing: Iterable[tuple[bytes, bytes]],
    head: bytes,
    size: int,
) -> LeanResponse | None:
    """The response the parsed head makes, if its body length is told by its head.

    framing: lower-case name and value of (at least) every Content-Length,
    Transfer-Encoding and Connection field, in order.
    """
    if status < 200:
        return None
    length: int | None = None
    close = False
    for name, value in framing:
        if name == b"content-length":
            if length is not None or not _is_length(value):
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        elif name == b"connection":
            close = close or _says_close(value)
    if status in (204, 304) or request_method == b"HEAD":
        length = 0
    elif length is None:
        return None
    return LeanResponse(status, head, size, length, close)
