"""Which protocol a connection speaks, from its first bytes.

Dispatch on the first byte keeps the common cases to one parser: a TLS record starts
with 0x16, an HTTP/1 method with an upper-case letter, the h2 preface with "P" (shared
with PATCH, POST, PUT). Text that the strict request grammar refuses is asked once more
whether it is an irregular request line (doubled spaces, a lower-case method), which
stays HTTP. Empty lines before a request line are skipped (RFC 9112 2.2), a bounded
number of them: past those the head is HTTP refused (bad_request_line). Binary bytes
are opaque at once, so server-speaks-first and binary protocols never wait for a buffer
to fill.
"""

from __future__ import annotations

from egressproxy.sniff import (
    NEED_MORE,
    H2Preface,
    HttpRequestHead,
    NeedMore,
    NotThis,
    Opaque,
    Sniffed,
    TlsHello,
)
from egressproxy.sniff.http import (
    LOOSE_SPACE,
    empty_lines_before,
    loose_request_line,
    parse_h2_preface,
    parse_request_head,
)
from egressproxy.sniff.tls import parse_client_hello, read_again_at

_TLS_HANDSHAKE = 0x16
_LETTER_P = 0x50


def sniff(buf: bytes) -> Sniffed | NeedMore:
    """Classify ``buf``; NEED_MORE while it is a strict prefix of something recognisable."""
    if not buf:
        return NEED_MORE
    first = buf[0]
    skipped = empty_lines_before(buf) if first in _LINE_ENDS else 0
    if skipped and buf[skipped : skipped + 1].isupper():
        return _settle(_request(buf[skipped:]))
    if first == _TLS_HANDSHAKE:
        return _settle(parse_client_hello(buf))
    if first == _LETTER_P:
        preface = parse_h2_preface(buf)
        if preface is not NEED_MORE and not isinstance(preface, NotThis):
            return preface
        request = _request(buf)
        if preface is NEED_MORE and isinstance(request, NotThis):
            return NEED_MORE
        return _settle(request)
    if 0x41 <= first <= 0x5A:
        return _settle(_request(buf))
    if first in _TEXT_START:
        return _settle(loose_request_line(buf))
    return Opaque("unknown_protocol")


def sniff_again_at(buf: bytes) -> int:
    """For ``buf``, which sniff answers NEED_MORE: the length it must grow to before the
    answer can change. A ClientHello is read again only where a record or the hello could
    end, not at every read; anything else at the next byte."""
    if buf[0] == _TLS_HANDSHAKE:
        return read_again_at(buf)
    return len(buf) + 1


_LINE_ENDS = frozenset(b"\r\n")
_TEXT_START = _LINE_ENDS | frozenset(range(0x21, 0x7F)) | frozenset(LOOSE_SPACE)
"""What may begin an irregular request line, leading whitespace included."""


def _request(buf: bytes) -> HttpRequestHead | NeedMore | NotThis:
    request = parse_request_head(buf)
    if isinstance(request, NotThis) and request.reason == "not_http":
        return loose_request_line(buf)
    return request


def _settle(
    result: TlsHello | HttpRequestHead | H2Preface | NeedMore | NotThis,
) -> Sniffed | NeedMore:
    if isinstance(result, NotThis):
        return Opaque(result.reason)
    return result
