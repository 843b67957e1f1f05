"""docker-compose.yml and deploy/Dockerfile: valid, and they say what we mean.

No Docker engine runs here, so the compose file is validated by ``docker-compose config`` from the
PyPI package docker-compose 1.29.2 (it parses, checks the schema, resolves anchors/merges and prints
the normalised file, which these tests then read). That package cannot join the project's environment: it pins
PyYAML 5.4.1, which on Python 3.11 builds from source only with Cython<3, plus old jsonschema and
python-dotenv. So it gets its own tools venv, ``.venv/compose-tools/`` (``make compose-config`` builds
the same one); when it is missing, the ``compose`` fixture builds it (about a minute), so ``make test`` on
a fresh clone needs no extra step. ``DOCKER_COMPOSE_BIN`` points the tests at another 1.29 binary.

Over 300 lines because each compose service (daemon, producer, watcher, serve, the observability profile)
gets its own checks that its command and variables are what the CLI and the settings accept.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "deploy" / "compose-constraints.txt"
TOOLS_VENV = ROOT / ".venv" / "compose-tools"
STAMP = TOOLS_VENV / ".installed"
COMPOSE_REQUIREMENT = "docker-compose==1.29.2"

EXPECTED_SERVICES = {"kafka", "topics", "redis", "daemon", "daemon-gpu", "producer", "watcher", "serve"}


# --- the tools venv -----------------------------------------------------------------------------------
def _base_python() -> str:
    return shutil.which("python3.11") or sys.executable


def _build_tools_venv() -> None:
    """What `make .venv/compose-tools/.installed` does; a partial venv from an interrupted build is replaced."""
    shutil.rmtree(TOOLS_VENV, ignore_errors=True)
    env = {**os.environ, "PIP_CONSTRAINT": str(CONSTRAINTS)}
    steps = [[_base_python(), "-m", "venv", str(TOOLS_VENV)],
             [str(TOOLS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "setuptools",
              COMPOSE_REQUIREMENT]]
    for cmd in steps:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"building the docker-compose tools venv failed: {' '.join(cmd)}\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    STAMP.touch()


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    override = os.environ.get("DOCKER_COMPOSE_BIN")
    if override:
        return Path(override)
    # One builder at a time (parallel test runs, a concurrent `make compose-config`).
    lock_path = Path(tempfile.gettempdir()) / f"filial-compose-venv-{hashlib.sha1(bytes(ROOT)).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not STAMP.exists() or STAMP.stat().st_mtime < CONSTRAINTS.stat().st_mtime:
            started = time.monotonic()
            _build_tools_venv()
            print(f"built {TOOLS_VENV.name} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return TOOLS_VENV / "bin" / "docker-compose"


def _compose(compose_bin: Path, *args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    # A clean environment: no COMPOSE_* variables and no .env file can change what is validated.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env:
        return subprocess.run([str(compose_bin), "-f", str(file), "--env-file", empty_env.name, *args],
                              env=env, capture_output=True, text=True, timeout=120, cwd=file.parent)


@pytest.fixture(scope="session")
def config(compose_bin) -> dict:
    """The file as docker-compose 1.29.2 normalises it (`config`), parsed with the tools venv's PyYAML."""
    done = _compose(compose_bin, "--profile", "gpu", "config")
    assert done.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE.name}:\n{done.stderr}"
    assert "WARNING" not in done.stderr, done.stderr
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    parsed = subprocess.run([str(compose_bin.parent / "python"), "-c", to_json], input=done.stdout,
                            capture_output=True, text=True, check=True)
    return json.loads(parsed.stdout)


# --- compose: valid --------------------------------------------------------------------------------------
def test_compose_config_accepts_the_file(compose_bin):
    for args in (["config", "--quiet"], ["--profile", "gpu", "config", "--quiet"]):
        done = _compose(compose_bin, *args)
        assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr}"


