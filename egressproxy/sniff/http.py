"""HTTP/1.0 and 1.1 request heads, and the HTTP/2 prior-knowledge preface.

The grammar is h11's (h11/_abnf.py, h11/_receivebuffer.py): the data plane hands the
connection to h11 afterwards, so a head that sniffs as one request must not parse as
another there. Stricter than h11 where strictness closes a gap between what the policy
sees and what the origin sees: obsolete line folding, userinfo in the target and odd
Host values are rejected.
"""

from __future__ import annotations

import ipaddress
import re

from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    H2Preface,
    Hold,
    HttpRequestHead,
    NeedMore,
    NotThis,
)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]"
# Registered methods are at most 17 characters long; the bound rejects a long run of
# letters (a binary protocol, a banner) early instead of at the buffer limit.
_METHOD = _TCHAR + rb"{1,24}"
_TARGET = rb"[\x21-\x7e]+"
_REQUEST_LINE = re.compile(rb"(" + _METHOD + rb") (" + _TARGET + rb") (HTTP/[0-9]\.[0-9])")
_VERSION_PREFIX = rb"H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?"
_REQUEST_LINE_PREFIX = re.compile(
    _METHOD + rb"(?: (?:" + _TARGET + rb"(?: (?:" + _VERSION_PREFIX + rb")?)?)?)?"
)
_HEAD_END = re.compile(rb"\n\r?\n")
# What a lenient server may still take for a request line (RFC 9112 2.2 and 3: empty
# lines before it, any whitespace between its parts; h11 takes lower-case and long
# methods; raw UTF-8 in a target is common; Python's http.server splits the line on
# whatever str.split() calls whitespace, CR and before the method too, and keeps control
# bytes in a path): HTTP, to be refused or parsed as such. The first word is not bounded
# (a method is any token, and h11, Go and nginx take one of any length: a bound would let
# a long one pass as opaque bytes past the host rules), and control bytes count only after
# a `/`: a binary message (ASN.1's starts `0`, its length, then a tag such as \x02) is
# still told apart at its first control byte.
LOOSE_SPACE = b" \t\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0"
_SPACES = rb" \t\x0b-\x0d\x1c-\x1f\x85\xa0"
_SPACE = rb"[" + _SPACES + rb"]"
_NOT_TEXT_BEFORE_PATH = rb"\x00-\x08\x0a\x0e-\x1b\x7f/"
_TEXT_BEFORE_PATH = rb"[^" + _NOT_TEXT_BEFORE_PATH + rb"]"
_PATH_TEXT = rb"[^\x00\x0a]"
_LINE_TEXT = _TEXT_BEFORE_PATH + rb"*(?:/" + _PATH_TEXT + rb"*)?"
_LOOSE_METHOD = rb"[\x21-\x7e]+"
_LOOSE_REQUEST_LINE = re.compile(
    _SPACE
    + rb"*(?:"
    + _LOOSE_METHOD
    + _SPACE
    + _LINE_TEXT
    + _SPACE
    + rb"(?i:HTTP)/[0-9]+\.[0-9]+|GET"
    + _SPACE
    + rb"++(?:/|(?i:https?://))[\x21-\x7e\x80-\xff]*+)"
    + _SPACE
    + rb"*"
)
"""Besides irregular whitespace: a version of several digits (nginx reads `HTTP/01.1` and
`HTTP/1.01` as HTTP/1.1), and HTTP/0.9's line without one (nginx and Apache serve
`GET /path`). HTTP/0.9 has GET only (RFC 1945 4.1's Simple-Request), and nginx, Apache
and http.server refuse any other method without a version: `POST /path` is no request,
nor is a binary message that happens to begin with a letter, a CR, a `/` and visible
bytes up to a LF (about one random 8 KiB payload in 100,000). No two runs that may take
the same bytes follow one another (one separator before the versioned line's text, which
takes whitespace too; possessive runs before and in HTTP/0.9's target), else a long run
of whitespace is tried split every way: seconds on the event loop for one 16 KiB line."""
_LOOSE_REQUEST_LINE_PREFIX = re.compile(
    _SPACE
    + rb"*(?:(?P<method>"
    + _LOOSE_METHOD
    + rb")(?:(?P<text>"
    + _SPACE
    + _TEXT_BEFORE_PATH
    + rb"*)(?P<path>/"
    + _PATH_TEXT
    + rb"*)?)?)?"
)
"""What may still grow into a loose request line: its CR included, the LF not yet come
(_LINE_TEXT, its parts named for loose_line_hold)."""
_ENDS_LOOSE_SPACES = re.compile(rb"[^" + _SPACES + rb"]")
_ENDS_LOOSE_METHOD = re.compile(rb"[^\x21-\x7e]")
_ENDS_TEXT_BEFORE_PATH = re.compile(rb"[" + _NOT_TEXT_BEFORE_PATH + rb"]")
_ENDS_PATH_TEXT = re.compile(rb"[\x00\x0a]")
"""What ends each part of a loose request line still growing: another part, the line, or
the line's chance to be one."""
_BAD_REQUEST_LINE = NotThis("bad_request_line")
_FIELD_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_HEADER_BLOCK = re.compile(rb"(?:" + _TCHAR + rb"+:[ \t]*+" + _FIELD_VALUE + rb"[ \t]*\r?\n)*")
"""The whitespace before a value is possessive, as a value never starts with any: else an
empty value's whitespace is split every way between the two runs around it."""
# Applied to the lower-cased header block, which the block pattern has validated.
_HOST_FIELD = re.compile(rb"^host:[ \t]*([^\r\n]*)", re.MULTILINE)
_ABSOLUTE_TARGET = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#]*)")
_AUTHORITY = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|([-0-9A-Za-z._]+))(?::([0-9]{0,5}))?")
"""RFC 3986 host and port; an empty port (`host:`) is no port, as servers read it."""
_DNS_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?")
_MAX_DNS_NAME_LENGTH = 253

