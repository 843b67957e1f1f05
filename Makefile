# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first: the project with
# the `dev` extra (pytest) and the `tools` extra (bundled datasets and plots for tools/ and benchmarks/,
# which the demo, the benchmarks, `make chaos` and the tests use; the daemon itself does not need them).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chaos scale bench-scale bench-soak bench-merge bench-hkt bench-drift bench-pause bench-cl bench-ablation bench-throughput compose-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,tools]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/filial demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# SIGKILL the daemon at >= 10 random dangerous moments, restart it, audit Redis (last line: JSON)
chaos: $(STAMP)
	$(BIN)/python -m tools.chaos

# 3 learners in one group on a 12-partition topic: SIGKILL one mid-training and the leader mid-merge, restart,
# audit exactly-once, versions, one fenced leader per version, accuracy vs one learner (last line: JSON)
scale: $(STAMP)
	$(BIN)/python -m tools.scale

bench-scale: $(STAMP)
	$(BIN)/filial bench scale

bench-soak: $(STAMP)
	$(BIN)/filial bench soak

bench-merge: $(STAMP)
	$(BIN)/filial bench merge

bench-hkt: $(STAMP)
	$(BIN)/filial bench hkt

bench-drift: $(STAMP)
	$(BIN)/filial bench drift

bench-pause: $(STAMP)
	$(BIN)/filial bench pause

# the baselines need the bench extra (avalanche-lib 0.6.0), installed here on first use
bench-cl: $(STAMP)
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('avalanche') is None)" \
		|| $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/filial bench cl

# which of the learner's tools pay off on which stream (filial only, its real path; last line: JSON)
bench-ablation: $(STAMP)
	$(BIN)/filial bench ablation

# the full path against the raw training loop, keep cost, ingest by client, publish -> follower (issue 14);
# confluent-kafka (the bench extra) for the ingest comparison, installed here on first use
bench-throughput: $(STAMP)
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('confluent_kafka') is None)" \
		|| $(BIN)/python -m pip install --quiet confluent-kafka
	$(BIN)/filial bench throughput

# docker-compose 1.29.2 (PyPI) in its own tools venv, nested under .venv/ so `make clean` removes it but never
# installed into the project's environment: it pins PyYAML 5.4.1, whose sdist only builds on Python 3.11
# with Cython<3 (deploy/compose-constraints.txt), and old jsonschema/dotenv.
# tests/deploy/test_compose.py builds the same venv itself when it is missing; this target is for humans.
COMPOSE_VENV  := $(VENV)/compose-tools
COMPOSE_STAMP := $(COMPOSE_VENV)/.installed

$(COMPOSE_STAMP): deploy/compose-constraints.txt
	$(PYTHON) -m venv $(COMPOSE_VENV)
	PIP_CONSTRAINT=$(CURDIR)/deploy/compose-constraints.txt $(COMPOSE_VENV)/bin/python -m pip install --quiet setuptools docker-compose==1.29.2
	touch $(COMPOSE_STAMP)

compose-config: $(COMPOSE_STAMP)
	$(COMPOSE_VENV)/bin/docker-compose -f docker-compose.yml --profile gpu config

clean:
	rm -rf $(VENV) bench-results .pytest_cache *.egg-info
