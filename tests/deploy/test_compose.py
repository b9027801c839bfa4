# docker-compose.yml, checked two ways.
#
# 1. Statically, through `compose config` (compose's own parser and interpolation): three nodes
#    with one shared peer list naming all of them on the peer port, distinct node ids and data
#    volumes, each node's own certificate from the one-shot `certs` service (whose CA key volume
#    no node mounts), memory limits, short health checks through `ramster health` over TLS,
#    ports published on 127.0.0.1 only,
#    Prometheus scraping exactly the node services on their metrics port, Grafana under the
#    monitoring profile with the provisioning and dashboard folders mounted where the
#    provisioning files look.
# 2. For real: the project image (built from deploy/Dockerfile on the debootstrapped base) and a
#    Prometheus image (same base, Debian's binary) run the compose file unchanged, under a unique
#    project name with ephemeral host ports, torn down with `down -v` whatever happens.  The test
#    waits for the health checks, takes the cluster CA out of a container, and checks that
#    node1's published port refuses plaintext and a client trusting a foreign CA, and that inside
#    the compose network the peer port refuses a caller without a certificate and node1's
#    certificate claiming to be node2, and that a client call without a token is refused.
#    Through node1's published port (with the CA and tenant app's token) it runs
#    `ramster bench node`,
#    stores a file with `ramster put` and puts 64 MiB of real pages into a 16 MiB pool (so the
#    node reclaims) with the gRPC API.  It lints every node's /metrics with `promtool check
#    metrics`, checks that Prometheus scrapes all three nodes and finds the dashboard's metric
#    names, `docker kill`s node3, reads every accepted page back through node1 (the file with
#    `ramster get`) while node3 is down, restarts node3, waits for it to be healthy and reads
#    everything back once more.
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ramster.bench.corpus import load_corpus
from ramster.certs import make_bundle
from tests.deploy.conftest import ROOT, data_file
from tests.deploy.test_monitoring import dashboard_metric_names, exported_names

COMPOSE_FILE = ROOT / "docker-compose.yml"
NODES = ("node1", "node2", "node3")
HEALTH_TIMEOUT = 180.0
SCRAPE_TIMEOUT = 90.0
WORKLOAD_PAGES = 16384  # 64 MiB of pages into a 16 MiB pool: enough to make the node reclaim
POOL_LIMIT = "16Mi"
# Dashboard metrics of features that are not built yet (peers, remote pages, re-replication).
# A name here may already be exported; a dashboard name that is neither exported by a node nor
# listed here fails the test (a typo, or a renamed metric).
NOT_YET_EXPORTED: set[str] = set()  # every name the dashboard queries is exported now
CERTS = "/etc/ramster/tls"
# Run inside node1's container with its own Python: calls node3's peer port as an attacker would.
PEER_ATTACKS = """
import grpc
from ramster.v1 import peer_pb2 as pb, peer_pb2_grpc
ca = open("/etc/ramster/tls/ca.crt", "rb").read()
cert = open("/etc/ramster/tls/nodes/node1.crt", "rb").read()
key = open("/etc/ramster/tls/nodes/node1.key", "rb").read()
claim = pb.HeartbeatRequest(sender=pb.Owner(node_id="node2", incarnation="x"))
for name, creds in [
    ("no certificate", grpc.ssl_channel_credentials(ca)),
    ("node1 as node2", grpc.ssl_channel_credentials(ca, key, cert)),
]:
    with grpc.secure_channel("node3:8070", creds) as channel:
        try:
            peer_pb2_grpc.PeerStub(channel).Heartbeat(claim, timeout=10)
            print(name, "OK")
        except grpc.RpcError as exc:
            print(name, exc.code().name)
"""


