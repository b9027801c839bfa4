# `ramster nbd list` as a user runs it: against the node's NBD server, against nbdkit (an NBD
# server nobody here wrote), and against nothing.
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ramster.bench import nbd
from tests.conftest import ramster
from tests.nbd.conftest import MiB, ServerThread, need


def test_lists_exports_with_sizes(nbd_server: ServerThread) -> None:
    done = ramster("nbd", "list", "--target", f"127.0.0.1:{nbd_server.port}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["export", "bytes", "size"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["disk"][1:4] == [str(64 * MiB), "64.0", "MiB"]
    assert rows["small"][1] == str(MiB) and "trim,zero,flush" in rows["small"][5]
    assert lines[0].split()[6] == "contexts" and rows["disk"][6] == "base:allocation"
    as_json = json.loads(
        ramster("nbd", "list", "--json", "--target", f"127.0.0.1:{nbd_server.port}").stdout
    )
    assert [(e["name"], e["size"], e["block_sizes"], e["contexts"]) for e in as_json] == [
        ("disk", 64 * MiB, [1, 4096, 32 * MiB], ["base:allocation"]),
        ("small", MiB, [1, 4096, 32 * MiB], ["base:allocation"]),
    ]


def test_lists_the_exports_of_nbdkit() -> None:
    need("nbdkit")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lister = f"{sys.executable} -m ramster.cli.main nbd list --json --target 127.0.0.1:{port}"
    done = subprocess.run(  # --run: nbdkit runs the command once it listens, then exits
        ["nbdkit", "-i", "127.0.0.1", "-p", str(port), "memory", "size=3M", "--run", lister],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (export,) = json.loads(done.stdout)
    assert (export["name"], export["size"]) == ("", 3 * MiB)
    assert export["contexts"] == ["base:allocation"]


@pytest.mark.parametrize("listen", [["-i", "127.0.0.1", "-p", "0"], ["-U", "-"]])
def test_takes_the_uri_nbdkit_gives_its_clients(listen: list[str]) -> None:
    """nbd://HOST:PORT or nbd+unix:///?socket=PATH, as qemu and nbdinfo take them ($uri)."""
    need("nbdkit")
    if "-p" in listen:  # nbdkit wants a port of its own
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            listen[-1] = str(probe.getsockname()[1])
    lister = f'{sys.executable} -m ramster.cli.main nbd list --json --target "$uri"'
    done = subprocess.run(
        ["nbdkit", *listen, "memory", "size=2M", "--run", f'echo "$uri" >&2; {lister}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("nbd+unix://" if "-U" in listen else "nbd://")
    (export,) = json.loads(done.stdout)
    assert export["size"] == 2 * MiB


@pytest.mark.parametrize("uri", ["nbd://", "nbd://h:99999", "nbd+unix:///e", "http://h:1"])
def test_a_uri_that_names_no_server_is_a_usage_error(uri: str) -> None:
    done = ramster("nbd", "list", "--target", uri)
    assert done.returncode == 2 and "expected HOST:PORT, unix:PATH, nbd://" in done.stderr


def test_nothing_listening_is_one_error_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = ramster("nbd", "list", "--target", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert (
        done.stderr.startswith(f"ramster: error: 127.0.0.1:{port}: ") and "refused" in done.stderr
    )


def test_bench_nbd_runs_both_servers_and_verifies() -> None:
    need("nbdkit", "nbdcopy")
    sample = Path(__file__).parents[1] / "data" / "sample.pages"
    args = ("--corpus", str(sample), "--mib", "8", "--ops", "300", "--repeat", "2", "--json")
    done = ramster("bench", "nbd", *args)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verified"] is True and result["random_ops"] == 300 and result["repeat"] == 2
    for server in ("ramster", "nbdkit"):
        assert result[f"{server}_seq_write_MiBps"] > 0 and result[f"{server}_rss_MiB"] > 0
        assert result[f"{server}_seq_write_first_MiBps"] <= result[f"{server}_seq_write_MiBps"]
        for step in ("seq_write", "seq_read"):  # nbdcopy's CPU, and the cores the step kept busy
            assert result[f"{server}_{step}_client_cpu_s_per_GiB"] > 0
            assert result[f"{server}_{step}_core_use"] > 0
    assert set(result["throughput_vs_nbdkit"]) == {
        "seq_write_first",
        "seq_write",
        "seq_read",
        "rand4k_write",
        "rand4k_read",
    }
    assert set(result["cpu_efficiency_vs_nbdkit"]) == {"seq_write", "seq_read", "rand4k"}
    for step in ("seq_write", "seq_read"):  # the node's CPU per GiB, by thread role
        by_thread = result[f"ramster_{step}_cpu_s_per_GiB_by_thread"]
        assert set(by_thread) == {"loop", "codec", "grpc", "other"}
        assert min(by_thread.values()) >= 0


@pytest.mark.parametrize("how", [("--tls",), ("--unix",), ("--tls", "--unix")])
def test_bench_nbd_over_tls_and_unix_sockets(how: tuple[str, ...]) -> None:
    need("nbdkit", "nbdcopy")
    sample = Path(__file__).parents[1] / "data" / "sample.pages"
    args = ("--corpus", str(sample), "--mib", "4", "--ops", "100", "--repeat", "1", *how)
    done = ramster("bench", "nbd", *args, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verified"] is True and result["tls"] == ("--tls" in how)
    assert result["transport"] == ("unix" if "--unix" in how else "tcp")
    assert result["ramster_seq_read_MiBps"] > 0 and result["nbdkit_seq_read_MiBps"] > 0


def test_a_client_that_dies_is_one_clear_bench_error() -> None:
    with pytest.raises(nbd.BenchError, match=r"^sh -c kill -9 \$\$ failed: killed by signal 9$"):
        nbd._tool("sh", "-c", "kill -9 $$")
    with pytest.raises(nbd.BenchError, match=r"failed: exit status 3$"):
        nbd._tool("sh", "-c", "exit 3")
    with pytest.raises(nbd.BenchError, match=r"failed: no such export$"):
        nbd._tool("sh", "-c", "echo no such export >&2; exit 1")
