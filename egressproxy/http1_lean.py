"""Lean HTTP/1.1 heads for the common exchange; everything else is left to h11.

h11 costs tens of microseconds per message, and most keep-alive traffic is a bodiless
request answered with a Content-Length response. These parsers accept exactly that, with
h11's own grammar, and answer None for anything else so that h11 handles it (and its
errors); tests/unit/test_http1_lean.py proves that what they accept h11 reads the same.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from h11._abnf import field_name, field_value, header_field, request_line, status_line


class Incomplete(enum.Enum):
    NEED_MORE = "need more"


NEED_MORE = Incomplete.NEED_MORE
MAX_RESPONSE_HEAD = 65536
"""A longer response head is h11's to judge."""

_REQUEST_LINE = re.compile(request_line.encode("ascii"))
_STATUS_LINE = re.compile(status_line.encode("ascii"))
_HEADER_FIELD = re.compile(header_field.encode("ascii"))
_DIGITS = re.compile(rb"[0-9]{1,18}")
_TIDY_FIELDS = re.compile(rf"(?:{field_name}: {field_value}\r\n)*".encode("ascii"))
"""Header lines already written as `Name: value` (one match instead of one per line)."""
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection): ([^\r]*)", re.IGNORECASE
)
_REFUSED_REQUEST_HEADERS = frozenset((b"transfer-encoding", b"upgrade", b"expect"))


@dataclass(frozen=True, slots=True)
class LeanRequest:
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


@dataclass(frozen=True, slots=True)
class LeanResponse:
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


def _keeps_alive(value: bytes) -> bool:
    """A Connection header h11 reads as keep-alive (no `close` token)."""
    lowered = value.lower()
    if b"close" not in lowered:
        return True
    return all(token.strip(b" \t") != b"close" for token in lowered.split(b","))


def parse_request(buffer: bytes, limit: int) -> LeanRequest | Incomplete | None:
    """The request at the start of buffer, NEED_MORE, or None: h11's to handle."""
    found = _head_lines(buffer, limit)
    if found is None or found is NEED_MORE:
        return found
    assert not isinstance(found, Incomplete)
    lines, size = found
    start = _REQUEST_LINE.fullmatch(lines[0])
    if start is None or start["http_version"] != b"1.1":
        return None
    method, target = start["method"], start["target"]
    if method == b"CONNECT":
        return None
    canonical = True
    host: str | None = None
    grpc = False
    close = False
    content_length = False
    headers: list[tuple[str, str]] = []
    raw: list[bytes] = [lines[0]]
    head_size = len(method) + len(target) + 14
    for line in lines[1:]:
        field = _HEADER_FIELD.fullmatch(line)
        if field is None:
            return None
        name, value = field["field_name"], field["field_value"]
        lower = name.lower()
        head_size += len(name) + len(value) + 4
        text_value = value.decode("latin-1")
        if lower == b"host":
            if host is not None:
                return None
            host = text_value
        elif lower == b"content-length":
            if content_length or _DIGITS.fullmatch(value) is None or int(value):
                return None
            content_length = True
        elif lower in _REFUSED_REQUEST_HEADERS:
            return None
        elif lower == b"connection":
            close = close or not _keeps_alive(value)
        elif lower == b"content-type":
            grpc = text_value.lower().startswith("application/grpc")
        headers.append((lower.decode("latin-1"), text_value))
        written = name + b": " + value
        raw.append(written)
        canonical = canonical and written == line
    if host is None or head_size > limit or (close and len(buffer) > size):
        return None
    head = buffer[:size] if canonical else b"\r\n".join(raw) + b"\r\n\r\n"
    return LeanRequest(method, target, tuple(headers), host, grpc, head, size, head_size, close)


def parse_response(buffer: bytes, request_method: bytes) -> LeanResponse | Incomplete | None:
    """The final response at the start of buffer, NEED_MORE, or None: h11's to handle."""
    tidy = _parse_tidy_response(buffer, request_method)
    if tidy is not None:
        return tidy
    found = _head_lines(buffer, MAX_RESPONSE_HEAD)
    if found is None or found is NEED_MORE:
        return found
    assert not isinstance(found, Incomplete)
    lines, size = found
    start = _STATUS_LINE.fullmatch(lines[0])
    if start is None or start["http_version"] != b"1.1":
        return None
    status = int(start["status_code"])
    if status < 200:
        return None
    reason = start["reason"] or b""
    first = b"HTTP/1.1 %d %s" % (status, reason)
    canonical = first == lines[0]
    raw = [first]
    length: int | None = None
    close = False
    for line in lines[1:]:
        field = _HEADER_FIELD.fullmatch(line)
        if field is None:
            return None
        name, value = field["field_name"], field["field_value"]
        lower = name.lower()
        if lower == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif lower == b"transfer-encoding":
            return None
        elif lower == b"connection":
            close = close or not _keeps_alive(value)
        written = name + b": " + value
        raw.append(written)
        canonical = canonical and written == line
    if status in (204, 304) or request_method == b"HEAD":
        length = 0
    elif length is None:
        return None
    head = buffer[:size] if canonical else b"\r\n".join(raw) + b"\r\n\r\n"
    return LeanResponse(status, head, size, length, close)


def _parse_tidy_response(buffer: bytes, request_method: bytes) -> LeanResponse | None:
    """parse_response for a head written as h11 would write it; None: take the long way."""
    end = buffer.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD)
    line_end = buffer.find(b"\r\n", 0, end)
    if end <= 0 or line_end < 0:
        return None
    start = _STATUS_LINE.fullmatch(buffer, 0, line_end)
    if start is None or start["http_version"] != b"1.1" or start["reason"] is None:
        return None
    status = int(start["status_code"])
    if status < 200 or _TIDY_FIELDS.fullmatch(buffer, line_end + 2, end + 2) is None:
        return None
    length: int | None = None
    close = False
    for framing in _FRAMING_FIELD.finditer(buffer, line_end, end):
        name, value = framing[1].lower(), framing[2]
        if name == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        else:
            close = close or not _keeps_alive(value)
    if status in (204, 304) or request_method == b"HEAD":
        length = 0
    elif length is None:
        return None
    return LeanResponse(status, buffer[: end + 4], end + 4, length, close)
