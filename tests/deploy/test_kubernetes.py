# deploy/kubernetes/, checked without a cluster: every manifest parses, the kustomization lists
# exactly the manifests there are, and the objects agree with one another the way Kubernetes
# would only reveal at run time: the StatefulSet's serviceName is a headless Service that
# publishes not-ready pods (peers must find each other while starting), every selector matches
# the pod labels, probes run `ramster health` over TLS on the container's grpc port, the
# ConfigMap's peer list names every StatefulSet pod's peer port through the headless Service,
# each pod gets its own node certificate (cert-manager/ issues one per pod, for the names the
# peers dial), the data volume claim is mounted at the data directory, and the pods run as the
# image's non-root user.
from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
IMAGE_UID = 10001  # USER of deploy/Dockerfile


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Manifest file name -> its objects (the kustomization excluded)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    by_kind_name: dict[tuple[str, str], dict[str, Any]] = {}
    for docs in manifests().values():
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in by_kind_name, f"duplicate {key}"
            by_kind_name[key] = doc
    return by_kind_name


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests())


def test_statefulset_service_pdb_configmap_agree() -> None:
    objs = objects()
    (statefulset,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    spec = statefulset["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert matches(spec["selector"]["matchLabels"], labels)

    headless = objs["Service", spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert matches(headless["spec"]["selector"], labels)
    services = [o for (kind, _), o in objs.items() if kind == "Service"]
    assert all(matches(s["spec"]["selector"], labels) for s in services)

    (pdb,) = [o for (kind, _), o in objs.items() if kind == "PodDisruptionBudget"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert (
        pdb["spec"].get("maxUnavailable", 0) >= 1
        or pdb["spec"]["minAvailable"] < (spec["replicas"])
    ), "the budget must let a drain proceed"

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"grpc", "peer", "metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:4] == ["ramster", "health", "--target", f"127.0.0.1:{ports['grpc']}"]
        assert command[4:] == ["--tls-ca", "/etc/ramster/tls/ca.crt"], probe
        assert container[probe]["timeoutSeconds"] >= 2, "a Python probe needs more than 1 s"
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports

    config_names = [ref["configMapRef"]["name"] for ref in container["envFrom"]]
    (config,) = [objs["ConfigMap", name] for name in config_names]
    env = config["data"]
    assert all(isinstance(value, str) for value in env.values()), "ConfigMap values are strings"
    assert env["RAMSTER_LISTEN"].endswith(f":{ports['grpc']}")
    assert env["RAMSTER_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    name, service_name = statefulset["metadata"]["name"], headless["metadata"]["name"]
    assert env["RAMSTER_PEER_LISTEN"].endswith(f":{ports['peer']}")
    assert env["RAMSTER_PEERS"].split(",") == [
        f"{name}-{i}.{service_name}:{ports['peer']}" for i in range(spec["replicas"])
    ]
    client_service = objs["Service", "ramster"]
    assert "peer" not in {p["targetPort"] for p in client_service["spec"]["ports"]}

    # TLS: the init container copies the pod's own Secret into the volume the node reads
    mounts_by_path = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    tls_dir = env["RAMSTER_TLS_CA"].rsplit("/", 1)[0]
    assert {env[k] for k in ("RAMSTER_TLS_CERT", "RAMSTER_TLS_KEY", "RAMSTER_TLS_CA")} == {
        f"{tls_dir}/{f}" for f in ("tls.crt", "tls.key", "ca.crt")
    }
    (init,) = pod["spec"]["initContainers"]
    assert {m["name"] for m in init["volumeMounts"]} == {mounts_by_path[tls_dir], "node-secrets"}
    assert "node-secrets" not in mounts_by_path.values(), "a node sees only its own key"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    sources = volumes["node-secrets"]["projected"]["sources"]
    pods = [f"{name}-{i}" for i in range(spec["replicas"])]
    assert [s["secret"]["name"] for s in sources] == [f"ramster-tls-{p}" for p in pods]
    for source, pod_name in zip(sources, pods, strict=True):
        paths = {item["path"] for item in source["secret"]["items"]}
        assert paths == {f"{pod_name}/{f}" for f in ("tls.crt", "tls.key", "ca.crt")}
    issued = {
        doc["spec"]["secretName"]: doc["spec"]
        for doc in yaml.safe_load_all((K8S / "cert-manager" / "certificates.yaml").read_text())
        if doc["kind"] == "Certificate" and not doc["spec"].get("isCA")
    }
    assert set(issued) == {f"ramster-tls-{p}" for p in pods}
    for pod_name in pods:
        cert = issued[f"ramster-tls-{pod_name}"]
        assert cert["uris"] == [f"spiffe://ramster/node/{pod_name}"]
        assert f"{pod_name}.{service_name}" in cert["dnsNames"]
        assert pod_name in cert["dnsNames"], "owners check a holder's node id as a DNS name"
        assert {"server auth", "client auth"} <= set(cert["usages"])
    tokens_dir, tokens_file = env["RAMSTER_TOKENS"].rsplit("/", 1)
    tokens = volumes[mounts_by_path[tokens_dir]]["secret"]
    assert tokens["secretName"] == "ramster-tokens", "a reachable client port needs tokens"
    assert tokens["items"] == [{"key": tokens_file, "path": tokens_file}]
    assert 1 <= int(env["RAMSTER_REPLICAS"]) < spec["replicas"]
    own_id = {e["name"]: e for e in container["env"]}["RAMSTER_NODE_ID"]
    assert own_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    assert mounts[next(iter(claims))] == env["RAMSTER_DATA_DIR"]
    declared = {v["name"] for v in pod["spec"].get("volumes", [])}
    assert set(mounts) <= declared | claims

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_UID and security["fsGroup"] == IMAGE_UID
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_memory_limit_leaves_room_above_the_pool() -> None:
    objs = objects()
    (statefulset,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    limit = parse_quantity(container["resources"]["limits"]["memory"])
    pool = parse_quantity(objs["ConfigMap", "ramster"]["data"]["RAMSTER_POOL_LIMIT"])
    assert pool < limit * 0.75, "the pool must leave room for the process itself"


def parse_quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * scale
    return int(text)


def test_manifests_are_plain_yaml_files() -> None:
    for path in K8S.iterdir():
        if path.is_dir():  # examples applied on their own, e.g. cert-manager/
            assert all(p.suffix == ".yaml" for p in path.iterdir()), path.name
            continue
        assert path.suffix == ".yaml", f"{path.name}: manifests end in .yaml"
