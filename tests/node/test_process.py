# The daemon as a process: discovering its ports, JSON logs, settings from flags, environment and
# a TOML file, one-line startup errors, and a graceful SIGTERM in the middle of traffic.
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from node.settings import HostPort, SettingsError, parse_size, resolve
from ramster.client import AsyncClient, KeyRange, Outcome, Unavailable
from ramster.client.local import LocalNode


def node_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def events(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_settings_precedence(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('allocator = "zbud"\nnode-id = "from-file"\ngrace = 3\npool_limit = "1Gi"\n')
    env = {"RAMSTER_NODE_ID": "from-env", "RAMSTER_LISTEN": "127.0.0.1:7171"}
    settings = resolve({"listen": "0.0.0.0:7272"}, env, str(config))
    assert settings.listen == HostPort("0.0.0.0", 7272)  # flag beats environment
    assert settings.node_id == "from-env"  # environment beats file
    assert settings.allocator == "zbud" and settings.grace == 3.0  # file beats default
    assert settings.pool_limit == 1 << 30
    assert settings.metrics_listen == HostPort("127.0.0.1", 9170)  # default
    assert resolve({}, {"RAMSTER_METRICS_LISTEN": ""}).metrics_listen is None
    assert resolve({}, {"RAMSTER_CONFIG": str(config)}).allocator == "zbud"


def test_sizes_and_bad_values(tmp_path: Path) -> None:
    assert parse_size("512M") == 512_000_000
    assert parse_size("2Gi") == 2 << 30
    assert parse_size("64Ki") == 65536
    assert parse_size(8192) == 8192
    with pytest.raises(SettingsError, match=r"environment RAMSTER_POOL_LIMIT.*size like"):
        resolve({}, {"RAMSTER_POOL_LIMIT": "lots"})
    with pytest.raises(SettingsError, match=r"flag --allocator.*one of zbud, zsmalloc"):
        resolve({"allocator": "slab"}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match=r"unknown setting.*colour"):
        resolve({}, {}, str(bad))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    out = node_cli("--listen", "nowhere")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr and "Traceback" not in out.stderr
    out = node_cli("--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read config file" in out.stderr
    help_text = node_cli("--help").stdout
    flags = "--listen --metrics-listen --data-dir --pool-limit --allocator --node-id --log-level"
    for flag in [*flags.split(), "--grace", "--config", "RAMSTER_POOL_LIMIT"]:
        assert flag in help_text


def test_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = node_cli(
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", "", "--data-dir", str(tmp_path)
        )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    failed = [e for e in events(out.stderr) if e["event"] == "startup_failed"]
    assert failed and "cannot listen" in str(failed[0]["error"])


def test_two_nodes_cannot_share_a_port(tmp_path: Path) -> None:
    with LocalNode() as first:
        out = node_cli(
            "--listen", first.target, "--metrics-listen", "", "--data-dir", str(tmp_path)
        )
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_a_started_local_node_in_a_with_block_runs_once() -> None:
    """`with node.start()` keeps the one process start() made; a second start() is refused."""
    with LocalNode(metrics=False).start() as node:
        first = node.process
        assert node.process is first and node.running
        with pytest.raises(RuntimeError, match="running already"):
            node.start()
        assert node.process is first
        started = [e for e in events(node.log()) if e["event"] == "listening"]
        assert len(started) == 1
    assert first is not None and first.poll() is not None


def test_listening_event_and_clean_stop() -> None:
    with LocalNode("--node-id", "n1", "--pool-limit", "8Mi") as node:
        assert node.port and node.metrics_port
        first = events(node.log())[0]
        assert first["event"] == "listening" and first["port"] == node.port
        assert first["metrics_port"] == node.metrics_port and first["node_id"] == "n1"
        assert first["pool_limit_bytes"] == 8 << 20
        assert node.stop() == 0
        stopped = [e for e in events(node.log()) if e["event"] == "stopped"]
        assert stopped and "max_loop_stall_ms" in stopped[0]


async def test_sigterm_mid_traffic_finishes_running_rpcs(sample_pages: list[bytes]) -> None:
    with LocalNode("--grace", "60") as node:
        async with AsyncClient(node.target, timeout=60) as client:
            pool = await client.create_pool()
            unary_results: list[str] = []

            async def hammer(oid: int) -> None:
                # unary batches until the node refuses them; each either succeeds or is refused
                for n in range(10_000):
                    try:
                        await client.put_batch(pool, KeyRange(oid, n, 88), sample_pages[:88])
                    except Unavailable:
                        unary_results.append("unavailable")
                        return
                    unary_results.append("ok")

            async with client.stream() as stream:
                first = await stream.put_batch(pool, KeyRange(1, 0, 88), sample_pages[:88])
                assert set(await first) == {Outcome.STORED}
                workers = [asyncio.create_task(hammer(oid)) for oid in (10, 11)]
                for _ in range(6000):  # until both hammers have had a batch stored
                    if unary_results.count("ok") >= 2:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError(f"no unary batch was stored in 60 s: {unary_results}")
                node.send_signal(signal.SIGTERM)
                await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
                # the stream was running when the signal came: it is still served
                later = await stream.get_batch(pool, KeyRange(1, 0, 88))
                assert (await later).pages == sample_pages[:88]
        assert node.wait(timeout=120) == 0
        names = [e["event"] for e in events(node.log())]
        assert names[-3:] == ["draining", "written_back", "stopped"]
    assert unary_results.count("unavailable") == 2 and "ok" in unary_results


def test_a_local_node_started_in_a_source_checkout_runs_the_installed_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ramster demo` run in a clean checkout after `pip install .`: the checkout's `node/` and
    `ramster/` sit in the working directory, without the built extension, and `python -m node`
    imported them (ModuleNotFoundError: ramster.zcache._codec)."""
    shadow = tmp_path / "node"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("raise SystemExit('the checkout was imported')\n")
    monkeypatch.chdir(tmp_path)
    with LocalNode(metrics=False) as node, node.client() as client:
        assert client.health() == "SERVING"