_SUPPORTED_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
_NOT_HTTP = NotThis("not_http")
_TOO_LARGE = NotThis("too_large")
_BAD_HOST = NotThis("bad_host")
_BAD_TARGET = NotThis("bad_target")
_H2_PREFACE_FOUND = H2Preface()

Authority = tuple[str | None, int | None]


EMPTY_LINES_ALLOWED = 10
"""Empty lines skipped before a request line, as Apache httpd skips (RFC 9112 2.2 asks for
one; h11 takes none, nginx any number). Past them the head is HTTP, refused 400, never
opaque bytes that nginx would read a request in past the host rules; and the sniffer,
which reads the buffer again at every read, did quadratic work on a trickle of them (8,000
CRLFs one byte a read held the event loop 0.7 to 2 s)."""
_LINE_ENDS_ALLOWED = 2 * EMPTY_LINES_ALLOWED
"""CRs and LFs before an irregular request line: nginx skips any run of them."""


def empty_lines_before(buf: bytes, allowed: int = EMPTY_LINES_ALLOWED) -> int:
    """How many bytes of empty lines (CRLF, or a bare LF), at most `allowed` of them, begin
    buf: RFC 9112 2.2 has a server ignore them before a request line (h11 refuses them,
    400, as most servers do not), so the sniffer and the HTTP/1 handler skip them, and
    they never go upstream."""
    end = 0
    for _ in range(allowed):
        if buf.startswith(b"\n", end):
            end += 1
        elif buf.startswith(b"\r\n", end):
            end += 2
        else:
            break
    return end


def parse_h2_preface(buf: bytes) -> H2Preface | NeedMore | NotThis:
    """The connection preface of HTTP/2 with prior knowledge (RFC 9113 section 3.4)."""
    if buf.startswith(H2_PREFACE):
        return _H2_PREFACE_FOUND
    if H2_PREFACE.startswith(buf):
        return NEED_MORE
    return NotThis("not_h2")


