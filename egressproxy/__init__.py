"""egressproxy: a transparent egress proxy with Linkerd and OSM egress policies."""
