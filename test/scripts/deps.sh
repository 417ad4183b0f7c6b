#!/usr/bin/env bash
# Installs the system packages that ferry's tests, demo and bench need, only
# where they are missing: iptables (redirect rules), iproute2 (netns, veth,
# bridge, ifb), util-linux (setpriv, nsenter), procps (ps), haproxy (bench's
# reference proxy), containernetworking-plugins (the CNI tests' reference
# plugins). apt-get update runs at most once.
set -euo pipefail

need=()
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ps >/dev/null 2>&1 || need+=(procps)
# CNI tests (issue 16): the reference plugins bridge, host-local, loopback.
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] ||
  need+=(containernetworking-plugins)
if [ "${WITH_BENCH:-0}" = 1 ]; then
  command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "deps: missing ${need[*]}; run as root to install them (or install them yourself)" >&2
  exit 0
fi
echo "deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
