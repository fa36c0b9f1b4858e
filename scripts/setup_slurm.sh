#!/usr/bin/env bash
# Install what the Slurm test tier needs (Debian/Ubuntu, apt, no recommends): Slurm 22.05 (controller, node daemon,
# clients), munge, slurmdbd + MariaDB (NeMo-Run reads job states through sacct), shellcheck, iproute2 and util-linux
# (the test nodes' network namespaces and bridge; nsenter, unshare).
# Not root: prints why and does nothing (the tier skips itself when not root).
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server shellcheck iproute2 util-linux)
if [[ $(id -u) != 0 ]]; then
  echo "setup-slurm: not root, not installing ${PKGS[*]} (tests/slurm skip when not root)"
  exit 0
fi
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if (( ${#missing[@]} )); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
slurmctld -V
