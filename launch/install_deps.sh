#!/usr/bin/env bash
# Installs the Debian packages elbo needs, and only those that are missing, so it
# is cheap to run every time. Usage: launch/install_deps.sh [--with-tests]
set -euo pipefail

pkgs=(build-essential cmake pkg-config libopenmpi-dev openmpi-bin libhdf5-dev libyaml-cpp-dev
      libopenblas-dev zlib1g-dev libpng-dev libjpeg62-turbo-dev libcli11-dev libprotobuf-dev protobuf-compiler
      dataset-fashion-mnist)
if [[ "${1:-}" == "--with-tests" ]]; then
  # SLURM and munge for the localhost-cluster test (tests/launch/test_slurm.py), which
  # runs its own daemons from a temporary directory. Debian's slurmd/slurmctld units
  # start only where /etc/slurm/slurm.conf exists; on a systemd machine the munge
  # service does start, with its own key, and is not used by the test.
  # iproute2 for the multi-node test (network namespaces as nodes, tests/launch/netns_nodes.py).
  pkgs+=(libgtest-dev python3-torch python3-h5py python3-numpy python3-pil python3-matplotlib slurmctld slurmd slurm-client munge
         iproute2)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_deps: all ${#pkgs[@]} packages present"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "install_deps: installing ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
