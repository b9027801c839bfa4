# deploy/kubernetes/, checked without a cluster: every manifest parses, the kustomization lists
# exactly the manifests there are, and the objects agree with one another the way Kubernetes
# would only reveal at run time: the StatefulSet's serviceName is a headless Service that
# publishes not-ready pods (peers must find each other while starting), every selector matches
# the pod labels, probes run `ramster health` over TLS on the container's grpc port, every node is
# seeded with the headless Service alone (so scaling needs no other edit) and advertises its
# pod's name under it, the csi-driver volume asks for a certificate that names the pod as a node
# and carries every name the peers, the probes and clients dial (checked for a pod that scaling
# would add), signed by the CA Issuer of cert-manager/, the client Service is sticky, the data
# volume claim is mounted at the data directory, and the pods run as the image's non-root user.
from __future__ import annotations

from dataclasses import fields
from string import Template
from typing import Any

import yaml

from node.settings import Settings, advertised, env_name, peer_address, resolve
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
    assert env["RAMSTER_PEERS"] == f"{service_name}:{ports['peer']}", "seeded by the Service"
    client_service = objs["Service", "ramster"]
    assert "peer" not in {p["targetPort"] for p in client_service["spec"]["ports"]}
    assert client_service["spec"]["sessionAffinity"] == "ClientIP", "a client stays with its node"
    affinity = client_service["spec"]["sessionAffinityConfig"]["clientIP"]
    assert affinity["timeoutSeconds"] >= 3600

    # each pod tells the others its stable name; checked for a pod that scaling up would add
    new_pod = f"{name}-{spec['replicas']}"
    env_order = [e["name"] for e in container["env"]]
    own = {e["name"]: e for e in container["env"]}
    for var in ("POD_NAME", "RAMSTER_NODE_ID"):
        assert own[var]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    advertise = own["RAMSTER_PEER_ADVERTISE"]["value"]
    assert env_order.index("POD_NAME") < env_order.index("RAMSTER_PEER_ADVERTISE"), "$(POD_NAME)"
    assert advertise == f"$(POD_NAME).{service_name}:{ports['peer']}"
    advertised_host = advertise.replace("$(POD_NAME)", new_pod).rsplit(":", 1)[0]

    # TLS: the cert-manager csi-driver issues each pod its own certificate into the node's volume
    mounts_by_path = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    tls_dir = env["RAMSTER_TLS_CA"].rsplit("/", 1)[0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "initContainers" not in pod["spec"] and "node-secrets" not in volumes
    csi = volumes[mounts_by_path[tls_dir]]["csi"]
    assert csi["driver"] == "csi.cert-manager.io"
    assert csi["readOnly"] is True, "the driver refuses a writable volume"
    attrs = {
        key.removeprefix("csi.cert-manager.io/"): value
        for key, value in csi["volumeAttributes"].items()
    }
    files = {"RAMSTER_TLS_CERT": "certificate-file", "RAMSTER_TLS_KEY": "privatekey-file"}
    files["RAMSTER_TLS_CA"] = "ca-file"
    for var, attr in files.items():
        assert env[var] == f"{tls_dir}/{attrs[attr]}"
    pod_vars = {"POD_NAME": new_pod, "POD_NAMESPACE": "ns", "POD_UID": "u"}
    pod_vars["SERVICE_ACCOUNT_NAME"] = "default"  # the variables the driver expands
    issued = {key: Template(attrs[key]).substitute(pod_vars) for key in ("uri-sans", "dns-names")}
    assert issued["uri-sans"] == f"spiffe://ramster/node/{new_pod}", "names the node id"
    dns_names = {host.strip() for host in issued["dns-names"].split(",")}
    seed_host = env["RAMSTER_PEERS"].rsplit(":", 1)[0]
    dialled = {new_pod, advertised_host, seed_host, client_service["metadata"]["name"]}
    assert dialled <= dns_names, "owners check the node id; members, seed and clients their names"
    assert "127.0.0.1" in attrs["ip-sans"].split(","), "the probes dial 127.0.0.1"
    assert {"server auth", "client auth"} <= set(attrs["key-usages"].split(","))
    assert attrs["fs-group"] == str(pod["spec"]["securityContext"]["runAsGroup"])
    cert_manager = list(
        yaml.safe_load_all((K8S / "cert-manager" / "certificates.yaml").read_text())
    )
    (ca,) = [d for d in cert_manager if d["kind"] == "Certificate" and d["spec"].get("isCA")]
    assert [d["kind"] for d in cert_manager].count("Certificate") == 1, "no per-pod Certificate"
    (issuer,) = [
        d
        for d in cert_manager
        if (d["kind"], d["metadata"]["name"]) == (attrs["issuer-kind"], attrs["issuer-name"])
    ]
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    tokens_dir, tokens_file = env["RAMSTER_TOKENS"].rsplit("/", 1)
    tokens = volumes[mounts_by_path[tokens_dir]]["secret"]
    assert tokens["secretName"] == "ramster-tokens", "a reachable client port needs tokens"
    assert tokens["items"] == [{"key": tokens_file, "path": tokens_file}]
    assert 1 <= int(env["RAMSTER_REPLICAS"]) < spec["replicas"]

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


def test_memory_limit_leaves_room_above_the_pool_and_peers_pages() -> None:
    objs = objects()
    (statefulset,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    limit = parse_quantity(container["resources"]["limits"]["memory"])
    env = objs["ConfigMap", "ramster"]["data"]
    # the room for peers' pages defaults to a quarter of the host's RAM: it must be set
    frames = sum(parse_quantity(env[k]) for k in ("RAMSTER_POOL_LIMIT", "RAMSTER_FOREIGN_LIMIT"))
    assert frames < limit * 0.75, "the pool and peers' pages must leave room for the process"


def test_the_node_reads_the_manifests() -> None:
    """The environment of a pod that scaling up would add, read by the node's own settings
    code: every RAMSTER_* name is a setting (a misspelt one would be ignored), every value
    parses, and the node is seeded by the Service and tells the others its pod's name."""
    objs = objects()
    (statefulset,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    pod_name = f"{statefulset['metadata']['name']}-{statefulset['spec']['replicas']}"
    headless = statefulset["spec"]["serviceName"]
    environ = dict(objs["ConfigMap", "ramster"]["data"])
    for var in container["env"]:
        if "valueFrom" in var:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            environ[var["name"]] = pod_name
        else:
            environ[var["name"]] = var["value"].replace("$(POD_NAME)", environ["POD_NAME"])
    known = {env_name(f.name) for f in fields(Settings)}
    assert {name for name in environ if name.startswith("RAMSTER_")} <= known
    settings = resolve({}, environ)
    assert settings.node_id == pod_name
    assert [str(seed) for seed in settings.peers] == [f"{headless}:8070"]
    assert advertised(settings, peer_address(settings).port) == f"{pod_name}.{headless}:8070"


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