def parse_request_head(buf: bytes) -> HttpRequestHead | NeedMore | NotThis:
    """The request line and Host of the head at the start of ``buf``.

    The whole head is needed: a second Host header may come last. Until then NEED_MORE,
    as long as what has arrived can still begin a valid request line.
    """
    line_end = buf.find(b"\n", 0, SNIFF_BUFFER_LIMIT)
    if line_end < 0:
        if buf and _REQUEST_LINE_PREFIX.fullmatch(buf, 0, SNIFF_BUFFER_LIMIT) is None:
            return _NOT_HTTP
        return _TOO_LARGE if len(buf) >= SNIFF_BUFFER_LIMIT else NEED_MORE

    request_line = buf[: line_end - 1 if buf[line_end - 1 : line_end] == b"\r" else line_end]
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        return _NOT_HTTP
    method, target, version = match.groups()
    if version not in _SUPPORTED_VERSIONS:
        return NotThis("unsupported_version")
    named = target_authority(method, target)
    if isinstance(named, NotThis):
        return named

    head_end = _HEAD_END.search(buf, line_end, SNIFF_BUFFER_LIMIT)
    if head_end is None:
        return _TOO_LARGE if len(buf) >= SNIFF_BUFFER_LIMIT else NEED_MORE
    header_block = buf[line_end + 1 : head_end.start() + 1]
    if _HEADER_BLOCK.fullmatch(header_block) is None:
        return NotThis("malformed_header")
    host_values = _HOST_FIELD.findall(header_block.lower())
    if len(host_values) > 1:
        return _BAD_HOST
    if host_values:
        host_value = host_values[0].rstrip(b" \t")
        header_authority = _parse_authority(host_value) if host_value else (None, None)
        if header_authority is None:
            return _BAD_HOST
    elif version == b"HTTP/1.1":
        return NotThis("missing_host")  # RFC 9112 section 3.2; h11 rejects it too
    else:
        header_authority = (None, None)

    # RFC 9112 section 3.2.2: a target with an authority overrides Host.
    host, port = named or header_authority
    return HttpRequestHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version.decode("ascii"),
        host=host,
        port=port,
    )


def request_hold(buf: bytes, start: int) -> Hold:
    """For the head at buf[start:], which sniff finds incomplete (parse_request_head, or
    loose_request_line after it): how long that stands as buf grows. Once its first line is
    whole, only a head end (or the buffer limit) can end it. Before, it is incomplete while
    loose_request_line finds it so: a line parse_request_head may still read is one it may
    too (its method, spaces and target are loose ones, its version text or path text)."""
    end = start + SNIFF_BUFFER_LIMIT
    if buf.find(b"\n", start, end) >= 0:
        return Hold(end, _HEAD_END, 2)
    return loose_line_hold(buf, start)


def loose_line_hold(buf: bytes, start: int) -> Hold:
    """For the line at buf[start:], which loose_request_line finds incomplete: how long
    that stands as buf grows (request_hold's, for an irregular line)."""
    end = start + SNIFF_BUFFER_LIMIT
    lead = buf[start : start + _LINE_ENDS_ALLOWED + 1]
    first = start + len(lead) - len(lead.lstrip(b"\r\n"))
    if first == len(buf):
        return Hold(first + 1)  # more CRs and LFs may come
    line = _LOOSE_REQUEST_LINE_PREFIX.fullmatch(buf, first, end)
    assert line is not None, "a line still incomplete"
    if line["path"] is not None:
        return Hold(end, _ENDS_PATH_TEXT)
    if line["text"] is not None:
        return Hold(end, _ENDS_TEXT_BEFORE_PATH)
    if line["method"] is not None:
        return Hold(end, _ENDS_LOOSE_METHOD)
    return Hold(end, _ENDS_LOOSE_SPACES)


