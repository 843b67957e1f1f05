"""deploy/grafana/filial.json and the `observability` compose profile.

Every PromQL query of the dashboard (panels and template variables) names only metrics that the daemon
(daemon/service/metrics.py) or `filial serve` (daemon/serve/metrics.py) exports, collected from their
registries at run time, and groups only by labels those metrics carry, plus Prometheus' bounded target
labels: never by an unbounded one (a version, a batch id). No exported metric carries such a label either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.deploy.test_compose import compose_bin, config  # noqa: F401 (fixtures: docker-compose config)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "filial.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

UNBOUNDED = {"version", "batch_id", "batch", "publish_id", "offset", "child", "child_id", "member", "fingerprint"}
TARGET_LABELS = {"instance", "job", "pod", "namespace"}  # one value per scraped process at most
FUNCTIONS = {"rate", "irate", "increase", "delta", "deriv", "sum", "avg", "min", "max", "count", "topk", "bottomk",
             "quantile", "stddev", "histogram_quantile", "abs", "clamp_min", "clamp_max", "label_values",
             "avg_over_time", "max_over_time", "min_over_time", "last_over_time", "changes", "resets", "time",
             "vector", "scalar"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


# --- what the processes export -------------------------------------------------------------------------------
def _families(registry) -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) of every metric in the registry, samples or not yet."""
    from prometheus_client.metrics import MetricWrapperBase

    labels = {}
    for collector in list(registry._collector_to_names):  # the registry's collectors (no public accessor)
        if isinstance(collector, MetricWrapperBase):
            labels[collector._name] = set(collector._labelnames)
    out = {}
    for family in registry.collect():
        sample_labels = {k for s in family.samples for k in s.labels} - {"le", "quantile"}
        out[family.name] = (family.type, labels.get(family.name, set()) | sample_labels)
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name either process can expose -> its label names."""
    from daemon.service.metrics import ServiceMetrics

    families = _families(ServiceMetrics().registry)
    try:
        from daemon.serve.metrics import ServeMetrics
    except ImportError:
        pytest.fail("daemon/serve/metrics.py (filial serve, branch serve-http) is needed: the dashboard's serve "
                    "panels read its metrics")
    stats = SimpleNamespace(ready=True, version=1, zoo_size=1, swaps=0, refusals=0, skipped=0)
    serve = _families(ServeMetrics(SimpleNamespace(stats=lambda: stats)).registry)
    assert not families.keys() & serve.keys()
    series = {}
    for name, (kind, labels) in {**families, **serve}.items():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "summary": ["", "_sum", "_count", "_created"]}.get(kind, [""])
        for suffix in suffixes:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def test_no_metric_carries_an_unbounded_label(exported):
    assert {name: labels & UNBOUNDED for name, labels in exported.items() if labels & UNBOUNDED} == {}


# --- the dashboard's queries -------------------------------------------------------------------------------------
def _queries(dashboard: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for panel in panels:
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
            walk(panel.get("panels", []))
    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append((f"${var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def _parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names grouped by or matched on) of a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    grouped = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouped |= {label.strip() for label in clause.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for matchers in re.findall(r"\{([^}]*)\}", text):
        grouped |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)                # matchers, ranges ($__rate_interval)
    label_values = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_]\w*)\s*\)\s*$", text)
    if label_values:
        return {label_values[1]}, {label_values[2]}
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = m[1], m[2]
        if call:
            assert word in FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in KEYWORDS:
            names.add(word)
    return names, grouped


def test_the_dashboard_loads():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "filial" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert len(_queries(dashboard)) > 20


def test_every_query_names_exported_metrics_and_bounded_labels(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in _queries(dashboard):
        names, grouped = _parse(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported.keys()
        assert not unknown, f"{title}: {sorted(unknown)} is exported by neither the daemon nor filial serve"
        allowed = set().union(*(exported[n] for n in names)) | TARGET_LABELS
        assert grouped <= allowed, f"{title}: groups by {sorted(grouped - allowed)}, not a label of {sorted(names)}"
        assert not grouped & UNBOUNDED, f"{title}: groups by an unbounded label in {expr!r}"


@pytest.mark.parametrize("expr,error", [
    ("sum by (version) (filial_served_accuracy)", "groups by"),
    ("rate(filial_batchs_total[5m])", "exported by neither"),
    ("max by (batch_id) (filial_kl)", "groups by"),
], ids=["version-label", "misspelt-metric", "batch-id"])
def test_the_check_catches_bad_queries(exported, expr, error, tmp_path, monkeypatch):
    bad = json.loads(DASHBOARD.read_text())
    bad["panels"].append({"id": 999, "type": "timeseries", "title": "bad", "targets": [{"refId": "A", "expr": expr}]})
    bad_file = tmp_path / "filial.json"
    bad_file.write_text(json.dumps(bad))
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "DASHBOARD", bad_file)
    with pytest.raises(AssertionError, match=error):
        test_every_query_names_exported_metrics_and_bounded_labels(exported)


def test_the_panels_operators_asked_for():
    text = DASHBOARD.read_text()
    for metric in ("filial_served_accuracy", "filial_kl", "filial_drift_decisions_total", "filial_consumer_lag",
                   "filial_merges_total", "filial_publish_seconds_bucket", "filial_serve_request_seconds_bucket",
                   "filial_serve_version"):
        assert metric in text, metric


# --- docker-compose: the observability profile -----------------------------------------------------------------
def test_observability_profile_provisions_prometheus_and_grafana(config):  # noqa: F811
    services = config["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observability"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for s in (prometheus, grafana) for v in s["volumes"]
              if v.startswith("/")}
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "filial.yml").read_text())["providers"][0]
    assert mounts[dashboards["options"]["path"] + "/filial.json"] == DASHBOARD
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(p["target"] == 9090 for p in prometheus["ports"])


def test_prometheus_scrapes_every_filial_service(config):  # noqa: F811
    services = config["services"]
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = {(name, sd["port"]) for job in scrape for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] in (["run"], ["serve"]):
            env = service["environment"]
            port = int(env.get("FILIAL_HEALTH_PORT", env.get("FILIAL_SERVE__PORT", 8080)))
            assert (name, port) in targets, f"{name} is not scraped on {port}"
    assert {name for name, _ in targets} <= set(services)
