import sys

from egressproxy.cli import entry

sys.exit(entry())
