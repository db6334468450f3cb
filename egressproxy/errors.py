"""The data plane's small error vocabulary: a kind becomes the metrics' `error` label."""

from __future__ import annotations


class UpstreamError(Exception):
    """Connecting to (or talking with) the upstream failed; kind is a short word."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
