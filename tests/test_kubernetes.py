"""deploy/kubernetes/, offline: built-in kinds against Kubernetes' own JSON schemas (kubernetes-validate,
strict: unknown fields fail), the CRDs (ServiceMonitor, RayService) structurally with their pod
templates validated as Pods; the pieces agree with each other (selectors, ports, HPA target), the
termination grace covers preStop + the server's drain, the container and RayService flags parse
with morserve's own parser, and every metric name the manifests reference is on a running
server's /metrics (the server built from the Deployment's own flags).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import kubernetes_validate
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from morserve.api.server import build_parser, create_app, engine_args, server_settings
from morserve.engine import AsyncLLMEngine
from morserve.serving.ray_app import builder_argv, parse_checked
from morserve.serving.ray_flags import deployment_options

DIR = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
        ("ray.io/v1", "RayService"),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
UVICORN_CLOSE_S = 2            # morserve.api.server: uvicorn.Config(timeout_graceful_shutdown=2)


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]


def by_kind(kind: str) -> dict:
    [doc] = [d for _, d in documents() if d["kind"] == kind]
    return doc


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {"name": "x"}) | {"name": "x"},
            "spec": template["spec"]}


@pytest.mark.parametrize("name,doc", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates(name, doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    doc = by_kind("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_rayservice():
    listed = set(by_kind("Kustomization")["resources"])
    assert listed == {p.name for p in DIR.glob("*.yaml")} - {"kustomization.yaml", "rayservice.yaml"}


def test_pieces_agree():
    deploy, service, pdb, hpa, monitor = (by_kind(k) for k in
                                          ("Deployment", "Service", "PodDisruptionBudget",
                                           "HorizontalPodAutoscaler", "ServiceMonitor"))
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in port_names


def test_termination_grace_covers_prestop_and_the_servers_drain():
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    ns = build_parser().parse_args(container["args"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + ns.shutdown_timeout + UVICORN_CLOSE_S
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pre_stop + ns.shutdown_timeout, \
        "liveness would restart a pod that is still draining"


def adapter_rules() -> list[dict]:
    return yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])["rules"]


def series_name(rule: dict) -> str:
    return re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"].strip("'\"")).group(0)


def adapter_name(rule: dict, series: str) -> str:
    """The custom-metric name prometheus-adapter gives `series` (its name.matches / name.as)."""
    pattern, template = rule["name"]["matches"], rule["name"]["as"]
    return re.sub(pattern, re.sub(r"\$\{(\d+)\}", r"\\\1", template), series)


def test_hpa_metric_comes_from_an_adapter_rule():
    hpa_names = {m["pods"]["metric"]["name"] for m in by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert hpa_names == {adapter_name(r, series_name(r)) for r in adapter_rules()} == {"vllm_num_requests_waiting"}


def referenced_metric_names() -> set[str]:
    names = {series_name(r) for r in adapter_rules()}
    for path in DIR.glob("*.yaml"):
        names |= set(re.findall(r"\bvllm:[a-z_]+", path.read_text()))
    return names


def test_every_referenced_metric_is_on_a_running_servers_metrics():
    names = referenced_metric_names()
    assert "vllm:num_requests_waiting" in names
    args = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    ns = build_parser().parse_args([*args, "--device", "cpu", "--max-num-seqs", "4"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        app = create_app(server_settings(ns), lambda: AsyncLLMEngine.from_args(engine_args(ns)))
        with TestClient(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "model did not load"
                time.sleep(0.05)
            assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
            text = client.get("/metrics").text
    finally:
        torch.set_num_threads(threads)
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names <= samples, f"missing on /metrics: {sorted(names - samples)}"


def serve_app() -> dict:
    [app] = yaml.safe_load(by_kind("RayService")["spec"]["serveConfigV2"])["applications"]
    return app


def test_rayservice_runs_this_packages_builder_with_valid_flags():
    app = serve_app()
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("morserve.serving.ray_app", "build_app")
    ns = parse_checked(builder_argv(app["args"]))
    assert ns.vllm_metric_names and ns.host == "0.0.0.0"
    options = deployment_options(ns, cluster_gpus=0.0)
    assert options["ray_actor_options"]["num_gpus"] == 1.0          # pinned by the manifest, not guessed
    scaling = options["autoscaling_config"]
    spec = by_kind("RayService")["spec"]["rayClusterConfig"]
    [workers] = spec["workerGroupSpecs"]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert scaling["max_replicas"] <= workers["maxReplicas"] * gpus, "max replicas cannot all get a GPU"
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]


def test_rayservice_pod_templates_are_valid_pods():
    spec = by_kind("RayService")["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        kubernetes_validate.validate(as_pod(template), K8S_VERSION, strict=True)
    serve_ports = {p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    http = yaml.safe_load(by_kind("RayService")["spec"]["serveConfigV2"])["http_options"]
    assert http["port"] in serve_ports
    metrics_ports = {p["name"]: p["containerPort"] for t in templates[1:] for c in t["spec"]["containers"]
                     for p in c["ports"]}
    assert serve_app()["args"]["replica_metrics_port"] in metrics_ports.values()
    # the PodMonitor scrapes that port on the worker pods (one GPU, so one replica, each)
    monitor = by_kind("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= templates[1]["metadata"]["labels"].items()
    assert all(metrics_ports[e["port"]] == serve_app()["args"]["replica_metrics_port"]
               for e in monitor["podMetricsEndpoints"])
    assert all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
               for g in spec["workerGroupSpecs"]) and serve_app()["args"]["num_gpus_per_replica"] == 1