@pytest.mark.parametrize("mutation", [
    ("condition: service_healthy", "condition: service_happy"),             # unknown depends_on condition
    ("    image: redis:7-alpine\n", "    image: redis:7-alpine\n    imagee: redis\n"),  # unknown key
    ("capabilities: [gpu]", "capabilities: gpu"),                           # wrong type
    ("  command: [\"run\"]\n", "  command: [\"run\"\n"),                      # not YAML
], ids=["condition", "unknown-key", "wrong-type", "yaml"])
def test_compose_config_rejects_a_broken_file(compose_bin, tmp_path, mutation):
    """The validator really validates: the same file with one mistake fails `config`."""
    text = COMPOSE_FILE.read_text()
    old, new = mutation
    assert old in text, f"mutation anchor {old!r} no longer in {COMPOSE_FILE.name}"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    (tmp_path / "deploy").mkdir()
    shutil.copy(DOCKERFILE, tmp_path / "deploy" / "Dockerfile")
    done = _compose(compose_bin, "--profile", "gpu", "config", "--quiet", file=broken)
    assert done.returncode != 0, f"docker-compose config accepted a broken file ({new!r})"


# --- compose: what it says ---------------------------------------------------------------------------------
OBSERVABILITY = {"prometheus", "grafana"}  # profile `observability`: tests/deploy/test_dashboard.py


def test_services_and_profiles(config, compose_bin):
    services = config["services"]
    assert set(services) == EXPECTED_SERVICES | OBSERVABILITY
    assert {name for name, s in services.items() if s.get("profiles")} == {"daemon-gpu"} | OBSERVABILITY
    assert services["daemon-gpu"]["profiles"] == ["gpu"]
    done = _compose(compose_bin, "config", "--profiles")
    assert done.returncode == 0 and sorted(done.stdout.split()) == ["gpu", "observability"], done.stdout + done.stderr


