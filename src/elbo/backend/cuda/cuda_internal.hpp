// Shared by the CUDA backend's .cu files only (never by host code): the checked-call
// macros, launch geometry, and the backend's state (stream, cuBLAS and cuDNN
// handles, scratch memory).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <string>

#include "elbo/backend/cuda/cuda_backend.hpp"
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

namespace cuda_detail {

constexpr int kThreads = 256;

inline unsigned blocks_for(size_t n) {
  size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? (b == 0 ? 1 : b) : 65535 * 32);
}

inline int act_code(Activation a) {
  switch (a) {
    case Activation::Identity: return 0;
    case Activation::Relu: return 1;
    case Activation::Tanh: return 2;
    case Activation::Softplus: return 3;
  }
  return 0;
}

// The activations by act_code, with the CPU reference's formulas.
__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid_f(float x) {
  float e = expf(-fabsf(x));
  float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}
__device__ __forceinline__ float activate(int act, float p) {
  switch (act) {
    case 0: return p;
    case 1: return p > 0.0f ? p : 0.0f;
    case 2: return tanhf(p);
    default: return softplus_f(p);
  }
}
// d(pre) from d(out); tanh' from the output.
__device__ __forceinline__ float activate_grad(int act, float g, float pre, float out) {
  switch (act) {
    case 0: return g;
    case 1: return out > 0.0f ? g : 0.0f;  // relu(pre) > 0 exactly when pre > 0
    case 2: return g * (1.0f - out * out);
    default: return g * sigmoid_f(pre);
  }
}

}  // namespace cuda_detail

// Per-shape plans, each kept by the file that makes them: cuDNN convolutions
// (cuda_conv.cu) and cuBLASLt fused GEMMs (cuda_linear.cu).
struct ConvPlans;
struct LinearPlans;
void destroy(ConvPlans* p) noexcept;
void destroy(LinearPlans* p) noexcept;
template <class P>
struct PlanDeleter {
  void operator()(P* p) const noexcept { destroy(p); }
};

struct CudaBackend::State {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  double* scratch = nullptr;     // reduction partials and their sum (cuda_backend.cu)
  void* blas_workspace = nullptr;  // cuBLAS's and cuBLASLt's workspace (one stream: never used at once),
  size_t blas_workspace_bytes = 0;  //   set once so that graph capture allocates nothing
  cudnnHandle_t dnn = nullptr;   // created on the first convolution (MLP runs never load cuDNN)
  void* workspace = nullptr;     // cuDNN workspace, grown to the largest plan's need, then reused
  size_t workspace_bytes = 0;
  float* partials = nullptr;     // per-(sample, channel) partial sums for deterministic reductions
  size_t partials_floats = 0;
  std::unique_ptr<ConvPlans, PlanDeleter<ConvPlans>> plans;
  cublasLtHandle_t lt = nullptr;  // cuBLASLt, for GEMMs with the bias and ReLU fused in
  std::unique_ptr<LinearPlans, PlanDeleter<LinearPlans>> linear_plans;
  ~State();  // releases everything above (cuda_backend.cu)
};

}  // namespace elbo
