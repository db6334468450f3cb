# syntax=docker/dockerfile:1
#
# One image for both roles in a pod: the proxy sidecar (the default command,
# running as uid 2102) and the init container that installs the redirect
# (`egressproxy iptables install --proxy-uid 2102`, run as root with NET_ADMIN;
# that is why iptables is installed here).
#
#   docker build -t egressproxy:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY egressproxy ./egressproxy
# The project's wheel and every dependency's, so the final stage installs
# offline and needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# iptables brings both backends (iptables-nft, iptables-legacy) and ip6tables;
# `egressproxy iptables` picks the one the node uses.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels egressproxy
# uid 2102 is Linkerd's proxy uid and the one the capture rules exempt
# (--proxy-uid 2102): traffic of this user is never redirected back to itself.
RUN groupadd --system --gid 2102 egressproxy \
    && useradd --system --uid 2102 --gid 2102 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin egressproxy
USER 2102:2102
# 15001: the transparent listener the redirect points at; 4191: admin
# (/metrics, /ready, /live, /config).
EXPOSE 15001 4191
# slim has no curl: ask /ready with the standard library (503 while draining), never
# through an http_proxy Docker hands the container (urllib reads no CIDR in no_proxy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:4191/ready', timeout=2).status != 200)"]
ENTRYPOINT ["egressproxy"]
CMD ["run"]
