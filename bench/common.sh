# Shared by the bench scripts: paths, the build, the shards, Open MPI as root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
DATA=${DATA:-$ROOT/data/fmnist}
PY=${PY:-${ELBO_PYTHON:-/usr/bin/python3}}  # a python3 with torch (the GPU kit sets PY)
ELBO=${ELBO:-$BUILD/src/elbo}  # ELBO may name a prebuilt binary (the GPU kit's)
if [[ ! -x $ELBO || ( ! -f $DATA/train/manifest.yaml && ! -x $BUILD/data_tools/elbo-shard ) ]]; then
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DELBO_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD" -j"$(nproc)" >/dev/null
fi
if [[ ! -f $DATA/train/manifest.yaml || ! -f $DATA/test/manifest.yaml ]]; then
  "$BUILD/data_tools/elbo-shard" --dataset-dir /usr/share/datasets/fashion-mnist --out "$DATA" --num-shards 4 --overwrite
fi
if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
if [[ -n ${BENCH_KEEP:-} ]]; then  # keep the runs' logs and metrics (the GPU session reads them)
  WORK=$BENCH_KEEP
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /tmp/elbo-bench.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
