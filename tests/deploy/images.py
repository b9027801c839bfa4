# Images for the deploy tests, built here because no container registry is reachable.
#
# 1. A base image: Debian bookworm made with `debootstrap --variant=minbase` plus python3 and
#    python3-venv (whose ensurepip gives the image its own pip), then `docker import`; nothing
#    is pulled.  The root filesystem tarball is cached (RAMSTER_TEST_CACHE, else
#    /var/cache/ramster-test as root, else ~/.cache/ramster-test) and the image is tagged with a
#    hash of what went into it, so a second run reuses the image, and a run after `docker image
#    prune` re-imports the tarball in seconds instead of debootstrapping again (about a minute).
# 2. The project image, from deploy/Dockerfile on that base, exactly as a user would build it
#    with a wheelhouse: a copy of the source tree (tracked and untracked-but-not-ignored files,
#    so the shared work tree gets no build/ or egg-info litter), `pip wheel` on the host (the
#    host's Python is 3.11 like bookworm's, so its manylinux wheels install in the image; the
#    native codec is compiled in the work tree's cargo target directory, so the crates the
#    editable install compiled are reused), then
#    `docker build --build-arg BASE_IMAGE=... --build-arg WHEELS=wheelhouse`.
# 3. A Prometheus image: the base plus Debian's own prometheus binary (dynamically linked
#    against the same bookworm libc), with the official image's entrypoint and layout, so
#    docker-compose.yml's prometheus service runs unchanged with PROMETHEUS_IMAGE set to it.
#
# Concurrent test runs share the cache under an flock; project images get a unique tag each.
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT = 1800
BUILD_TIMEOUT = 1200


class ImageBuildError(RuntimeError):
    pass


def run(
    args: list[str],
    *,
    timeout: float = 600,
    cwd: Path | None = None,
    stdin: int | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command, return its stdout; on failure raise with its output tail."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        stdin=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise ImageBuildError(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc.stdout


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def image_exists(tag: str) -> bool:
    proc = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, timeout=60, check=False
    )
    return proc.returncode == 0


def cache_dir() -> Path:
    env = os.environ.get("RAMSTER_TEST_CACHE")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/cache/ramster-test")
    else:
        path = Path.home() / ".cache" / "ramster-test"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    with (cache_dir() / f"{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources), else the default."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M):
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m and not m.group(1).rstrip("/").endswith("-security"):
                    return m.group(1)
        for line in text.splitlines():
            m = re.match(rf"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", line)
            if m and not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1)
    return DEFAULT_MIRROR


def base_tag() -> str:
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)} v1".encode()).hexdigest()[:12]
    return f"ramster-base:{SUITE}-{key}"


def build_base_image() -> str:
    """The debootstrapped base image's tag, building or re-importing it only when absent."""
    tag = base_tag()
    with locked("base"):
        if image_exists(tag):
            return tag
        tarball = cache_dir() / f"{tag.replace(':', '-')}.tar"
        if not tarball.exists():
            _debootstrap(tarball)
        with tarball.open("rb") as fh:
            run(
                ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-", tag],
                stdin=fh.fileno(),
                timeout=600,
            )
    return tag


def _debootstrap(tarball: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap needs root")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                debian_mirror(),
            ],
            timeout=DEBOOTSTRAP_TIMEOUT,
        )
        # Downloaded .debs and package lists are dead weight in an image.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / sub).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        partial.replace(tarball)


def source_files() -> list[str]:
    """Files a checkout of the tree would have: tracked plus untracked-but-not-ignored."""
    out = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


def build_project_image(base: str, workdir: Path) -> str:
    """Build deploy/Dockerfile on `base` from host-built wheels; return the (unique) tag."""
    context = workdir / "context"
    for name in source_files():
        target = context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(context / "wheelhouse"),
            str(context),
        ],
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target")},  # the install's build
    )
    tag = f"ramster-test:{uuid.uuid4().hex[:10]}"
    # The build stage is tagged too (built first, then reused from cache by the full build), so
    # remove_project_image() can delete it: the classic builder would leave it dangling.
    stages: list[tuple[list[str], str]] = [(["--target", "build"], build_stage_tag(tag)), ([], tag)]
    for stage, name in stages:
        run(
            [
                "docker",
                "build",
                "--quiet",
                *stage,
                "--file",
                str(context / "deploy" / "Dockerfile"),
                "--build-arg",
                f"BASE_IMAGE={base}",
                "--build-arg",
                "WHEELS=wheelhouse",
                "--tag",
                name,
                str(context),
            ],
            timeout=BUILD_TIMEOUT,
        )
    return tag


def build_stage_tag(tag: str) -> str:
    return tag.replace("ramster-test:", "ramster-test-build:")


def remove_project_image(tag: str) -> None:
    """Delete the image and its build stage (and with them their untagged parent layers)."""
    remove_image(tag)
    remove_image(build_stage_tag(tag))


PROMETHEUS_DOCKERFILE = """\
FROM {base}
COPY prometheus /bin/prometheus
RUN mkdir -p /etc/prometheus /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


def build_prometheus_image(base: str) -> str:
    """An image like prom/prometheus made of the base and Debian's prometheus binary."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ImageBuildError("the prometheus binary is not installed (apt-get install prometheus)")
    digest = hashlib.sha256(Path(binary).read_bytes() + base.encode()).hexdigest()[:12]
    tag = f"ramster-test-prometheus:{digest}"
    with locked("prometheus"):
        if image_exists(tag):
            return tag
        with tempfile.TemporaryDirectory(prefix="ramster-prometheus-") as tmp:
            shutil.copy2(binary, Path(tmp) / "prometheus")
            (Path(tmp) / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE.format(base=base))
            run(["docker", "build", "--quiet", "--tag", tag, tmp], timeout=BUILD_TIMEOUT)
    return tag


def remove_image(tag: str) -> None:
    subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, timeout=120)


if __name__ == "__main__":
    # By hand: `python -m tests.deploy.images` builds all three and prints their tags.
    base_image = build_base_image()
    print("base:", base_image)
    print("prometheus:", build_prometheus_image(base_image))
    with tempfile.TemporaryDirectory(prefix="ramster-image-") as work:
        print("project:", build_project_image(base_image, Path(work)))
