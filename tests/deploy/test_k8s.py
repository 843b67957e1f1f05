"""deploy/k8s: every overlay renders with `kubectl kustomize` and every object validates offline.

Core kinds are validated by kubernetes-validate (the Kubernetes OpenAPI schemas it ships, strict: unknown
fields are errors); KEDA's ScaledObject and TriggerAuthentication by tests/deploy/schemas/keda-v2.20.json
(a subset of KEDA's published CRD schemas, written by hand; its $comment says from what). Then what the
manifests mean: the learners and the servers load their settings from what the pods get, the GPU overlay
asks for a GPU and tolerates it, KEDA scales the learners up to the partition count the README documents.
No cluster, no network: kubectl only renders. Without kubectl these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMAS = Path(__file__).parent / "schemas" / "keda-v2.20.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "filial.json"
K8S_VERSION = "1.32"  # the API the manifests target (kubectl's own minor here)
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("redis-auth", "kafka-sasl")
CORE_KINDS = {"ConfigMap", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered here (`kubectl kustomize`)")
    return found


def _render(kubectl: str, directory: Path) -> list[dict]:
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay, and the GPU overlay with every component (kustomize wants relative paths)."""
    out = {name: _render(kubectl, K8S / "overlays" / name) for name in OVERLAYS}
    combo = tmp_path_factory.mktemp("combo")
    rel = lambda p: os.path.relpath(p, combo)  # noqa: E731
    (combo / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [rel(K8S / "overlays" / "gpu")],
        "components": [rel(K8S / "components" / c) for c in COMPONENTS]}))
    out["gpu+components"] = _render(kubectl, combo)
    return out


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _keda_validator(kind: str):
    doc = json.loads(KEDA_SCHEMAS.read_text())
    return jsonschema.Draft202012Validator({**doc, "$ref": f"#/{kind}"})


def _validate(doc: dict) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        _keda_validator(doc["kind"]).validate(doc)
        behavior = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:  # KEDA hands it to the HPA it creates: validate it as the HPA's
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                   "spec": {"scaleTargetRef": {"kind": "StatefulSet", "name": "x"}, "maxReplicas": 1,
                            "behavior": behavior}}
            kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- valid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [*OVERLAYS, "gpu+components"])
def test_every_object_validates(rendered, variant):
    docs = rendered[variant]
    kinds = {d["kind"] for d in docs}
    assert kinds <= CORE_KINDS | KEDA_KINDS, f"only core kinds and KEDA's: {kinds - CORE_KINDS - KEDA_KINDS}"
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ScaledObject"} <= kinds
    for doc in docs:
        try:
            _validate(doc)
        except Exception as exc:  # noqa: BLE001 (either library's error, with the object named)
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']} is invalid: {exc}")


@pytest.mark.parametrize("mutate", [
    lambda so: so["spec"].update(maxReplicaCount=0),
    lambda so: so["spec"].update(maxReplicas=12),                         # the HPA's name, not KEDA's
    lambda so: so["spec"]["triggers"][0]["metadata"].update(lagThreshold=50),   # metadata are strings
    lambda so: so["spec"]["triggers"][0]["metadata"].update(lagTreshold="50"),  # misspelt key
    lambda so: so["spec"]["triggers"][0]["metadata"].pop("consumerGroupFromEnv"),
    lambda so: so["spec"]["scaleTargetRef"].pop("name"),
], ids=["max-0", "unknown-field", "int-metadata", "misspelt-kafka-key", "no-group", "no-target"])
def test_the_keda_schema_rejects_a_broken_scaledobject(rendered, mutate):
    """The vendored schema really validates: the rendered ScaledObject with one mistake fails."""
    so = json.loads(json.dumps(_one(rendered["cpu"], "ScaledObject")))
    _validate(so)
    mutate(so)
    with pytest.raises(jsonschema.ValidationError):
        _validate(so)


