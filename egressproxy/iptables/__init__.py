"""Capture: the netfilter rules that send a workload's TCP to the proxy.

`rules` turns options and the current `iptables-save` output into
`iptables-restore` text without touching the system; `apply` runs the
binaries (and, where netlink fits, pyroute2) and turns failures into one-line
errors.
"""