def loose_request_line(buf: bytes) -> NeedMore | NotThis:
    """For a head parse_request_head refuses as not HTTP: bad_request_line (HTTP all the
    same, for the HTTP handler to answer 400 rather than opaque bytes slipping past the host
    rules) once the first line is a request line however irregular, NEED_MORE while it may
    still become one, else not_http; bad_request_line too after more CRs and LFs than
    EMPTY_LINES_ALLOWED CRLFs hold."""
    buf = buf[:SNIFF_BUFFER_LIMIT]
    lead = buf[: _LINE_ENDS_ALLOWED + 1]
    first = len(lead) - len(lead.lstrip(b"\r\n"))
    if first > _LINE_ENDS_ALLOWED:
        return _BAD_REQUEST_LINE
    line_end = buf.find(b"\n", first, SNIFF_BUFFER_LIMIT)
    if line_end < 0:
        if _LOOSE_REQUEST_LINE_PREFIX.fullmatch(buf, first, SNIFF_BUFFER_LIMIT) is None:
            return _NOT_HTTP
        return _TOO_LARGE if len(buf) >= SNIFF_BUFFER_LIMIT else NEED_MORE
    if _LOOSE_REQUEST_LINE.fullmatch(buf, first, line_end) is None:
        return _NOT_HTTP
    return _BAD_REQUEST_LINE


def could_begin_request(first_bytes: bytes) -> bool:
    """Undecided bytes that may begin a request head (a method's capital, the h2 preface,
    or an irregular request line still growing): a head in the making, HTTP's to time out
    (408) or refuse when cut short (400), never opaque bytes past the rules. No byte yet
    begins nothing: a client may end before sending any to a server that speaks first."""
    if not first_bytes:
        return False
    return first_bytes[:1].isupper() or loose_request_line(first_bytes) is NEED_MORE


def target_authority(method: bytes, target: bytes) -> Authority | NotThis | None:
    """The host and port a request target names, or None when it names none (origin-form,
    OPTIONS' *); NotThis("bad_target") for a target in none of RFC 9112's forms."""
    if method == b"CONNECT":
        authority = _parse_authority(target)
        if authority is None or authority[1] is None:
            return _BAD_TARGET
        return authority
    if target.startswith(b"/"):
        return None
    if target == b"*":
        return None if method == b"OPTIONS" else _BAD_TARGET
    absolute = _ABSOLUTE_TARGET.match(target)
    if absolute is None:
        return _BAD_TARGET
    return _parse_authority(absolute[1]) or _BAD_HOST


def _parse_authority(text: bytes) -> Authority | None:
    """``host[:port]`` with host lower-cased and IPv6 brackets removed; None if implausible."""
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        return None
    bracketed, name, port_digits = match.groups()
    if bracketed is not None:
        host = bracketed.decode("ascii").lower()
        if not _is_ipv6_address(host):
            return None
    else:
        host = name.decode("ascii").lower()
        if not _is_dns_name(host):
            return None
    if not port_digits:
        return host, None
    port = int(port_digits)
    if not 0 < port < 65536:
        return None
    return host, port


def authority_host(authority: str) -> str | None:
    """The host a Host header or :authority names: lower-case, without port, IPv6 brackets
    or the root label's dot (`example.com.` must not sidestep a rule for `example.com`).

    None when it is not `host[:port]`: the request is then refused (400), since a name
    no rule could match (`example.com:x`) would get the default decision instead. Only
    HTTP's whitespace (space, tab) is taken off: nginx keeps `\xa0` or `\x1c` in a host,
    which then names no server of its own and gets its default one.
    """
    address = authority_address(authority, 0)
    return address[0] if address else None


def authority_address(authority: str, default_port: int) -> tuple[str, int] | None:
    """The host (as authority_host has it) and port an authority names, default_port when
    it names none; None when it is not `host[:port]`."""
    parsed = _parse_authority(authority.strip(" \t").encode("latin-1"))
    if parsed is None or parsed[0] is None:
        return None
    host = parsed[0].removesuffix(".")
    return (host, parsed[1] or default_port) if host else None


def is_plausible_host(name: str) -> bool:
    """A lower-case DNS name (underscores allowed, as found in the wild) or an IP literal."""
    return _is_dns_name(name) or (":" in name and _is_ipv6_address(name))


def _is_dns_name(name: str) -> bool:
    return (
        len(name.removesuffix(".")) <= _MAX_DNS_NAME_LENGTH
        and _DNS_NAME.fullmatch(name) is not None
    )


def _is_ipv6_address(text: str) -> bool:
    if "%" in text:  # a zone index names an interface of the client, not a destination
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
