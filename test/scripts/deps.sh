#!/usr/bin/env bash
# Installs the system packages that ferry's tests, demo and bench need, only
# where they are missing: iptables (redirect rules), iproute2 (netns, veth,
# bridge, ifb), util-linux (setpriv, nsenter), procps (ps), haproxy (bench's
# reference proxy), docker.io and debootstrap (the compose example). apt-get
# update runs at most once.
set -euo pipefail

need=()
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ps >/dev/null 2>&1 || need+=(procps)
if [ "${WITH_BENCH:-0}" = 1 ]; then
  command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
fi
# --- compose example (TestCompose, make compose-up) ---
# docker.io: dockerd, containerd, runc and the docker client /usr/bin/docker
# that the tests use (test/dockerenv); debootstrap: base images made locally
# when no image registry is reachable. The package's service is not started:
# the tests start their own engine.
{ command -v dockerd >/dev/null 2>&1 && [ -x /usr/bin/docker ]; } || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
# --- end compose example ---

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
