#!/usr/bin/env bash
# wrk, nginx, h2load and taskset from Debian's packages, for `make bench`; does nothing when they are there.
# nginx is installed without starting its service: the benchmarks run their own nginx processes.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
need=()
have wrk || need+=(wrk)
have nginx || need+=(nginx-light)
have h2load || need+=(nghttp2-client)
have taskset || need+=(util-linux)
[ ${#need[@]} -eq 0 ] && exit 0

sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
echo "installing Debian packages: ${need[*]}" >&2
"${sudo_cmd[@]}" apt-get update -qq
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
  "${sudo_cmd[@]}" chmod +x "$policy"
  created_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || status=$?
[ -n "$created_policy" ] && "${sudo_cmd[@]}" rm -f "$policy"
exit $status
