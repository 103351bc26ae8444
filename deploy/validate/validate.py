#!/usr/bin/env python3
"""Validates the deployment files under deploy/ without a Docker engine or a cluster.

    .venv/bin/python deploy/validate/validate.py [DEPLOY_DIR]

- Kubernetes built-in kinds: against the Kubernetes API's OpenAPI schemas, strictly (an
  unknown field is an error), with kubernetes-validate.
- KEDA ScaledObject and Prometheus Operator ServiceMonitor: against the schemas generated
  from those projects' CRDs (node crds.mjs; types, required fields, enums — these schemas do
  not reject unknown fields).
- docker-compose.yml: against the Compose specification's JSON Schema (node crds.mjs).
- Consistency between the files and verdict's own config: the ScaledObject scales on the
  consumer groups and topics the workloads really use, never past the input partition
  count; ports and probe paths match what verdict serves; the images run as non-root.
- The Grafana dashboard's structure (ids, positions, a query per target).

The test suite runs this (tests/tests/deploy_artifacts.rs), and checks separately that every
metric the dashboard and the alert rules name is one verdict exports.
"""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSION = "1.33.0"
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
PROMETHEUS_RULE_HEADER = """\
# Generated from deploy/prometheus/alerts.yml (the one source of the alert rules) by
#   .venv/bin/python deploy/validate/validate.py --write-prometheusrule
# for the Prometheus Operator. The test suite fails when the two differ.
"""


