"""The deployment files read as a user would read them: the Kubernetes manifests,
the Dockerfile and the systemd unit agree with each other and with the command line
(ports, probes, the proxy's uid that the capture rule exempts, privileges)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressproxy.cli import build_parser
from egressproxy.policy.loader import load_policy_text
from egressproxy.settings import ADMIN_PORT, PROXY_PORT, Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "config" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "config" / "systemd" / "egressproxy.service"
POLICY_DIR = "/etc/egressproxy"

Doc = dict[str, Any]


def kubernetes_documents() -> list[Doc]:
    documents: list[Doc] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def only(documents: list[Doc], kind: str) -> Doc:
    found = [doc for doc in documents if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def documents() -> list[Doc]:
    return kubernetes_documents()


@pytest.fixture(scope="module")
def pod(documents: list[Doc]) -> Doc:
    spec: Doc = only(documents, "Deployment")["spec"]["template"]
    return spec


def containers(pod: Doc) -> Iterator[Doc]:
    yield from pod["spec"].get("initContainers", [])
    yield from pod["spec"]["containers"]


def init_container(pod: Doc) -> Doc:
    found = [c for c in containers(pod) if c.get("args", [])[:2] == ["iptables", "install"]]
    assert len(found) == 1
    return found[0]


def proxy_container(pod: Doc) -> Doc:
    found = [c for c in containers(pod) if c.get("args", [])[:1] == ["run"]]
    assert len(found) == 1
    return found[0]


def app_containers(pod: Doc) -> list[Doc]:
    special = {init_container(pod)["name"], proxy_container(pod)["name"]}
    return [c for c in containers(pod) if c["name"] not in special]


def probe_port(container: Doc, probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(named[port])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_uid() -> int:
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert len(users) == 1
    return int(users[0].split(":")[0])


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of the unit, in order; repeated keys kept."""
    entries, section = [], ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            entries.append((section, key, value))
    return entries


def unit_values(key: str) -> list[str]:
    return [value for section, k, value in unit_entries() if k == key and section == "Service"]


# --- Kubernetes ------------------------------------------------------------------------------


def test_every_document_is_a_named_kubernetes_object(documents: list[Doc]) -> None:
    assert documents
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"]


def test_manifest_args_are_valid_command_lines(pod: Doc) -> None:
    parser = build_parser()
    for container in (init_container(pod), proxy_container(pod)):
        parser.parse_args(container["args"])


def test_the_init_container_exempts_the_uid_the_proxy_runs_as(pod: Doc) -> None:
    install = build_parser().parse_args(init_container(pod)["args"])
    proxy = proxy_container(pod)["securityContext"]
    assert install.mode == "sidecar"
    assert install.proxy_uid == proxy["runAsUser"] == dockerfile_uid()
    assert proxy["runAsNonRoot"] is True
    for app in app_containers(pod):
        assert app["securityContext"]["runAsUser"] != install.proxy_uid, (
            f"{app['name']} runs as the proxy's uid: its traffic would not be captured"
        )


