# The project image as built from deploy/Dockerfile on the debootstrapped base: what `docker
# image inspect` says about it (non-root user, volume, health check, entrypoint, ports) and what
# running it shows (the CLI works, the data directory and the certificate directory are writable
# by the node's user and the installed code is not, and the node on all interfaces without TLS
# refuses to start: protected mode).
from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.deploy.conftest import node_daemon_present

pytestmark = pytest.mark.docker


def inspect(tag: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    config: dict[str, Any] = json.loads(out)[0]["Config"]
    return config


def run_in(tag: str, entrypoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", entrypoint, tag, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_image_metadata(project_image: str) -> None:
    config = inspect(project_image)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["ramster-node"]
    assert "/var/lib/ramster" in config["Volumes"]
    assert set(config["ExposedPorts"]) == {"7070/tcp", "8070/tcp", "9170/tcp"}
    probe = config["Healthcheck"]["Test"]
    assert probe[:3] == ["CMD", "sh", "-c"]
    assert "ramster health --target 127.0.0.1:7070 ${RAMSTER_TLS_CA:+--tls-ca" in probe[3]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["RAMSTER_LISTEN"] == "0.0.0.0:7070"
    assert env["RAMSTER_METRICS_LISTEN"] == "0.0.0.0:9170"
    assert env["RAMSTER_DATA_DIR"] == "/var/lib/ramster"
    assert env["PATH"].startswith("/opt/ramster/bin:")


def test_image_runs_cli_as_non_root(project_image: str) -> None:
    version = run_in(project_image, "ramster", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("ramster ")
    who = run_in(project_image, "id", "-u")
    assert who.stdout.strip() == "10001"
    # The node's user owns its (fresh, anonymous) data volume but cannot change installed code.
    probe = run_in(
        project_image,
        "sh",
        "-c",
        "touch /var/lib/ramster/probe /etc/ramster/tls/probe && "
        "! touch /opt/ramster/probe 2>/dev/null && echo ok",
    )
    assert probe.stdout.strip() == "ok", probe.stderr


def test_image_has_the_node_daemon(project_image: str) -> None:
    if not node_daemon_present():
        pytest.skip("the node daemon (package node/) is not in this tree yet")
    node = run_in(project_image, "ramster-node", "--version")
    assert node.returncode == 0, node.stderr
    assert node.stdout.startswith("ramster-node ")
    bare = run_in(project_image, "ramster-node")
    assert bare.returncode == 1 and "protected mode: --listen 0.0.0.0:7070" in bare.stderr
