#!/usr/bin/env bash
# Installs the Debian packages of the external programs that ferry's tests,
# demo and bench run, only where a program is missing. The programs are
# listed in one place, test/testbed/programs.txt ("program package" per
# line), which the testbed also embeds: it refuses to run a program that is
# not listed there. apt-get update runs at most once. A package "-" is a
# prerequisite (the Go toolchain) that is checked, not installed.
#
# WITH_BENCH is accepted for compatibility; the e2e bench smoke test runs
# HAProxy too, so the whole list is always installed.
set -euo pipefail

list="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/test/testbed/programs.txt"
[ -r "$list" ] || { echo "deps: cannot read $list" >&2; exit 1; }

need=()
missing_prereq=()
while read -r line; do
  line="${line%%#*}"
  read -r prog pkg extra <<<"$line" || true
  [ -n "${prog:-}" ] || continue
  if [ -z "${pkg:-}" ] || [ -n "${extra:-}" ]; then
    echo "deps: $list: bad line: $line" >&2
    exit 1
  fi
  command -v "$prog" >/dev/null 2>&1 && continue
  if [ "$pkg" = - ]; then
    missing_prereq+=("$prog")
    continue
  fi
  case " ${need[*]-} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
done <"$list"

if [ ${#missing_prereq[@]} -gt 0 ]; then
  echo "deps: missing prerequisites (not installed by this script): ${missing_prereq[*]}" >&2
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
