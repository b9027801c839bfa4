# Prometheus and Grafana files, checked without a cluster.
#
# The Prometheus configs pass Debian's `promtool check config` (the Kubernetes one with its pod
# discovery swapped for static targets when this promtool was built without Kubernetes support,
# as Debian's is), and their relabel rules do what the dashboard relies on: a `node` label per
# node.  The Grafana dashboard is checked for what Grafana would otherwise only show at run time:
# every panel queries the provisioned data source by its uid, has targets with unique refIds,
# fits the 24-column grid without overlapping another; and every query is valid PromQL, proved by
# `promtool check rules` on a rule file made of the queries.  dashboard_metric_names() and
# exported_names() are shared with the compose test, which compares them with live nodes.
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ramster.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$node": ".*"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(board) for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords or
    labels (label matchers, grouping lists, ranges and strings are cut out first)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if not rest.startswith("(") and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard_metric_names() -> set[str]:
    """Metric names the dashboard queries, less Prometheus' own `up`."""
    names: set[str] = set()
    for expr in expressions(dashboard()):
        names |= metric_names(expr)
    return names - {"up"}


def exported_names(exposition: str) -> set[str]:
    """Series names a /metrics page offers: samples, and families declared with no samples yet
    (a labelled counter before its first increment), histograms with their derived series."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def prometheus_regex(regex: str, text: str) -> re.Match[str] | None:
    """Prometheus anchors relabel regexes at both ends."""
    return re.fullmatch(regex, text)


def promtool_check(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_compose_prometheus_config(promtool: str) -> None:
    path = PROMETHEUS / "prometheus.yml"
    check = promtool_check(promtool, "config", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(path.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ramster")
    rule = next(r for r in job["relabel_configs"] if r["target_label"] == "node")
    assert rule["source_labels"] == ["__address__"]
    for target in (t for group in job["static_configs"] for t in group["targets"]):
        match = prometheus_regex(rule["regex"], target)
        assert match is not None, target
        assert match.expand(rule["replacement"].replace("$1", r"\1")) == target.split(":")[0]


def test_kubernetes_prometheus_config(promtool: str, tmp_path: Path) -> None:
    path = PROMETHEUS / "kubernetes.yml"
    check = promtool_check(promtool, "config", str(path))
    if check.returncode != 0 and "kubernetes_sd_configs not found" in check.stdout + check.stderr:
        # This promtool lacks Kubernetes discovery (Debian builds it without): check the rest.
        config = yaml.safe_load(path.read_text())
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
            job["static_configs"] = [{"targets": ["ramster-0.ramster-peers:9170"]}]
        swapped = tmp_path / "kubernetes-static.yml"
        swapped.write_text(yaml.safe_dump(config))
        check = promtool_check(promtool, "config", str(swapped))
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(path.read_text())
    rules = config["scrape_configs"][0]["relabel_configs"]
    address = next(r for r in rules if r.get("target_label") == "__address__")
    joined = "10.1.2.3:7070;9170"  # a pod's discovered address ; its prometheus.io/port
    match = prometheus_regex(address["regex"], joined)
    assert match is not None
    assert match.expand(address["replacement"].replace("$1", r"\1").replace("$2", r"\2")) == (
        "10.1.2.3:9170"
    )
    node = next(r for r in rules if r.get("target_label") == "node")
    assert node["source_labels"] == ["__meta_kubernetes_pod_name"]


def test_grafana_datasource_matches_compose() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(provisioned) == 1
    source = provisioned[0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090", "the compose service and its port"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "prometheus" in compose["services"]


def test_grafana_dashboard_structure() -> None:
    board = dashboard()
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int)
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
    for panel in panels(board):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], f"{title} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, title
            assert target["expr"].strip(), title
            assert metric_names(target["expr"]), f"{title}: {target['expr']} names no metric"


def test_grafana_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for number, expr in enumerate(expressions(dashboard())):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = promtool_check(promtool, "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(rules)} rules found" in check.stdout


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, grpc_method) "
        '(rate(grpc_server_handling_seconds_bucket{node=~"$node",grpc_code!="OK"}'
        "[$__rate_interval]))) / on (node) group_left ramster_x"
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "ramster_x"}
    text = '# TYPE a_total counter\n# TYPE h histogram\nh_bucket{le="1"} 1\nb 2\n'
    assert exported_names(text) == {"a_total", "h", "h_bucket", "h_sum", "h_count", "b"}


@pytest.mark.parametrize("name", sorted(dashboard_metric_names()))
def test_dashboard_metric_names_are_prometheus_style(name: str) -> None:
    assert re.fullmatch(r"(ramster|grpc_server)_[a-z0-9_]+", name), name
