"""TLS ClientHello sniffing: SNI, ALPN and whether Encrypted Client Hello is offered.

Modelled on linkerd2-proxy's ``parse_sni`` (linkerd/tls/src/server/client_hello.rs) but
without its one-record assumption: the handshake message is reassembled from consecutive
handshake records, because record-splitting the hello is a known way to slip past
sniffers. Every length is bounds-checked; malformed input is an answer, not an exception.
"""

from __future__ import annotations

from egressproxy.sniff import NEED_MORE, SNIFF_BUFFER_LIMIT, NeedMore, NotThis, TlsHello
from egressproxy.sniff.http import is_plausible_host

_CONTENT_TYPE_ALERT = 21
_CONTENT_TYPE_HANDSHAKE = 22
FIRST_RECORD_TYPES = frozenset({_CONTENT_TYPE_HANDSHAKE, _CONTENT_TYPE_ALERT})
"""What the first byte of a client's first flight may be: Go's and Java's TLS servers read
a hello behind warning alerts, so a flight that starts with one is read as a hello too."""
_ALERT_LENGTH = 2
_HANDSHAKE_CLIENT_HELLO = 1
_RECORD_HEADER_LENGTH = 5
_HANDSHAKE_HEADER_LENGTH = 4
_MAX_RECORD_LENGTH = (1 << 14) + 2048
"""RFC 8446 5.1 allows 2^14 bytes of plaintext, but Go's server takes records up to its
limit for ciphertext (2^14 + 2048) before the version is agreed, and Java's as long:
a hello in such a record has a name those servers read. Longer, none does."""
_MAX_RECORD_MAJOR_VERSION = 0x0F
"""Go's server takes a first flight in records of any version below 16.0 (Java's in 4.1
too), OpenSSL's only 3.x: a hello in a record of version 4.1 has a name Go and Java read."""
# A call walks the records from the start (from where a RecordWalk stopped, for a hello in
# pieces): the bound caps that walk. A real hello needs one record, a deliberately split
# one tens; 16 KiB of one-byte records would be over 2700.
_MAX_RECORDS = 256

_EXTENSION_SERVER_NAME = 0
_EXTENSION_ALPN = 16
_EXTENSION_ENCRYPTED_CLIENT_HELLO = 0xFE0D
_NAME_TYPE_HOST_NAME = 0

_MALFORMED_RECORD = NotThis("malformed_record")
TOO_MANY_RECORDS = "too_many_records"
"""More records than _MAX_RECORDS before the hello is whole."""
_NOT_TLS = NotThis("not_tls")
BEFORE_A_HELLO = frozenset({"not_tls", "not_client_hello"})
"""Reasons given before the bytes showed a ClientHello's first byte: binary data that
begins as a TLS record may stop there. Any other reason is a ClientHello the sniffer
cannot read."""


class RecordWalk:
    """How far reading a hello that is still incomplete got: the records before
    record_start are read (their fragments gathered), the one there is not yet whole.

    Walked from its first record at every read, a hello of 256 tiny records sent a byte at
    a time took 70 ms of the worker's loop for its 16 KiB; from where it stopped, each read
    reads the record it ends in. A walk belongs to one buffer that only grows."""

    __slots__ = ("fragments", "gathered", "message_length", "record_start", "records")

    def __init__(self) -> None:
        self.fragments: list[bytes] = []
        self.gathered = 0
        self.message_length = -1
        self.record_start = 0
        self.records = 0


def parse_client_hello(buf: bytes, walk: RecordWalk | None = None) -> TlsHello | NeedMore | NotThis:
    """Find the ClientHello at the start of ``buf`` (bytes after it are ignored).

    Only the first SNIFF_BUFFER_LIMIT bytes count, so an answer never changes as more
    bytes arrive; a hello still incomplete there is NotThis("too_large"). walk: where the
    records of this buffer, shorter, were read to before.
    """
    found = _read_records(buf[:SNIFF_BUFFER_LIMIT], walk)
    if not isinstance(found, int):
        return found
    return NotThis("too_large") if len(buf) >= SNIFF_BUFFER_LIMIT else NEED_MORE


