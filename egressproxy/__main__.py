"""`python -m egressproxy` and the `egressproxy` command."""

import signal
import sys

from egressproxy.signals import CONTROLS


def entry() -> int:
    """`run` holds its stop and reload signals from here on, until its event loop takes
    them: the imports before it (the loop, h2, prometheus-client) take about 0.1 s, and a
    SIGTERM or SIGHUP then (systemd's start then reload) killed the process by signal."""
    if sys.argv[1:2] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROLS)
    from egressproxy.cli import entry as command

    return command()


if __name__ == "__main__":
    sys.exit(entry())
