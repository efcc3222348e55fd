// The checked-call macros for CUDA, cuBLAS and cuDNN: one definition for every .cu
// file (the backend's and the NCCL reducer's). A failure throws an Internal error
// naming the call, the file and line, and the library's own message.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <string>

#include "elbo/util/error.hpp"

namespace elbo {

[[noreturn]] inline void cuda_failed(const char* call, const char* file, int line, const std::string& why) {
  ::elbo::detail::throw_call_failed(ErrorKind::Internal, call, file, line, why);
}

#define CHECK_CUDA(call)                                                                               \
  do {                                                                                                 \
    cudaError_t elbo_rc_ = (call);                                                                     \
    if (elbo_rc_ != cudaSuccess) ::elbo::cuda_failed(#call, __FILE__, __LINE__, cudaGetErrorString(elbo_rc_)); \
  } while (0)

#define CHECK_CUBLAS(call)                                                                             \
  do {                                                                                                 \
    cublasStatus_t elbo_rc_ = (call);                                                                  \
    if (elbo_rc_ != CUBLAS_STATUS_SUCCESS)                                                             \
      ::elbo::cuda_failed(#call, __FILE__, __LINE__, cublasGetStatusString(elbo_rc_));                 \
  } while (0)

#define CHECK_CUDNN(call)                                                                              \
  do {                                                                                                 \
    cudnnStatus_t elbo_rc_ = (call);                                                                   \
    if (elbo_rc_ != CUDNN_STATUS_SUCCESS)                                                              \
      ::elbo::cuda_failed(#call, __FILE__, __LINE__, cudnnGetErrorString(elbo_rc_));                   \
  } while (0)

// Kernel launches report errors only through cudaGetLastError.
#define CHECK_LAUNCH(name) CHECK_CUDA(cudaGetLastError())

}  // namespace elbo
