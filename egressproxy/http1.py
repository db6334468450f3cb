"""HTTP/1.x answers the proxy gives itself (403 deny, 502/504 upstream failures)."""

from __future__ import annotations

from http import HTTPStatus


def error_response(status: int, body: str, *, close: bool = True) -> bytes:
    """A complete, small HTTP/1.1 response; the body is plain text ending in a newline."""
    payload = (body + "\n").encode()
    reason = HTTPStatus(status).phrase
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: text/plain",
        f"content-length: {len(payload)}",
    ]
    if close:
        headers.append("connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + payload