def test_ports_agree_with_the_redirect_probes_and_annotations(pod: Doc) -> None:
    install = build_parser().parse_args(init_container(pod)["args"])
    proxy = proxy_container(pod)
    run = build_parser().parse_args(proxy["args"])
    assert install.proxy_port == PROXY_PORT
    assert run.listen is None, "the proxy listens on the default :15001 the redirect targets"
    assert run.admin.port == ADMIN_PORT
    assert {p["containerPort"] for p in proxy["ports"]} == {PROXY_PORT, ADMIN_PORT}
    probes = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/live"}
    for probe, path in probes.items():
        assert proxy[probe]["httpGet"]["path"] == path
        assert probe_port(proxy, probe) == ADMIN_PORT
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_net_admin_only_for_the_init_container_everything_else_dropped(pod: Doc) -> None:
    init = init_container(pod)["securityContext"]
    assert init["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert init["runAsUser"] == 0
    for container in containers(pod):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        if container is not init_container(pod):
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert security["runAsNonRoot"] is True
            assert security.get("privileged") is not True


def test_the_proxy_knows_its_namespace_and_identity_from_the_downward_api(pod: Doc) -> None:
    env = {
        item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"]
        for item in proxy_container(pod)["env"]
    }
    assert env == {
        "POD_NAMESPACE": "metadata.namespace",
        "POD_SERVICE_ACCOUNT": "spec.serviceAccountName",
    }


def test_the_proxy_has_resources_requested_and_limited(pod: Doc) -> None:
    resources = proxy_container(pod)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_the_proxy_drains_within_the_grace_period(pod: Doc) -> None:
    run = build_parser().parse_args(proxy_container(pod)["args"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > run.drain_timeout


def test_the_policy_comes_from_the_configmap(documents: list[Doc], pod: Doc) -> None:
    proxy = proxy_container(pod)
    run = build_parser().parse_args(proxy["args"])
    assert str(run.policy) == f"{POLICY_DIR}/policy.yaml"
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    configmap = only(documents, "ConfigMap")
    assert volumes[mounts[POLICY_DIR]]["configMap"]["name"] == configmap["metadata"]["name"]
    deployment = only(documents, "Deployment")
    assert configmap["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_a_read_only_proxy_has_a_writable_tmp_for_its_workers(pod: Doc) -> None:
    """--workers N > 1 keeps the workers' metrics files in a temporary directory."""
    proxy = proxy_container(pod)
    assert proxy["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_the_configmap_holds_the_linkerd_guide_policy(documents: list[Doc]) -> None:
    text = only(documents, "ConfigMap")["data"]["policy.yaml"]
    kinds = [doc["kind"] for doc in yaml.safe_load_all(text)]
    assert kinds.count("EgressNetwork") == 1
    assert {"HTTPRoute", "TLSRoute"} <= set(kinds)
    model = load_policy_text(text, "policy.yaml")
    assert [network.id.name for network in model.networks] == ["all-egress-traffic"]
    assert {route.ref.name for route in model.routes} == {
        "httpbin-get",
        "tls-egress",
        "unencrypted-http",
    }
    namespace = only(documents, "Deployment")["metadata"]["namespace"]
    assert {network.id.namespace for network in model.networks} == {namespace}


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_builds_a_wheel_and_runs_it_unprivileged() -> None:
    instructions = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=")[1] for k, rest in instructions if k == "ARG"}
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) == 2
    assert all(stage.split()[0] == "${PYTHON_IMAGE}" for stage in stages)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    build_at, final_at = (i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    build, final = instructions[build_at:final_at], instructions[final_at:]
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in build)
    runs = " ".join(rest for k, rest in final if k == "RUN")
    assert re.search(r"apt-get install .*\biptables\b", runs)
    assert "pip install" in runs
    assert dockerfile_uid() == 2102


def test_dockerfile_ports_healthcheck_and_command() -> None:
    instructions = dict(dockerfile_instructions())
    assert set(instructions["EXPOSE"].split()) == {str(PROXY_PORT), str(ADMIN_PORT)}
    healthcheck = instructions["HEALTHCHECK"]
    assert f"http://127.0.0.1:{ADMIN_PORT}/ready" in healthcheck
    assert "urllib.request" in healthcheck
    assert json.loads(instructions["ENTRYPOINT"]) == ["egressproxy"]
    assert json.loads(instructions["CMD"]) == ["run"]
    build_parser().parse_args(json.loads(instructions["CMD"]))


class Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ready" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_healthcheck_asks_the_admin_server_not_an_http_proxy() -> None:
    """Docker hands a client's configured proxies to every container as http_proxy, and
    its documented no_proxy form `127.0.0.0/8` is a CIDR urllib does not read: the
    healthcheck must still ask the proxy's own admin server, not the HTTP proxy."""
    _, command = dict(dockerfile_instructions())["HEALTHCHECK"].split(" CMD ", 1)
    argv = json.loads(command)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        admin = f"127.0.0.1:{ADMIN_PORT}/"
        assert admin in argv[-1]
        script = argv[-1].replace(admin, f"127.0.0.1:{server.server_address[1]}/")
        proxies = {"http_proxy": f"http://127.0.0.1:{dead}", "no_proxy": "127.0.0.0/8"}
        done = subprocess.run(
            [sys.executable, *argv[1:-1], script],
            env={"PATH": "/usr/bin:/bin", **proxies},
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert argv[0] == "python"
    assert done.returncode == 0, done.stderr.decode()


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            copied.update(rest.split()[:-1])
    assert copied == allowed == {"pyproject.toml", "README.md", "egressproxy"}


# --- systemd ---------------------------------------------------------------------------------


def test_setup_opens_the_venv_and_only_lets_others_pass_through_its_parents() -> None:
    """With EGRESSPROXY_VENV in a home directory, setup made the whole home readable by
    every user, recursively (`chmod -R a+rX` of the venv's parent), private keys included.
    The venv's pip and python here are stand-ins, so nothing is installed."""
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        keys, venv = home / ".ssh", home / "venv"
        (venv / "bin").mkdir(parents=True)
        keys.mkdir()
        (keys / "id_ed25519").write_text("PRIVATE KEY\n")
        for stand_in in ("python", "pip"):
            (venv / "bin" / stand_in).write_text("#!/bin/sh\nexit 0\n")
            (venv / "bin" / stand_in).chmod(0o700)
        (keys / "id_ed25519").chmod(0o600)
        for directory in (keys, home, Path(scratch)):
            directory.chmod(0o700)
        done = subprocess.run(
            [str(ROOT / "scripts/setup")],
            env={**os.environ, "EGRESSPROXY_VENV": str(venv)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        modes = {path: path.stat().st_mode & 0o777 for path in (keys, keys / "id_ed25519")}
        assert modes == {keys: 0o700, keys / "id_ed25519": 0o600}
        assert home.stat().st_mode & 0o777 == 0o711
        assert (venv / "bin" / "python").stat().st_mode & 0o777 == 0o755
        assert f"letting other users pass through {home} (chmod a+x)" in done.stdout


def test_the_unit_readme_links_the_console_script_scripts_setup_makes() -> None:
    venv = re.search(r"EGRESSPROXY_VENV:-([^}]+)}", (ROOT / "scripts/setup").read_text())
    assert venv is not None
    readme = (ROOT / "config/systemd/README.md").read_text()
    (source,) = re.findall(r"ln -s (\S+) /usr/local/bin/", readme)
    assert source == f"{venv.group(1)}/bin/egressproxy"


def test_unit_runs_as_a_fixed_user_and_brackets_the_redirect() -> None:
    assert unit_values("User") == ["egressproxy"]
    assert unit_values("DynamicUser") in ([], ["no"])
    (pre,) = unit_values("ExecStartPre")
    (post,) = unit_values("ExecStopPost")
    (start,) = unit_values("ExecStart")
    assert pre.startswith("+") and post.startswith("+"), "the rules need full privileges"
    script = shlex.split(pre[1:])
    assert script[:2] == ["/bin/sh", "-c"]
    install = script[2].replace("$$", "$")
    assert 'exec egressproxy iptables install --proxy-uid "$uid"' in install
    assert "uid=$(id -u egressproxy)" in install
    parser = build_parser()
    parser.parse_args(["iptables", "install", "--proxy-uid", "2102"])
    assert shlex.split(post[1:])[:3] == ["egressproxy", "iptables", "uninstall"]
    parser.parse_args(shlex.split(post[1:])[1:])
    assert shlex.split(start)[:2] == ["egressproxy", "run"]
    parser.parse_args(shlex.split(start)[1:])


def test_unit_stops_gently_and_restarts_on_failure() -> None:
    assert unit_values("KillSignal") == ["SIGTERM"]
    (timeout,) = unit_values("TimeoutStopSec")
    assert int(timeout) > Settings().drain_timeout
    assert unit_values("Restart") == ["on-failure"]
    assert unit_values("ExecReload") == ["/bin/kill -HUP $MAINPID"]


def test_unit_is_hardened() -> None:
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    }.items():
        assert unit_values(key) == [value], key


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify, with the console script (not installed here) replaced by
    /bin/true: every other directive and value must be known to systemd."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is part of the test image"
    text = UNIT.read_text()
    text = text.replace("ExecStart=egressproxy", "ExecStart=/bin/true")
    text = text.replace("ExecStopPost=+egressproxy", "ExecStopPost=+/bin/true")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
