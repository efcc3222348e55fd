#!/usr/bin/env bash
# From a fresh Debian 12 machine to a trained VAE: installs what is missing,
# builds elbo, shards Fashion-MNIST and trains configs/fmnist_mlp.yaml on 2 MPI
# ranks, then evaluates the model on the test split.
# Usage: bash launch/quickstart.sh [extra --set overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."

bash launch/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DELBO_BUILD_TESTS=OFF
cmake --build build -j"$(nproc)"

if [[ ! -f data/fmnist/train/manifest.yaml || ! -f data/fmnist/test/manifest.yaml ]]; then
  build/data_tools/elbo-shard --dataset-dir /usr/share/datasets/fashion-mnist --out data/fmnist \
    --num-shards 4 --test-shards 1 --overwrite
fi

# Open MPI refuses to start as root unless told that it is intended.
if [[ $(id -u) -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
run_dir="runs/fmnist_mlp-$(date +%Y%m%d-%H%M%S)"
mpirun -np 2 --bind-to core build/src/elbo train configs/fmnist_mlp.yaml \
  --set output.dir="$run_dir" --set train.threads=1 "$@"
echo "quickstart: model, metrics, evaluation and pictures (samples.png, recon.png) are in $run_dir"
