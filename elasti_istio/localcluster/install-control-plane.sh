#!/usr/bin/env bash
# Installs the Kubernetes control-plane programs the local cluster runs on:
#   etcd (Debian's etcd-server), kube-apiserver and kube-controller-manager (built once from
#   Debian's kubernetes 1.20.2 source package) into ${ELASTI_CACHE_DIR:-~/.cache/elasti-istio}/bin.
# Idempotent: a second run with the binaries in place is a quick no-op.
# The system's apt sources are never edited: the deb-src entry lives in a private list that is
# passed to apt with -o options.
set -euo pipefail

cache="${ELASTI_CACHE_DIR:-$HOME/.cache/elasti-istio}"
bin="$cache/bin"
mkdir -p "$bin"

log() { printf '[install-control-plane] %s\n' "$*" >&2; }

have() { [ -x "$bin/$1" ] && "$bin/$1" --version >/dev/null 2>&1; }

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

# Prometheus (Debian's package) serves the idle-trigger tests; its service is never started here.
if ! command -v prometheus >/dev/null 2>&1 && [ -z "${ELASTI_SKIP_PROMETHEUS:-}" ]; then
  log "installing Debian's prometheus (for the idle scale-down tests)"
  "${sudo_cmd[@]}" apt-get update -qq
  policy=/usr/sbin/policy-rc.d
  created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends prometheus >&2 || \
    log "prometheus could not be installed; the idle scale-down tests will fail"
  [ -n "$created_policy" ] && "${sudo_cmd[@]}" rm -f "$policy"
fi

# Bumped whenever the build recipe changes, so that binaries built by an older recipe are rebuilt.
recipe=2
if [ "$(cat "$bin/recipe" 2>/dev/null)" != "$recipe" ]; then
  rm -f "$bin/kube-apiserver" "$bin/kube-controller-manager"
fi

if have etcd && have kube-apiserver && have kube-controller-manager; then
  log "control plane already installed in $bin"
  echo "$bin"
  exit 0
fi

need_pkgs=()
for p in etcd-server golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

if ! have etcd; then
  etcd_path="$(command -v etcd || true)"
  [ -n "$etcd_path" ] || etcd_path=/usr/bin/etcd
  cp "$etcd_path" "$bin/etcd"
  log "etcd: $("$bin/etcd" --version | head -n1)"
fi

if have kube-apiserver && have kube-controller-manager; then
  echo "$bin"
  exit 0
fi

build="$cache/build"
mkdir -p "$build/apt/lists/partial" "$build/apt/parts"
src_list="$build/apt/sources.list"
echo "deb-src http://deb.debian.org/debian bookworm main" > "$src_list"
apt_opts=(-o "Dir::Etc::SourceList=$src_list" -o "Dir::Etc::SourceParts=$build/apt/parts"
          -o "Dir::State::Lists=$build/apt/lists")

srcdir="$(find "$build" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n1 || true)"
if [ -z "$srcdir" ]; then
  log "fetching Debian's kubernetes source package (private apt list: $src_list)"
  apt-get "${apt_opts[@]}" update -qq >&2
  (cd "$build" && apt-get "${apt_opts[@]}" source -qq kubernetes >&2)
  srcdir="$(find "$build" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n1)"
fi
[ -n "$srcdir" ] || { log "kubernetes source not found under $build"; exit 1; }

# The vendored reflect2 1.0.1 crashes the API server under Go >= 1.18 ("fatal error: fault" in
# mapiterinit on the first custom resource create); Debian's 1.0.2 does not.
r2="$srcdir/vendor/github.com/modern-go/reflect2"
if [ ! -f "$r2/.elasti-replaced" ]; then
  log "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
  rm -rf "$r2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$r2"
  rm -f "$r2/go.mod" "$r2/go.sum"
  touch "$r2/.elasti-replaced"
fi

# Built with Go >= 1.16, 1.20's vendored kube-openapi takes an empty string in a custom resource for a
# null and refuses it (kubernetes#99804, fixed upstream by kube-openapi#230): restore the nil check.
tv="$srcdir/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"
if grep -q 'data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))' "$tv"; then
  log "patching kube-openapi's zero-value check (kubernetes#99804)"
  sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$tv"
fi

mkdir -p "$srcdir/.go/src/k8s.io"
ln -sfn "$srcdir" "$srcdir/.go/src/k8s.io/kubernetes"
for what in kube-apiserver kube-controller-manager; do
  if have "$what"; then continue; fi
  log "building $what (several minutes on 2 cores; output in $build/$what.log)"
  start=$(date +%s)
  (cd "$srcdir/.go/src/k8s.io/kubernetes" && \
     GOPATH="$srcdir/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$build/gocache" \
     make WHAT="cmd/$what" >"$build/$what.log" 2>&1) || {
       log "build of $what failed; last lines of $build/$what.log:"; tail -n 30 "$build/$what.log" >&2; exit 1; }
  out="$(find "$srcdir/_output" -type f -name "$what" -perm -u+x | head -n1)"
  cp "$out" "$bin/$what"
  log "$what built in $(( $(date +%s) - start ))s"
done
echo "$recipe" > "$bin/recipe"
echo "$bin"
