// CUDA device discovery: the first piece of the CUDA backend, used by `elbo info`
// and by tests that must say "skipped: no GPU" rather than pass silently.
#include <cuda_runtime.h>

#include <string>

#include "elbo/backend/cuda/cuda_device.hpp"

namespace elbo::cuda {

int device_count(std::string* detail) {
  int n = 0;
  cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    if (detail != nullptr) *detail = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(rc);
    cudaGetLastError();  // clear the sticky error so later probes start clean
    return 0;
  }
  if (detail != nullptr) {
    detail->clear();
    for (int i = 0; i < n; ++i) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
        if (!detail->empty()) *detail += "; ";
        *detail += std::to_string(i) + ": " + prop.name + " (sm_" + std::to_string(prop.major) +
                   std::to_string(prop.minor) + ", " +
                   std::to_string(prop.totalGlobalMem >> 20) + " MiB)";
      }
    }
    if (n == 0) *detail = "no CUDA device present";
  }
  return n;
}

}  // namespace elbo::cuda
