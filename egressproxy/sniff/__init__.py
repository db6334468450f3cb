"""Pure protocol detection over the first bytes of a connection.

Every parser answers with a value, never an exception: the protocol it found,
``NEED_MORE`` (a prefix of something it would recognise), or ``NotThis``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

SNIFF_BUFFER_LIMIT = 16 * 1024


class NeedMore(enum.Enum):
    """The bytes so far are a strict prefix of something recognisable."""

    NEED_MORE = "need_more"


NEED_MORE = NeedMore.NEED_MORE


class Hold(NamedTuple):
    """How long a NEED_MORE stands as its buffer grows: while the buffer is shorter than
    `until` and `stop` is not found in the bytes that came since (searched from `overlap`
    bytes before them, for a stop longer than a byte); with no stop, the length alone
    counts. A buffer that comes a byte at a time is then not parsed whole at every byte."""

    until: int
    stop: re.Pattern[bytes] | None = None
    overlap: int = 0


@dataclass(frozen=True)
class NotThis:
    """Not this protocol; reason is a short word for logs and metrics."""

    reason: str


@dataclass(frozen=True)
class TlsHello:
    """What policy needs from a ClientHello (the bytes themselves are relayed untouched)."""

    sni: str | None
    alpn: tuple[str, ...]
    ech: bool


@dataclass(frozen=True)
class HttpRequestHead:
    """An HTTP/1.x request line and its Host; host lower-cased, brackets and port removed."""

    method: str
    target: str
    version: str
    host: str | None
    port: int | None


@dataclass(frozen=True)
class H2Preface:
    """The HTTP/2 prior-knowledge connection preface."""


@dataclass(frozen=True)
class Opaque:
    """Nothing recognisable: relay as opaque TCP."""

    reason: str


Sniffed = TlsHello | HttpRequestHead | H2Preface | Opaque
