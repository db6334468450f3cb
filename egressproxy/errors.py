"""The data plane's small error vocabulary: a kind becomes the metrics' `error` label."""

from __future__ import annotations

import logging

FORBIDDEN = "forbidden"
"""A TLS or TCP connection the policy denied, closed before anything went upstream (as
Linkerd names it)."""

DNS_ERROR = "dns_error"
"""The resolver gave no answer for a name (a route's backend, or the name a destination is
verified against): unreachable for now, not refused, so to gRPC UNAVAILABLE."""

NO_FILE_DESCRIPTORS = "no_file_descriptors"
"""The open-file limit, or the share of it left for upstream connections, is used up."""

PROXY_ERROR = "proxy_error"
"""The proxy itself failed a connection (the kernel refused it a resource, or a bug): the
connection is reset and counted, never left open."""


def log_proxy_error(log: logging.Logger, where: str, error: Exception) -> None:
    """A proxy_error in one line when the kernel refused a resource (epoll's ENOSPC, say),
    with its traceback when it is anything else: a bug to report."""
    if isinstance(error, OSError):
        log.warning("%s: proxy error: %s", where, error)
    else:
        log.exception("%s: proxy error", where)


class UpstreamError(Exception):
    """Connecting to (or talking with) the upstream failed; kind is a short word."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
