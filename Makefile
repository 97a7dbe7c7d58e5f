# elasti-istio: `make test` and `make demo` are the two set-up commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help venv binaries test test-unit lint demo bench clean cluster-up cluster-down

help:
	@echo "make test       create .venv, install, build the control plane once, run every test"
	@echo "make test-unit  tests that need no cluster"
	@echo "make demo       Bookinfo on a local cluster: details scaled to zero and woken by a request (DEMO_ARGS=--keep)"
	@echo "make lint       ruff"
	@echo "make cluster-up / cluster-down   the local cluster in .elasti/cluster"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# KUBEBUILDER_ASSETS, when set, names a folder with etcd, kube-apiserver and kube-controller-manager.
binaries:
	@if [ -n "$$KUBEBUILDER_ASSETS" ]; then echo "control plane from KUBEBUILDER_ASSETS=$$KUBEBUILDER_ASSETS"; \
	else ./scripts/install-control-plane >/dev/null; fi

test: venv binaries
	$(BIN)/pytest -ra $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest -ra -m "not cluster" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: venv binaries
	$(BIN)/elasti-istio demo $(DEMO_ARGS)

cluster-up: venv binaries
	$(BIN)/elasti-istio cluster up

cluster-down: venv
	$(BIN)/elasti-istio cluster down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