def read_again_at(buf: bytes, walk: RecordWalk | None = None) -> int:
    """For ``buf``, a hello that parse_client_hello finds incomplete: the length it must
    grow to before the answer can change (a record, or the hello, could end there). Read
    at every byte, a hello of 256 tiny records and one long one took 1.4 s of the worker's
    loop for its 16 KiB."""
    found = _read_records(buf[:SNIFF_BUFFER_LIMIT], walk)
    assert isinstance(found, int), "a hello still incomplete"
    return min(found, SNIFF_BUFFER_LIMIT)


def _read_records(buf: bytes, walk: RecordWalk | None) -> TlsHello | NotThis | int:
    """The hello, or where reading it failed; while it is incomplete, the length buf must
    reach before that can change (and walk, if given, stops before the record not whole)."""
    size = len(buf)
    if walk is None:
        fragments: list[bytes] = []
        gathered = 0
        message_length = -1  # handshake header + body, once the header has arrived
        record_start = 0
        first_record = 0
    else:
        fragments, gathered = walk.fragments, walk.gathered
        message_length, record_start = walk.message_length, walk.record_start
        first_record = walk.records
    for records in range(first_record, _MAX_RECORDS):
        header = buf[record_start : record_start + _RECORD_HEADER_LENGTH]
        rejected = _check_record_header(header, first=gathered == 0)
        if rejected is not None:
            return rejected
        if len(header) < _RECORD_HEADER_LENGTH:
            if walk is not None:
                _stop(walk, gathered, message_length, record_start, records)
            # Its first two bytes are checked as they come, the length once it is whole.
            return record_start + (len(header) + 1 if len(header) < 2 else _RECORD_HEADER_LENGTH)
        record_length = header[3] << 8 | header[4]
        fragment_start = record_start + _RECORD_HEADER_LENGTH
        record_end = fragment_start + record_length
        if header[0] == _CONTENT_TYPE_ALERT:
            if record_length != _ALERT_LENGTH:
                return _NOT_TLS  # an alert is level and description: no TLS client's this
            record_start = record_end  # Go and Java read the hello after a warning alert
            continue
        if record_length == 0:
            # RFC 8446 forbids empty handshake records, but OpenSSL skips them and reads
            # the hello after: so must the sniffer, or the name would go unseen.
            record_start = record_end
            continue
        fragment = buf[fragment_start:record_end]
        if gathered == 0 and fragment and fragment[0] != _HANDSHAKE_CLIENT_HELLO:
            return NotThis("not_client_hello")
        if record_length > _MAX_RECORD_LENGTH and (gathered or fragment):
            return NotThis("malformed_record_length")  # in a hello: a name may be in it
        fragments.append(fragment)
        gathered += len(fragment)
        if message_length < 0 and gathered >= _HANDSHAKE_HEADER_LENGTH:
            # Joining a single fragment returns it as it is, without a copy.
            message_length = _HANDSHAKE_HEADER_LENGTH + int.from_bytes(b"".join(fragments)[1:4])
        if gathered >= message_length >= 0:
            message = b"".join(fragments)
            return _parse_client_hello_body(message, _HANDSHAKE_HEADER_LENGTH, message_length)
        if record_end > size:
            if gathered == 0:
                again_at = size + 1  # its type is checked at its first byte
            else:
                wanted = message_length if message_length >= 0 else _HANDSHAKE_HEADER_LENGTH
                again_at = min(record_end, size + wanted - gathered)
            if walk is not None:
                fragments.pop()  # read again, longer, from its header
                _stop(walk, gathered - len(fragment), message_length, record_start, records)
            return again_at
        record_start = record_end
    return NotThis(TOO_MANY_RECORDS)


def _stop(walk: RecordWalk, gathered: int, message_length: int, start: int, records: int) -> None:
    """Keep where the walk got to: record `records` starts at `start` and is not whole.
    The message length stays once known: its bytes are the same whichever read found them."""
    walk.gathered, walk.message_length = gathered, message_length
    walk.record_start, walk.records = start, records


def _check_record_header(header: bytes, *, first: bool) -> NotThis | None:
    """Reject on whatever part of a record header has arrived, so non-TLS fails at once.
    first: no byte of the hello came yet, so an alert may still come before it."""
    if not header:
        return None
    if first:
        if header[0] not in FIRST_RECORD_TYPES:
            return _NOT_TLS
    elif header[0] != _CONTENT_TYPE_HANDSHAKE:
        return _MALFORMED_RECORD
    if len(header) >= 2 and header[1] > _MAX_RECORD_MAJOR_VERSION:
        return _NOT_TLS if first else _MALFORMED_RECORD
    return None  # any minor version: OpenSSL reads a hello in a record of 03 ff


