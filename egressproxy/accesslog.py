"""One structured line per TCP/TLS connection or HTTP request, and the process's log output.

Every record, access lines included, goes through a queue to one thread that
formats and writes it to stderr, so a slow or blocked stderr never stalls the
event loop. Admin requests (/metrics scrapes too) are never access-logged.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import time
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener

from egressproxy.policy.decision import Action, Decision, Destination, RouteProtocol
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import LogFormat, Settings

ACCESS_LOGGER = "egressproxy.access"
ACCESS_FIELDS = "access"
"""The LogRecord attribute holding an access line's fields."""

PER_REQUEST = frozenset({RouteProtocol.HTTP, RouteProtocol.GRPC})
"""Connections handed to the HTTP handlers, which log each request instead."""

_TEXT_SPECIAL = frozenset(' "=\\')


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
    if destination.ip.version == 6:
        return f"[{destination.ip}]:{destination.port}"
    return f"{destination.ip}:{destination.port}"


def connection_fields(record: FlowRecord, duration: float) -> dict[str, object]:
    return {
        "client": record.client,
        "destination": address_text(record.destination),
        "protocol": record.detected.value if record.detected else "",
        "hostname": record.hostname or "",
        "ech": record.ech,
        "route": route_text(record.decision),
        "decision": decision_word(record.decision),
        "status": "",
        "error": record.error,
        "bytes_sent": record.bytes_from_client,
        "bytes_received": record.bytes_from_upstream,
        "duration": round(duration, 6),
    }


def request_fields(record: RequestRecord, duration: float) -> dict[str, object]:
    if record.grpc:
        status = "" if record.grpc_status is None else str(record.grpc_status)
    else:
        status = "" if record.status is None else str(record.status)
    return {
        "client": record.client,
        "destination": address_text(record.destination),
        "protocol": "grpc" if record.grpc else record.protocol,
        "hostname": record.hostname or "",
        "route": route_text(record.decision),
        "decision": decision_word(record.decision),
        "method": record.method,
        "path": record.path,
        "status": status,
        "error": record.error,
        "bytes_sent": record.bytes_from_client,
        "bytes_received": record.bytes_from_upstream,
        "duration": round(duration, 6),
    }


class AccessLog:
    """The Accounting that writes access lines; it only builds a dict on the event loop."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def connection_opened(self) -> None:
        """Lines are written when a connection ends."""

    def connection_decided(self, record: FlowRecord) -> None:
        """Lines are written when a connection ends."""

    def connection_closed(self, record: FlowRecord) -> None:
        if record.decision is not None and record.decision.protocol in PER_REQUEST:
            return
        if self.logger.isEnabledFor(logging.INFO):
            fields = connection_fields(record, _since(record.started))
            self.logger.info("access", extra={ACCESS_FIELDS: fields})

    def request_finished(self, record: RequestRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            fields = request_fields(record, _since(record.started))
            self.logger.info("access", extra={ACCESS_FIELDS: fields})

    def policy_reloaded(self, ok: bool, generation: int) -> None:
        """The policy store logs reloads itself."""


def _since(started: float) -> float:
    return time.monotonic() - started


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text:
        return "-"
    if any(char in _TEXT_SPECIAL or not char.isprintable() for char in text):
        return json.dumps(text)
    return text


class LineFormatter(logging.Formatter):
    """One line per record, access lines and diagnostics alike, as text or JSON."""

    def __init__(self, log_format: LogFormat) -> None:
        super().__init__()
        self.json = log_format is LogFormat.JSON

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] | None = getattr(record, ACCESS_FIELDS, None)
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        time_text = _timestamp(record.created)
        if self.json:
            if fields is not None:
                document: dict[str, object] = {"time": time_text, "log": "access", **fields}
            else:
                document = {
                    "time": time_text,
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": message,
                }
            return json.dumps(document, separators=(",", ":"))
        if fields is not None:
            pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
            return f"{time_text} access {pairs}"
        return f"{time_text} {record.levelname} {record.name} {message}"


_listener: QueueListener | None = None
_fork_hooks_registered = False


def setup_logging(settings: Settings) -> None:
    """Route every log record through a queue to a writer thread, formatted as asked."""
    global _listener, _fork_hooks_registered
    shutdown_logging()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(LineFormatter(settings.log_format))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(QueueHandler(records))
    root.setLevel(settings.log_level.upper())
    _listener = QueueListener(records, writer)
    _listener.start()
    if not _fork_hooks_registered:
        # A writer thread does not survive fork(), and one caught holding
        # stderr's lock would hang the child: stop it around every fork.
        os.register_at_fork(
            before=_pause_writer, after_in_parent=_resume_writer, after_in_child=_resume_writer
        )
        _fork_hooks_registered = True


def shutdown_logging() -> None:
    """Write out every queued record and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def _pause_writer() -> None:
    if _listener is not None:
        _listener.stop()


def _resume_writer() -> None:
    if _listener is not None:
        _listener.start()
