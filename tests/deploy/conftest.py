# Fixtures of the deploy tests: the Docker engine, docker compose, and the images of images.py.
#
# Tests that need a tool skip with the reason when it is absent, except under CI (CI=true), where
# .ci/run installs every tool and a missing one is a failure, not a silent skip.  Images are
# session-scoped: the base and Prometheus images are cached across runs, the project image is
# built once per session from the current tree and removed at the end.
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import images

ROOT = images.ROOT


def missing(reason: str) -> None:
    """Skip for a missing tool, or fail under CI, where the tool must be there."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def compose_command() -> list[str] | None:
    """`docker compose` (v2) when the plugin answers, else `docker-compose` (>= 1.28)."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        proc = subprocess.run(
            [*command, "version"], capture_output=True, timeout=60, check=False, text=True
        )
        if proc.returncode == 0:
            return command
    return None


@pytest.fixture(scope="session")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        missing("neither `docker compose` nor `docker-compose` is installed")
    assert command is not None
    return command


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if not images.docker_answers():
        missing("no Docker engine answers `docker info`")


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool is not installed (apt-get install prometheus)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        missing("building the base image needs root and debootstrap (apt-get install debootstrap)")
    return images.build_base_image()


@pytest.fixture(scope="session")
def project_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tag = images.build_project_image(base_image, tmp_path_factory.mktemp("image"))
    yield tag
    images.remove_project_image(tag)


@pytest.fixture(scope="session")
def prometheus_image(base_image: str) -> str:
    if shutil.which("prometheus") is None:
        missing("the prometheus binary is not installed (apt-get install prometheus)")
    return images.build_prometheus_image(base_image)


def node_daemon_present() -> bool:
    return (ROOT / "node" / "main.py").is_file() and (ROOT / "node" / "__main__.py").is_file()


@pytest.fixture(scope="session")
def node_daemon() -> None:
    """The cluster tests need the node daemon (issue: the node), not just the image."""
    if not node_daemon_present():
        pytest.skip("the node daemon (package node/, `ramster-node`) is not in this tree yet")


def data_file(name: str) -> Path:
    return ROOT / "tests" / "data" / name
