#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .gpukit.tar.xz at the repo root (ignored by
# git), to be named in the device tool's `carry`. The machine has the CUDA toolkit,
# PyTorch with its cuDNN and NCCL wheels, h5py and compute-sanitizer, and no package
# registry (see /work/.library/device). Inside the kit:
#   libexec/  elbo, elbo-shard, the CUDA test binaries (built here, x86-64), orterun
#   bin/      one wrapper per program: it puts lib/ and the CUDA libraries on
#             LD_LIBRARY_PATH for that program alone, so Python, nvidia-smi and
#             compute-sanitizer keep the machine's own libstdc++ and friends
#   lib/      every shared library those programs and Open MPI's plugins need, apart
#             from glibc and CUDA (the machine's own match its driver)
#   usr/      Open MPI relocated (OPAL_PREFIX) with its plugins and help files, and
#             PMIx's plugins and help files (PMIX_PREFIX)
#   data/     the Fashion-MNIST test split (IDX)
#   env.sh    to source there: PATH, Open MPI without ssh, the library path for the wrappers
# Usage: bash bench/gpu_kit.sh   then the device runs: bash bench/gpu_session.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build-gpukit}
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DELBO_BUILD_TESTS=ON -DELBO_CUDA=ON >/dev/null
programs=(src/elbo data_tools/elbo-shard tests/backend/test_cuda_parity tests/backend/test_probe
          tests/backend/test_conv_ops)
cmake --build "$BUILD" -j"$(nproc)" --target "${programs[@]##*/}" >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
k=$tmp/gpukit
ompi_lib=usr/lib/x86_64-linux-gnu/openmpi/lib
pmix=usr/lib/x86_64-linux-gnu/pmix2
mkdir -p "$k"/{bin,libexec,lib,data,usr/bin,usr/share,$ompi_lib,$pmix/lib,$pmix/share}
for p in "${programs[@]}"; do cp "$BUILD/$p" "$k"/libexec/; done
cp /usr/bin/orterun "$k"/libexec/
# A process started without mpirun (a singleton) forks orted from $OPAL_PREFIX/bin; it
# inherits the library path of the wrapper that started elbo.
cp /usr/bin/orted "$k"/usr/bin/
cp -a /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3 "$k/$ompi_lib"/
cp -a /usr/share/openmpi "$k"/usr/share/
cp -a /usr/lib/x86_64-linux-gnu/pmix2/lib/pmix "$k/$pmix"/lib/
cp -a /usr/lib/x86_64-linux-gnu/pmix2/share/pmix "$k/$pmix"/share/
# Every dependency outside glibc and CUDA.
for f in "$k"/libexec/* "$k"/usr/bin/orted "$k/$ompi_lib"/openmpi3/*.so "$k/$pmix"/lib/pmix/*.so; do
  ldd "$f" 2>/dev/null | awk '/=> \// {print $3}'
done | sort -u |
  grep -v -E '/(libc|libm|libmvec|libdl|libpthread|librt|libresolv|libutil)\.so|ld-linux|lib(cuda|cudart|cublas|cublasLt|cudnn|nccl|nvrtc)\.' |
  xargs -r cp -L -t "$k"/lib
cp /usr/share/datasets/fashion-mnist/t10k-* "$k"/data/

for p in "$k"/libexec/*; do
  name=$(basename "$p")
  [[ $name == orterun ]] && name=mpirun
  cat >"$k/bin/$name" <<WRAP
#!/bin/sh
# The kit's $(basename "$p") with the kit's libraries (env.sh sets ELBO_KIT_LD).
: "\${ELBO_KIT_LD:?source the kit's env.sh first}"
LD_LIBRARY_PATH=\$ELBO_KIT_LD\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec "\$(dirname "\$0")/../libexec/$(basename "$p")" "\$@"
WRAP
  chmod +x "$k/bin/$name"
done

cat >"$k"/env.sh <<'ENV'
# Source on the GPU machine. Sets PATH to the kit's wrappers, Open MPI and PMIx
# relocated into the kit, Open MPI as root without ssh/rsh (one node: mpirun starts
# the ranks itself), ELBO_PY (the python3 that has torch), and ELBO_KIT_LD, the
# library path the wrappers give their program alone: the kit's libraries, then the
# toolkit's, then the CUDA wheels' (cuDNN, NCCL) found through that python.
kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX=$kit/usr PATH=$kit/bin:$PATH${PATH:+:}/usr/local/cuda/bin
# PMIx's directories are absolute in Debian's build, so PMIX_PREFIX alone moves
# nothing: without these it loads the machine's own (other version) PMIx plugins.
export PMIX_PREFIX=$kit/usr/lib/x86_64-linux-gnu/pmix2
export PMIX_LIBDIR=$PMIX_PREFIX/lib PMIX_PKGLIBDIR=$PMIX_PREFIX/lib/pmix
export PMIX_DATADIR=$PMIX_PREFIX/share PMIX_PKGDATADIR=$PMIX_PREFIX/share/pmix
export OMPI_MCA_plm_rsh_agent=false OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export ELBO_PY=python3
for py in /opt/torch/.venv/bin/python3 python3; do
  if command -v "$py" >/dev/null && "$py" -c 'import torch' 2>/dev/null; then ELBO_PY=$(command -v "$py"); break; fi
done
wheel_dirs=$("$ELBO_PY" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
print(":".join(d for r in roots for pat in ("*/lib", "*/lib64") for d in sorted(glob.glob(os.path.join(r, pat)))))
PY
)
export ELBO_KIT_LD=$kit/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${wheel_dirs:+:$wheel_dirs}
ENV
tar -C "$tmp" -cJf "$ROOT/.gpukit.tar.xz" gpukit
echo "gpu_kit: $(du -h "$ROOT/.gpukit.tar.xz" | cut -f1) in .gpukit.tar.xz ($(ls "$k"/lib | wc -l) libraries); carry it"