def test_kubernetes_validate_rejects_a_broken_statefulset(rendered):
    sts = json.loads(json.dumps(_one(rendered["cpu"], "StatefulSet")))
    sts["spec"]["template"]["spec"]["containers"][0]["resurces"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(sts)


# --- what the manifests say ------------------------------------------------------------------------------
def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _env(docs: list[dict], workload: dict, tmp_path: Path) -> dict[str, str]:
    """The container's environment as the kubelet builds it: its ConfigMaps, then its literal env (secret
    refs as a placeholder); *_FILE paths under its secret mounts moved to files under tmp_path."""
    (container,) = _pod(workload)["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "from-a-secret")
    volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
    secret_dirs = [m["mountPath"] for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    for name, value in list(env.items()):
        if name.endswith("_FILE"):
            assert any(value.startswith(d + "/") for d in secret_dirs), f"{name}={value} is on no secret mount"
            fake = tmp_path / value.lstrip("/")
            fake.parent.mkdir(parents=True, exist_ok=True)
            fake.write_text("not-a-real-secret\n")
            env[name] = str(fake)
    return env


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env file
    for key in list(os.environ):
        if key.startswith("FILIAL_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("variant", [*OVERLAYS, "gpu+components"])
def test_learners_run_filial_run_with_valid_settings(rendered, variant, clean_env, tmp_path):
    from daemon.cli import build_parser, cmd_run
    from daemon.service.settings import load_settings, unknown_variables

    docs = rendered[variant]
    sts = _one(docs, "StatefulSet", "filial-learner")
    (container,) = _pod(sts)["containers"]
    assert build_parser().parse_args(container["args"]).func is cmd_run
    env = _env(docs, sts, tmp_path)
    assert unknown_variables(env) == [], "every FILIAL_* variable is a setting"
    for key, value in env.items():
        clean_env.setenv(key, value)
    settings = load_settings()
    assert settings.model.device == ("cuda" if variant.startswith("gpu") else "cpu")
    assert settings.publish.signing_key_file is not None, "manifests are signed"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert settings.ops.health_port == port == int(_pod_annotations(sts)["prometheus.io/port"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert _pod(sts)["enableServiceLinks"] is False, "service links would add FILIAL_* variables"
    assert "replicas" not in sts["spec"], "KEDA owns the learners' replicas"
    if variant == "gpu+components":
        assert settings.redis.password_file is not None and settings.kafka.sasl_password_file is not None
        assert settings.kafka.security_protocol == "SASL_SSL"


def _pod_annotations(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("variant", [*OVERLAYS, "gpu+components"])
def test_serve_runs_filial_serve_on_the_learners_line(rendered, variant, clean_env, tmp_path):
    serve_settings = pytest.importorskip("daemon.serve.settings", reason="filial serve (branch serve-http) not merged")
    from daemon.cli import build_parser
    from daemon.service.settings import load_settings

    docs = rendered[variant]
    deployment = _one(docs, "Deployment", "filial-serve")
    (container,) = _pod(deployment)["containers"]
    assert build_parser().parse_args(container["args"]).func.__name__ == "cmd_serve"
    env = _env(docs, deployment, tmp_path)
    assert serve_settings.unknown_variables(env) == []
    assert all(k.startswith(serve_settings.ENV_PREFIX) or not k.startswith("FILIAL_") for k in env)
    for key, value in env.items():
        clean_env.setenv(key, value)
    serve = serve_settings.load_settings()
    for key in list(env):
        clean_env.delenv(key)
    learner_env = _env(docs, _one(docs, "StatefulSet", "filial-learner"), tmp_path)
    for key, value in learner_env.items():
        clean_env.setenv(key, value)
    learner = load_settings()
    assert (serve.redis_url, serve.line, serve.prefix) == (learner.redis.url, learner.publish.line, learner.redis.prefix)
    assert serve.signing_key_file == learner.publish.signing_key_file, "the servers verify what the learners sign"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert serve.port == port == int(_pod_annotations(deployment)["prometheus.io/port"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = _one(docs, "Service", "filial-serve")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("variant", [*OVERLAYS, "gpu+components"])
def test_selectors_pick_their_pods(rendered, variant):
    docs = rendered[variant]
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("StatefulSet", "Deployment")}
    for doc in docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            labels = workloads[doc["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{doc['kind']}/{doc['metadata']['name']} selects nothing"
    assert _one(docs, "StatefulSet")["spec"]["serviceName"] == "filial-learner"
    assert _one(docs, "Service", "filial-learner")["spec"]["clusterIP"] == "None"


def test_gpu_overlay_requests_a_gpu_and_tolerates_it(rendered):
    for variant, docs in rendered.items():
        sts = _one(docs, "StatefulSet", "filial-learner")
        (container,) = _pod(sts)["containers"]
        gpu = variant.startswith("gpu")
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (1 if gpu else None), variant
        tolerations = _pod(sts).get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations) == gpu
        assert "nvidia.com/gpu" not in json.dumps(_one(docs, "Deployment")), "filial serve stays on CPU"


def _documented_partitions() -> int:
    found = set(re.findall(r"\*\*(\d+) partitions\*\*", (K8S / "README.md").read_text()))
    assert len(found) == 1, f"deploy/k8s/README.md documents one partition count in bold, found {found}"
    return int(found.pop())


@pytest.mark.parametrize("variant", [*OVERLAYS, "gpu+components"])
def test_keda_scales_the_learners_on_lag_up_to_the_partition_count(rendered, variant):
    docs = rendered[variant]
    so = _one(docs, "ScaledObject")
    sts = _one(docs, "StatefulSet", "filial-learner")
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "filial-learner",
                                      "envSourceContainerName": _pod(sts)["containers"][0]["name"]}
    partitions = _documented_partitions()
    assert spec["maxReplicaCount"] == partitions == int(so["metadata"]["annotations"]["filial.dev/topic-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    env = {}
    for source in _pod(sts)["containers"][0]["envFrom"]:
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    # the trigger watches the learners' own bootstrap, group and topic
    for key, setting in (("bootstrapServers", "FILIAL_KAFKA_BOOTSTRAP"), ("consumerGroup", "FILIAL_GROUP_ID"),
                         ("topic", "FILIAL_TOPIC")):
        assert meta.get(f"{key}FromEnv") == setting and setting in env, key
    assert meta["offsetResetPolicy"] == "earliest"  # as consumers/batch_consumer.py
    if "authenticationRef" in trigger:
        auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}


@pytest.mark.parametrize("variant", OVERLAYS)
def test_the_overlays_ship_the_grafana_dashboard(rendered, variant):
    cm = _one(rendered[variant], "ConfigMap", "filial-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["filial.json"]) == json.loads(DASHBOARD.read_text())