def prometheus_rule(deploy: Path) -> dict:
    """The alert rules wrapped as a Prometheus Operator PrometheusRule."""
    rules = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "verdict", "labels": {"app.kubernetes.io/name": "verdict"}},
        "spec": {"groups": rules["groups"]},
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the PromQL) as `|` blocks, as in alerts.yml."""


_BlockDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def write_prometheus_rule(deploy: Path) -> None:
    text = yaml.dump(prometheus_rule(deploy), Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=120)
    (deploy / "k8s" / "prometheusrule.yaml").write_text(PROMETHEUS_RULE_HEADER + text)

errors: list[str] = []


def check(ok: bool, message: str) -> None:
    if ok:
        print(f"ok {message}")
    else:
        errors.append(message)
        print(f"error {message}", file=sys.stderr)


def load_manifests(k8s: Path) -> dict[str, dict]:
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    manifests = {}
    for name in kustomization["resources"]:
        path = k8s / name
        check(path.is_file(), f"kustomization resource {name} exists")
        if path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                manifests[doc["kind"]] = doc | {"__file__": str(path)}
    return manifests


def validate_schemas(manifests: dict[str, dict]) -> None:
    crd_files = []
    for kind, doc in manifests.items():
        if kind in CRD_KINDS:
            crd_files.append(doc["__file__"])
            continue
        body = {k: v for k, v in doc.items() if k != "__file__"}
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
            check(True, f"{doc['__file__']}: {kind} against Kubernetes {K8S_VERSION} (strict)")
        except Exception as e:  # ValidationError, SchemaNotFoundError
            check(False, f"{doc['__file__']}: {kind}: {e}")
    node = subprocess.run(["node", str(HERE / "crds.mjs"), *crd_files], capture_output=True, text=True)
    print(node.stdout, end="")
    check(node.returncode == 0, f"custom resources against their CRD schemas {node.stderr.strip()}")


def validate_consistency(deploy: Path, manifests: dict[str, dict]) -> None:
    config = tomllib.loads((deploy / "config" / "verdict.toml").read_text())
    group_id = config["kafka"]["group-id"]
    inputs = {f"{group_id}.{w['name']}": w["input-topic"] for w in config["workloads"]}

    # Partition counts come from the compose file's topic creation (`topic:partitions`).
    compose = yaml.safe_load((deploy / "compose" / "docker-compose.yml").read_text())
    script = " ".join(compose["services"]["kafka-init"]["command"])
    partitions = {t: int(n) for t, n in re.findall(r"([\w.-]+):(\d+)", script)}
    for topic in inputs.values():
        check(topic in partitions, f"compose creates input topic {topic}")

    scaled = manifests["ScaledObject"]["spec"]
    triggers = {t["metadata"]["consumerGroup"]: t["metadata"]["topic"] for t in scaled["triggers"]}
    check(triggers == inputs, f"ScaledObject triggers {triggers} are the workloads' groups and input topics {inputs}")
    fewest = min(partitions.get(t, 0) for t in inputs.values())
    check(
        scaled["maxReplicaCount"] <= fewest,
        f"ScaledObject maxReplicaCount {scaled['maxReplicaCount']} <= input partitions {fewest}",
    )
    check(scaled["scaleTargetRef"]["name"] == manifests["Deployment"]["metadata"]["name"], "ScaledObject targets the Deployment")
    rule = {k: v for k, v in manifests["PrometheusRule"].items() if k != "__file__"}
    check(rule == prometheus_rule(deploy), "k8s/prometheusrule.yaml holds exactly prometheus/alerts.yml's rules")

    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    listen = manifests["ConfigMap"]["data"]["VERDICT_HTTP_LISTEN"]
    port = next(p for p in container["ports"] if p["name"] == "http-metrics")
    check(listen.endswith(f":{port['containerPort']}"), f"container port {port['containerPort']} is VERDICT_HTTP_LISTEN {listen}")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe on /healthz")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
    check("requests" in container["resources"], "resource requests set")
    check(pod["securityContext"].get("runAsNonRoot") is True, "pod runs as non-root")
    secret = manifests["Secret"]["metadata"]["name"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e]
    check(secret in refs, "the Redis URL comes from the Secret")
    service_port = manifests["Service"]["spec"]["ports"][0]["name"]
    endpoint_port = manifests["ServiceMonitor"]["spec"]["endpoints"][0]["port"]
    check(service_port == endpoint_port == "http-metrics", "ServiceMonitor scrapes the Service's metrics port")
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = manifests[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        check(all(labels.get(k) == v for k, v in selector.items()), f"{kind} selects the Deployment's pods")

    for dockerfile in sorted((deploy / "docker").glob("Dockerfile*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        text = dockerfile.read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        check(bool(users) and not users[-1].startswith(("0", "root")), f"{dockerfile.name} runs as a non-root user")
        check(text.count("FROM ") >= 2, f"{dockerfile.name} is multi-stage")
        check("ORT_DYLIB_PATH" in text, f"{dockerfile.name} ships and points at libonnxruntime")


def validate_compose(deploy: Path) -> None:
    compose = deploy / "compose" / "docker-compose.yml"
    node = subprocess.run(["node", str(HERE / "crds.mjs"), "--compose", str(compose)], capture_output=True, text=True)
    print(node.stdout, end="")
    check(node.returncode == 0, f"{compose} against the Compose spec {node.stderr.strip()}")
    services = yaml.safe_load(compose.read_text())["services"]
    for needed in ("kafka", "redis", "verdict", "prometheus", "grafana"):
        check(needed in services, f"compose runs {needed}")
    kraft = services["kafka"]["environment"].get("KAFKA_PROCESS_ROLES", "")
    check("controller" in kraft, "compose Kafka runs in KRaft mode")


def validate_dashboard(deploy: Path) -> None:
    path = deploy / "grafana" / "dashboards" / "verdict.json"
    dashboard = json.loads(path.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    check(len(ids) == len(set(ids)), f"{path.name}: panel ids unique")
    for p in panels:
        if p["type"] == "row":
            continue
        check({"h", "w", "x", "y"} <= p["gridPos"].keys(), f"{path.name}: panel '{p['title']}' has a position")
        check(bool(p["targets"]) and all(t.get("expr") for t in p["targets"]), f"{path.name}: panel '{p['title']}' queries something")


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--write-prometheusrule"]:
        write_prometheus_rule(HERE.parent)
        return 0
    deploy = Path(args[0]).resolve() if args else HERE.parent
    manifests = load_manifests(deploy / "k8s")
    validate_schemas(manifests)
    validate_consistency(deploy, manifests)
    validate_compose(deploy)
    validate_dashboard(deploy)
    print(f"{len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