def test_kafka_is_a_single_kraft_node(config):
    kafka = config["services"]["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = env["KAFKA_LISTENERS"].split(",")
    assert "PLAINTEXT://:9092" in listeners and "CONTROLLER://:9093" in listeners
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert {name.split(":")[0] for name in listeners} <= set(protocol_map)
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key
    assert env["KAFKA_LOG_DIRS"] in {v.split(":")[1] for v in kafka["volumes"]}
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_topics_are_created_before_the_daemon_and_producer(config):
    services = config["services"]
    script = " ".join(services["topics"]["command"])
    for topic in ("filial.batches", "filial.dead-letter"):
        assert topic in script
    assert "--if-not-exists" in script
    for name in ("daemon", "daemon-gpu", "producer"):
        assert services[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}


def test_redis_is_durable_and_health_checked(config):
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"] == ["redis-server", "--appendonly", "yes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    assert "redis-data" in config["volumes"]


@pytest.mark.parametrize("name", ["daemon", "daemon-gpu"])
def test_daemon_services(config, name):
    daemon = config["services"][name]
    assert daemon["build"]["dockerfile"] == "deploy/Dockerfile"
    assert daemon["command"] == ["run"]
    assert daemon["environment"]["FILIAL_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert daemon["environment"]["FILIAL_REDIS_URL"] == "redis://redis:6379/0"
    assert daemon["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert daemon["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert daemon["restart"] == "unless-stopped"
    assert [p["target"] for p in daemon["ports"]] == [8080]


def test_gpu_daemon_reserves_an_nvidia_gpu(config):
    cpu, gpu = config["services"]["daemon"], config["services"]["daemon-gpu"]
    assert cpu["environment"]["FILIAL_DEVICE"] == "cpu" and "deploy" not in cpu
    assert gpu["environment"]["FILIAL_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # Apart from the device (and the host port, so both could coexist), the same daemon.
    assert {k: v for k, v in gpu["environment"].items() if k != "FILIAL_DEVICE"} == \
        {k: v for k, v in cpu["environment"].items() if k != "FILIAL_DEVICE"}
    assert gpu["depends_on"] == cpu["depends_on"] and gpu["image"] == cpu["image"]


@pytest.mark.parametrize("name", ["daemon", "daemon-gpu"])
def test_daemon_environment_is_valid_settings(config, name, monkeypatch, tmp_path):
    """Every FILIAL_* variable in the file is a setting with a valid value (no .env, no stray env)."""
    from daemon.service.settings import load_settings

    env = config["services"][name]["environment"]
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("FILIAL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    assert settings.kafka.bootstrap == "kafka:9092" and settings.redis.url == "redis://redis:6379/0"
    assert settings.model.device == env["FILIAL_DEVICE"]
    from daemon.service.settings import Settings

    from daemon.service.settings import FLAT_NAMES

    known = set(Settings.model_fields) | set(FLAT_NAMES)
    unknown = {k for k in env if k.startswith("FILIAL_") and k[7:].lower().split("__")[0] not in known}
    assert not unknown, f"not settings: {unknown}"
    health_port = settings.ops.health_port
    assert [p["target"] for p in config["services"][name]["ports"]] == [health_port]


def test_producer_runs_the_demos_stream(config):
    """`filial produce` with the demo's dataset, phases, samples per phase and batch size."""
    from daemon.cli import build_parser, cmd_produce
    from tools.demo import DEFAULT_PHASES

    producer = config["services"]["producer"]
    daemon_env = config["services"]["daemon"]["environment"]
    args = build_parser().parse_args(producer["command"])
    demo = build_parser().parse_args(["demo"])
    assert args.func is cmd_produce
    assert args.kafka_bootstrap == daemon_env["FILIAL_KAFKA_BOOTSTRAP"]
    assert args.topic == daemon_env["FILIAL_TOPIC"]
    assert args.dataset == "mnist5k"
    assert args.phase == DEFAULT_PHASES
    assert (args.samples_per_phase, args.batch_size) == (demo.samples_per_phase, demo.batch_size)
    assert producer["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert producer["restart"] == "no"
    assert producer["healthcheck"]["test"] == ["NONE"]  # no health server in a one-shot job


def test_the_producer_image_has_the_tools_extra(config):
    """`produce --dataset=mnist5k` needs the bundled datasets (the `tools` extra), which the runtime
    image leaves out: the producer's image is built with it, under its own name."""
    producer, daemon = config["services"]["producer"], config["services"]["daemon"]
    assert "--dataset=mnist5k" in producer["command"]
    assert producer["build"]["dockerfile"] == "deploy/Dockerfile"
    assert producer["build"].get("args", {}).get("FILIAL_EXTRAS") == "tools"
    assert producer["image"] != daemon["image"] and "FILIAL_EXTRAS" not in daemon["build"].get("args", {})


def test_watcher_follows_every_version_and_loads_it(config):
    from daemon.cli import build_parser
    from daemon.cli.follow import cmd_watch

    watcher = config["services"]["watcher"]
    args = build_parser().parse_args(watcher["command"])
    assert args.func is cmd_watch
    assert args.redis_url == config["services"]["daemon"]["environment"]["FILIAL_REDIS_URL"]
    assert args.from_version == "1" and args.load  # as the demo's watcher: every version, verified
    assert watcher["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert watcher["healthcheck"]["test"] == ["NONE"]


def test_serve_is_filial_serve_with_valid_settings_and_scales(config, monkeypatch, tmp_path):
    """`filial serve` on the daemon's Redis; every FILIAL_SERVE__ variable a valid setting; its port the
    settings' port; a host port range, so `--scale serve=N` starts N replicas (stateless)."""
    from daemon.cli import build_parser, cmd_serve
    from daemon.serve.settings import ENV_PREFIX, ServeSettings, load_settings

    serve = config["services"]["serve"]
    assert build_parser().parse_args(serve["command"]).func is cmd_serve
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("FILIAL_"):
            monkeypatch.delenv(key)
    env = serve["environment"]
    assert all(k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in ServeSettings.model_fields for k in env)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    assert settings.redis_url == config["services"]["daemon"]["environment"]["FILIAL_REDIS_URL"]
    assert serve["depends_on"]["redis"] == {"condition": "service_healthy"} and "kafka" not in serve["depends_on"]
    (port,) = serve["ports"]
    assert port["target"] == settings.port == 8080  # the image's HEALTHCHECK default
    assert "-" in str(port["published"]), "a fixed host port would stop `--scale serve=N`"
    assert serve["restart"] == "unless-stopped" and "volumes" not in serve


# --- Dockerfile ------------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def _healthcheck_code() -> str:
    (healthcheck,) = [arg for op, arg in _instructions() if op == "HEALTHCHECK"]
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"], "slim has no curl: the probe is python -c"
    return exec_form[2]


INSTALL = 'pip install ".${FILIAL_EXTRAS:+[$FILIAL_EXTRAS]}" && rm -rf /src/build'


def test_dockerfile_shape():
    ops = _instructions()
    assert ops[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert [arg for op, arg in ops if op == "ENTRYPOINT"] == ['["filial"]']
    assert ("RUN", INSTALL) in ops
    assert "/healthz" in _healthcheck_code() and "FILIAL_HEALTH_PORT" in _healthcheck_code()


@pytest.mark.parametrize("extras,command", [("", "pip install ."), ("tools", "pip install .[tools]")],
                         ids=["runtime", "tools"])
def test_the_runtime_image_installs_no_extra_unless_asked(extras, command):
    """By default the image installs the runtime only; ``--build-arg FILIAL_EXTRAS=tools`` adds the tools'
    dependencies (bundled datasets for `filial produce --dataset mnist5k`). The RUN line is run by
    /bin/sh with the ARG in its environment, as docker does."""
    ops = _instructions()
    assert ("ARG", "FILIAL_EXTRAS=") in ops  # empty default
    assert ops.index(("ARG", "FILIAL_EXTRAS=")) < ops.index(("RUN", INSTALL))
    pip = INSTALL.split(" && ")[0]
    done = subprocess.run(["/bin/sh", "-c", f"echo {pip}"], env={"FILIAL_EXTRAS": extras, "PATH": os.defpath},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == command


def test_the_image_needs_nothing_for_plots():
    """Plotting (matplotlib) is only the benchmarks' (the tools extra): no MPLCONFIGDIR or the like."""
    text = DOCKERFILE.read_text()
    assert "MPLCONFIGDIR" not in text and "matplotlib" not in " ".join(arg for _, arg in _instructions())


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_keeps_it():
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [part for op, arg in _instructions() if op == "COPY" for part in arg.split()[:-1]
               if not part.startswith("--")]
    assert {"pyproject.toml", "README.md", "daemon", "consumers", "zoo_store"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    # Every package pyproject installs is copied, but the benchmarks (run from a checkout, not the image);
    # tools/ is copied for `filial produce` (its dependencies only with FILIAL_EXTRAS=tools).
    packages = ast.literal_eval(re.search(r'include = (\[.*?\])', (ROOT / "pyproject.toml").read_text()).group(1))
    assert {p.rstrip("*") for p in packages} - {"benchmarks"} == set(sources) - {"pyproject.toml", "README.md"}
    assert "benchmarks" not in sources and "benchmarks" in ignored
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("variable", ["FILIAL_HEALTH_PORT", "FILIAL_SERVE__PORT"], ids=["daemon", "serve"])
@pytest.mark.parametrize("status,healthy", [(200, True), (503, False)])
def test_dockerfile_healthcheck_probe(status, healthy, variable, monkeypatch):
    """The HEALTHCHECK's python probe exits 0 on 200 from /healthz and non-zero otherwise, on the daemon's
    health port or `filial serve`'s port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("FILIAL_HEALTH_PORT", "FILIAL_SERVE__PORT")}
        env[variable] = str(server.server_address[1])
        done = subprocess.run([sys.executable, "-c", _healthcheck_code()], env=env, capture_output=True, timeout=30)
        assert (done.returncode == 0) is healthy, done.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_the_broker_takes_every_message_the_daemon_accepts(config):
    """The broker's message limit was 10 MB, below filial's 16 MiB: 10-16 MiB batches failed at the producer."""
    from consumers.wire import WireLimits

    env = {k: str(v) for k, v in config["services"]["kafka"]["environment"].items()}
    limit = WireLimits().max_message_bytes
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= limit + 64 * 1024  # the payload plus headers and batch overhead
    assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= int(env["KAFKA_MESSAGE_MAX_BYTES"])
