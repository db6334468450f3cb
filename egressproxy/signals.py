"""The signals that stop and reload the proxy, in a module that imports nothing else: the
console entry holds them before the rest of the proxy is imported."""

from __future__ import annotations

import signal

STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
HURRY = signal.SIGUSR1
"""The supervisor's word to its workers that a second stop came: end the drain at once.
Another SIGTERM or SIGINT to a worker is no such word, as systemd (KillMode=control-group)
and Ctrl-C send one to every process of the proxy, and the supervisor forwards its own."""
CONTROLS = STOPS | {signal.SIGHUP, HURRY}
