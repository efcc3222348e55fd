#!/usr/bin/env bash
# Installs what is missing, builds elbo with its tests and runs the whole suite.
# This is exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash launch/install_deps.sh --with-tests
cmake -S . -B build-tests -DCMAKE_BUILD_TYPE=Release -DELBO_BUILD_TESTS=ON
cmake --build build-tests -j"$(nproc)"
cd build-tests
ctest --output-on-failure -j"$(nproc)" --timeout 600
