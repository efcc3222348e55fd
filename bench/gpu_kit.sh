#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .gpukit.tar.xz at the repo root, to be
# named in the device tool's `carry` (the machine has CUDA, PyTorch, h5py, mpi4py and
# no package registry; see /work/.library/device). Inside: elbo, elbo-shard and the
# CUDA test binaries built here (x86-64), every shared library they and Open MPI need
# apart from glibc and the CUDA libraries (the machine's toolkit and PyTorch's wheels
# provide those), Open MPI relocated under usr/ (OPAL_PREFIX), the Fashion-MNIST test
# split, and env.sh to source there. xz keeps it well under the 64 MiB carry limit.
# Usage: bash bench/gpu_kit.sh   then on the device: bash bench/gpu_session.sh PHASE
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build-gpukit}
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DELBO_BUILD_TESTS=ON -DELBO_CUDA=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target elbo elbo-shard test_cuda_parity test_probe test_conv_ops >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
k=$tmp/gpukit
ompi_lib=usr/lib/x86_64-linux-gnu/openmpi/lib
mkdir -p "$k"/{bin,lib,data,usr/bin,$ompi_lib,usr/share}
cp "$BUILD"/src/elbo "$BUILD"/data_tools/elbo-shard "$BUILD"/tests/backend/test_cuda_parity \
   "$BUILD"/tests/backend/test_probe "$BUILD"/tests/backend/test_conv_ops "$k"/bin/
cp /usr/bin/orterun /usr/bin/orted "$k"/usr/bin/
ln -s orterun "$k"/usr/bin/mpirun
cp -a /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3 "$k/$ompi_lib"/
cp -a /usr/share/openmpi "$k"/usr/share/
# Every dependency outside glibc and CUDA (the machine's own versions of those are the
# ones that match its driver).
for f in "$k"/bin/* "$k"/usr/bin/orte* "$k/$ompi_lib"/openmpi3/*.so; do
  ldd "$f" 2>/dev/null | awk '/=> \// {print $3}'
done | sort -u | grep -v -E '/(libc|libm|libmvec|libdl|libpthread|librt|libresolv|libutil)\.so|ld-linux|lib(cuda|cudart|cublas|cublasLt|cudnn|nccl|nvrtc)' |
  xargs -r cp -L -t "$k"/lib
cp /usr/share/datasets/fashion-mnist/t10k-* "$k"/data/
cat >"$k"/env.sh <<'ENV'
# Source on the GPU machine: the kit's Open MPI and libraries, then the CUDA libraries
# of the toolkit and of PyTorch's wheels (cuDNN, NCCL, cuBLAS).
kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX=$kit/usr PATH=$kit/usr/bin:$kit/bin:$PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
cuda_dirs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = [d for r in roots for d in glob.glob(os.path.join(r, "*", "lib"))]
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=$kit/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${cuda_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
ENV
tar -C "$tmp" -cJf "$ROOT/.gpukit.tar.xz" gpukit
echo "gpu_kit: $(du -h "$ROOT/.gpukit.tar.xz" | cut -f1) in .gpukit.tar.xz ($(ls "$k"/lib | wc -l) libraries); carry it"