def compose_config(compose: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [*compose, "--file", str(COMPOSE_FILE), "--profile", "monitoring", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, for compose v1 strings and v2 mappings alike."""
    pairs = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            pairs.append((str(entry["source"]), str(entry["target"])))
        else:
            source, target = str(entry).split(":")[:2]
            pairs.append((source, target))
    return pairs


def published(service: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """container port -> (host ip, host port) for compose v1 strings and v2 mappings alike."""
    ports: dict[int, tuple[str, str]] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = (
                entry.get("host_ip", ""),
                str(entry.get("published", "")),
            )
        else:
            parts = str(entry).split("/")[0].split(":")
            ports[int(parts[-1])] = (parts[0] if len(parts) == 3 else "", parts[-2])
    return ports


def test_compose_file_is_consistent(compose: list[str]) -> None:
    config = compose_config(compose, {"RAMSTER_IMAGE": "example/ramster:1.2.3"})
    services = config["services"]
    assert set(NODES) | {"prometheus", "grafana"} <= set(services)
    peers = {env_of(services[name])["RAMSTER_PEERS"] for name in NODES}
    assert len(peers) == 1, "every node must get the same peer list"
    assert sorted(peers.pop().split(",")) == [f"{name}:8070" for name in NODES]
    certs = services["certs"]
    assert "ramster certs --out /etc/ramster/tls --ca-dir /var/lib/ramster-ca" in str(
        certs["command"]
    )
    assert "--nodes node1,node2,node3" in str(certs["command"])
    assert "ramster tokens --out /etc/ramster/tls/tokens.toml" in str(certs["command"])
    assert {target for _, target in mounts(certs)} == {CERTS, "/var/lib/ramster-ca"}
    assert {env_of(services[name])["RAMSTER_NODE_ID"] for name in NODES} == set(NODES)
    volumes = set()
    for name in NODES:
        node = services[name]
        env = env_of(node)
        assert node["image"] == "example/ramster:1.2.3", "RAMSTER_IMAGE must pick the image"
        assert node["build"]["dockerfile"] == "deploy/Dockerfile"
        assert "BASE_IMAGE" in node["build"]["args"]
        assert env["RAMSTER_LISTEN"].endswith(":7070")
        assert env["RAMSTER_PEER_LISTEN"].endswith(":8070")
        assert env["RAMSTER_TLS_CERT"] == f"{CERTS}/nodes/{name}.crt"
        assert env["RAMSTER_TLS_KEY"] == f"{CERTS}/nodes/{name}.key"
        assert env["RAMSTER_TLS_CA"] == f"{CERTS}/ca.crt"
        assert env["RAMSTER_TOKENS"] == f"{CERTS}/tokens.toml", "a reachable port needs tokens"
        assert node["depends_on"]["certs"]["condition"] == "service_completed_successfully"
        assert "/var/lib/ramster-ca" not in {t for _, t in mounts(node)}, "no node has the CA key"
        assert ("certs", CERTS) in mounts(node), "each node mounts the certificates"
        assert env["RAMSTER_METRICS_LISTEN"].endswith(":9170")
        assert int(env["RAMSTER_REPLICAS"]) >= 1
        assert node["mem_limit"], "each node needs a memory limit"
        health = node["healthcheck"]
        assert health["test"] == [
            *["CMD", "ramster", "health", "--target", "127.0.0.1:7070"],
            *["--tls-ca", f"{CERTS}/ca.crt"],
        ]
        assert float(str(health["interval"]).rstrip("s")) <= 5
        data = [source for source, target in mounts(node) if target == env["RAMSTER_DATA_DIR"]]
        assert len(data) == 1 and not data[0].startswith("/"), "data must be a named volume"
        volumes.add(data[0])
        ports = published(node)
        assert ports[9170][0] == "127.0.0.1", f"{name} metrics must be published on loopback"
        assert 8070 not in ports, "the peer port stays inside the compose network"
    assert len(volumes) == 3, "each node needs its own data volume"
    assert published(services["node1"])[7070] == ("127.0.0.1", "7070")

    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "ramster")
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:9170" for name in NODES}
    prometheus = services["prometheus"]
    assert (
        str(ROOT / "deploy/prometheus/prometheus.yml"),
        "/etc/prometheus/prometheus.yml",
    ) in mounts(prometheus)
    grafana = services["grafana"]
    assert grafana.get("profiles") == ["monitoring"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/ramster.yml").read_text()
    )
    dashboards_path = provider["providers"][0]["options"]["path"]
    grafana_mounts = set(mounts(grafana))
    assert (str(ROOT / "deploy/grafana/dashboards"), dashboards_path) in grafana_mounts
    assert (
        str(ROOT / "deploy/grafana/provisioning"),
        "/etc/grafana/provisioning",
    ) in grafana_mounts
    # Only Grafana waits for the profile: a plain `up` starts the nodes and Prometheus.
    assert all("profiles" not in services[name] for name in (*NODES, "prometheus", "certs"))


class Cluster:
    """One compose project of this test: commands, ports, health, logs."""

    def __init__(self, compose: list[str], env: dict[str, str]) -> None:
        self.project = f"ramster-test-{uuid.uuid4().hex[:8]}"
        self.base = [*compose, "--file", str(COMPOSE_FILE), "--project-name", self.project]
        self.env = {**os.environ, **env}

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service).strip()
        assert cid, f"{service} has no container"
        return cid

    def address(self, service: str, port: int) -> str:
        host_port = self.run("port", service, str(port)).strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", host_port), host_port
        return host_port

    def state(self, service: str) -> tuple[str, str]:
        out = subprocess.run(
            [
                "docker",
                "inspect",
                "--format",
                "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                self.container(service),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        return out[0], (out[1] if len(out) > 1 else "")

    def wait_healthy(self, services: tuple[str, ...], timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {name: self.state(name) for name in services}
            if all(health == "healthy" for _, health in states.values()):
                return
            dead = [name for name, (status, _) in states.items() if status in ("exited", "dead")]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"not healthy: {states}\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", timeout=120, check=False)

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def ramster_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The `ramster` command of this checkout, as a user on the host would run it."""
    return subprocess.run(
        [sys.executable, "-m", "ramster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def poll(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Call check() until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet, connection reset, ...
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def promql(prometheus: str, query: str) -> list[dict[str, Any]]:
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(http_get(url))
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


@pytest.fixture
def cluster(
    compose: list[str], project_image: str, prometheus_image: str, node_daemon: None
) -> Iterator[Cluster]:
    ephemeral = {f"RAMSTER_{n.upper()}_METRICS_PORT": "" for n in NODES}
    cluster = Cluster(
        compose,
        {
            "RAMSTER_IMAGE": project_image,
            "PROMETHEUS_IMAGE": prometheus_image,
            "RAMSTER_POOL_LIMIT": POOL_LIMIT,
            "RAMSTER_NODE1_PORT": "",
            "PROMETHEUS_PORT": "",
            **ephemeral,
        },
    )
    try:
        cluster.run("up", "--detach", "--no-build", *NODES, "prometheus", timeout=600)
        yield cluster
    finally:
        cluster.down()


@pytest.mark.docker
def test_compose_cluster_survives_a_killed_node(
    cluster: Cluster, promtool: str, tmp_path: Path
) -> None:
    from tests.deploy.workload import Workload  # needs ramster.v1, which comes with the node

    cluster.wait_healthy(NODES)
    target = cluster.address("node1", 7070)
    ca = tmp_path / "ca.crt"
    subprocess.run(
        ["docker", "cp", f"{cluster.container('node1')}:{CERTS}/ca.crt", str(ca)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    token = tmp_path / "app.token"
    subprocess.run(
        ["docker", "cp", f"{cluster.container('node1')}:{CERTS}/tenants/app.token", str(token)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    tls = ("--tls-ca", str(ca), "--token-file", str(token))

    # Plaintext and a foreign CA are refused at node1's published port; the peer port (inside
    # the compose network) refuses a caller without a certificate and a node speaking for another.
    foreign = make_bundle(tmp_path / "foreign", NODES)
    for attempt in [(), ("--tls-ca", str(foreign.ca))]:
        refused = ramster_cli("health", "--target", target, "--timeout", "5", *attempt)
        assert refused.returncode == 1 and "UNREACHABLE" in refused.stdout, refused.stdout
    assert ramster_cli("health", "--target", target, *tls).returncode == 0
    anonymous = ramster_cli("pools", "list", "--target", target, "--tls-ca", str(ca))
    assert anonymous.returncode == 2 and "UNAUTHENTICATED" in anonymous.stderr, anonymous.stderr
    attacks = cluster.run("exec", "-T", "node1", "python", "-c", PEER_ATTACKS)
    assert attacks.split("\n")[:2] == [
        "no certificate UNAVAILABLE",
        "node1 as node2 PERMISSION_DENIED",
    ]

    # What a user would run against the published port: the node benchmark (verifies every
    # page), then a file stored with `ramster put`, then the bulk workload that overflows the pool.
    bench = ramster_cli(
        "bench", "node", "--target", target, *tls, "--corpus", str(data_file("sample.pages")),
        "--pages", "2048", "--json",
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["verified"] is True
    pages = load_corpus(data_file("sample.pages"))
    stored_file = tmp_path / "stored.bin"
    stored_file.write_bytes(b"".join(pages[:40]) + pages[40][:1000])  # compressible, padded
    pool = ramster_cli("pools", "create", "--target", target, *tls)
    assert pool.returncode == 0, pool.stderr
    pool_id = pool.stdout.strip()
    put = ramster_cli(
        "put", "--target", target, *tls, "--pool", pool_id, "--oid", "1", str(stored_file)
    )
    assert put.returncode == 0, put.stdout + put.stderr

    def file_reads_back() -> bool:
        out = tmp_path / "read.bin"
        get = ramster_cli(
            "get", "--target", target, *tls, "--pool", pool_id, "--oid", "1", "--pages", "41",
            "--length", str(stored_file.stat().st_size), str(out),
        )  # fmt: skip
        assert get.returncode == 0, get.stdout + get.stderr
        return out.read_bytes() == stored_file.read_bytes()

    workload = Workload(target, pages, WORKLOAD_PAGES, ca.read_bytes(), token.read_text().strip())
    workload.put()
    print(f"workload outcomes: {workload.outcomes}")
    assert workload.accepted, f"node1 accepted no page: {workload.outcomes}"
    assert workload.verify() == []
    assert file_reads_back()

    # Every node's metrics pass Prometheus' own linter.
    scraped: dict[str, str] = {}
    for name in NODES:
        text = http_get(f"http://{cluster.address(name, 9170)}/metrics").decode()
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0, f"{name}: {lint.stdout}{lint.stderr}"
        scraped[name] = text
    exported = exported_names(scraped["node1"])
    unknown = dashboard_metric_names() - exported - NOT_YET_EXPORTED
    assert not unknown, f"the dashboard queries metrics no node exports: {sorted(unknown)}"
    print(f"dashboard metrics not exported yet: {sorted(dashboard_metric_names() - exported)}")

    # Prometheus, configured by deploy/prometheus/prometheus.yml, scrapes all three nodes.
    prometheus = cluster.address("prometheus", 9090)

    def all_up() -> bool:
        up = promql(prometheus, 'up{job="ramster"} == 1')
        return {series["metric"].get("node") for series in up} == set(NODES)

    poll("Prometheus to scrape every node", all_up, SCRAPE_TIMEOUT)
    poll(
        "Prometheus to see node1's puts",
        lambda: promql(prometheus, f'ramster_puts_total{{node="node1"}} >= {WORKLOAD_PAGES}'),
        SCRAPE_TIMEOUT,
    )
    limits = promql(prometheus, "ramster_pool_limit_bytes")
    assert {s["metric"]["node"]: float(s["value"][1]) for s in limits} == {
        name: 16 * 1024 * 1024 for name in NODES
    }

    # Kill node3: every page node1 accepted still reads back, while node3 is down.
    killed = cluster.container("node3")
    subprocess.run(["docker", "kill", killed], capture_output=True, timeout=60, check=True)
    assert cluster.state("node3")[0] == "exited"
    assert cluster.state("node1") == ("running", "healthy")
    assert workload.verify() == []
    assert file_reads_back()
    assert cluster.state("node3")[0] == "exited", "node3 came back before the reads finished"
    poll(
        "Prometheus to see node3 down",
        lambda: promql(prometheus, 'up{job="ramster",node="node3"} == 0'),
        SCRAPE_TIMEOUT,
    )

    # Bring it back; the cluster is whole again and still has every page.
    cluster.run("start", "node3")
    cluster.wait_healthy(NODES)
    assert workload.verify() == []
    assert file_reads_back()
    poll("Prometheus to scrape every node again", all_up, SCRAPE_TIMEOUT)