def _parse_client_hello_body(data: bytes, pos: int, end: int) -> TlsHello | NotThis:
    """Parse the ClientHello body in ``data[pos:end]`` (RFC 8446 section 4.1.2)."""
    # legacy_version (2) + random (32) + session id length (1)
    if end - pos < 35 or data[pos] != 3:
        return NotThis("malformed_hello")
    pos += 34
    session_id_length = data[pos]
    pos += 1 + session_id_length
    if session_id_length > 32 or pos + 2 > end:
        return NotThis("malformed_session_id")
    cipher_suites_length = data[pos] << 8 | data[pos + 1]
    pos += 2 + cipher_suites_length
    if cipher_suites_length < 2 or cipher_suites_length & 1 or pos + 1 > end:
        return NotThis("malformed_cipher_suites")
    compression_methods_length = data[pos]
    pos += 1 + compression_methods_length
    if compression_methods_length < 1 or pos > end:
        return NotThis("malformed_compression_methods")
    if pos == end:
        return TlsHello(sni=None, alpn=(), ech=False)
    if pos + 2 > end or pos + 2 + (data[pos] << 8 | data[pos + 1]) != end:
        return NotThis("malformed_extensions")
    pos += 2

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech = False
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            return NotThis("malformed_extensions")
        extension_type = data[pos] << 8 | data[pos + 1]
        body_start = pos + 4
        pos = body_start + (data[pos + 2] << 8 | data[pos + 3])
        if pos > end:
            return NotThis("malformed_extensions")
        if extension_type in seen:
            # RFC 8446 forbids it, and two SNIs could be read differently by the server.
            return NotThis("malformed_duplicate_extension")
        seen.add(extension_type)
        if extension_type == _EXTENSION_SERVER_NAME:
            server_name = _parse_server_name(data, body_start, pos)
            if isinstance(server_name, NotThis):
                return server_name
            sni = server_name
        elif extension_type == _EXTENSION_ALPN:
            protocols = _parse_alpn(data, body_start, pos)
            if isinstance(protocols, NotThis):
                return protocols
            alpn = protocols
        elif extension_type == _EXTENSION_ENCRYPTED_CLIENT_HELLO:
            ech = True
    return TlsHello(sni=sni, alpn=alpn, ech=ech)


def _parse_server_name(data: bytes, pos: int, end: int) -> str | NotThis:
    """The single host_name of a server_name extension (RFC 6066 section 3), lower-cased."""
    # server_name_list length (2) + name_type (1) + HostName length (2)
    if end - pos < 5 or (data[pos] << 8 | data[pos + 1]) != end - pos - 2:
        return NotThis("malformed_sni")
    if data[pos + 2] != _NAME_TYPE_HOST_NAME:
        return NotThis("malformed_sni")
    name_length = data[pos + 3] << 8 | data[pos + 4]
    pos += 5
    # One name filling the whole list: OpenSSL and BoringSSL reject anything else too.
    if name_length == 0 or pos + name_length != end:
        return NotThis("malformed_sni")
    try:
        name = data[pos:end].decode("ascii").lower()
    except UnicodeDecodeError:
        return NotThis("bad_sni")
    if not is_plausible_host(name):
        return NotThis("bad_sni")
    return name


def _parse_alpn(data: bytes, pos: int, end: int) -> tuple[str, ...] | NotThis:
    """The protocol list of an ALPN extension (RFC 7301 section 3.1).

    Names are opaque bytes on the wire; latin-1 keeps them lossless.
    """
    if end - pos < 3 or (data[pos] << 8 | data[pos + 1]) != end - pos - 2:
        return NotThis("malformed_alpn")
    pos += 2
    protocols: list[str] = []
    while pos < end:
        name_length = data[pos]
        pos += 1
        if name_length == 0 or pos + name_length > end:
            return NotThis("malformed_alpn")
        protocols.append(data[pos : pos + name_length].decode("latin-1"))
        pos += name_length
    return tuple(protocols)
