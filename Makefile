# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chaos bench-merge bench-hkt bench-drift compose-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/filial demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-merge: $(STAMP)
	$(BIN)/filial bench merge

bench-hkt: $(STAMP)
	$(BIN)/filial bench hkt

bench-drift: $(STAMP)
	$(BIN)/filial bench drift

clean:
	rm -rf $(VENV) bench-results .pytest_cache *.egg-info
