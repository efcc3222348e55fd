// CUDA device discovery; compiled only when the build found nvcc (ELBO_HAVE_CUDA).
#pragma once

#include <string>

namespace elbo::cuda {

// Number of usable CUDA devices; 0 with the reason in *detail when there is none
// (no driver, no GPU). Never throws: a machine without a GPU is a normal case.
int device_count(std::string* detail);

}  // namespace elbo::cuda
