// Shared by the CUDA backend's .cu files only (never by host code): launch geometry,
// the activation formulas, and the backend's state (stream, cuBLAS and cuDNN handles,
// scratch memory); the checked-call macros come from cuda_check.hpp.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <string>
#include <vector>

#include "elbo/backend/cuda/cuda_backend.hpp"
#include "elbo/backend/cuda/cuda_check.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

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

// Device memory that grows to the largest need seen. A recorded CUDA graph keeps the
// addresses it was recorded with and replays them forever, so a buffer this backend
// hands to kernels is never freed while the backend lives: growing keeps the old
// allocation in `retired` (released with the State) and at least doubles, so what is
// retired stays smaller than what is live.
struct GrowingBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  std::vector<void*> retired;
  size_t retired_bytes = 0;
  // At least `need` bytes. Returns true when it allocated (then the contents are
  // undefined). Allocation happens for a new, larger shape, never in a steady-state step.
  bool reserve(size_t need);
  size_t held() const;  // live and retired bytes
  GrowingBuffer() = default;
  GrowingBuffer(const GrowingBuffer&) = delete;
  GrowingBuffer& operator=(const GrowingBuffer&) = delete;
  ~GrowingBuffer();
};

struct CudaBackend::State {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  double* scratch = nullptr;     // reduction partials and their sum (cuda_backend.cu)
  void* blas_workspace = nullptr;  // cuBLAS's and cuBLASLt's workspace (one stream: never used at once),
  size_t blas_workspace_bytes = 0;  //   set once so that graph capture allocates nothing
  cudnnHandle_t dnn = nullptr;   // created on the first convolution (MLP runs never load cuDNN)
  bool deterministic = true;     // cuDNN algorithms: deterministic ones only (train.deterministic)
  GrowingBuffer workspace;       // cuDNN workspace, grown to the largest plan's need, then reused
  GrowingBuffer partials;        // per-(sample, channel) partial sums for deterministic reductions
  GrowingBuffer ones;            // 1.0f each: the vector the column-sum GEMVs multiply with
  std::unique_ptr<ConvPlans, PlanDeleter<ConvPlans>> plans;
  cublasLtHandle_t lt = nullptr;  // cuBLASLt, for GEMMs with the bias and ReLU fused in
  std::unique_ptr<LinearPlans, PlanDeleter<LinearPlans>> linear_plans;
  ~State();  // releases everything above (cuda_backend.cu)
};

namespace cuda_detail {
// out[j] += sum_i d[i * cols + j] for a row-major rows x cols matrix: one cuBLAS GEMV
// against a vector of ones. Parallel over rows and columns, and deterministic (cuBLAS
// gives the same bits every run on one GPU model; no atomics), unlike a thread per
// column summing thousands of rows one after another.
void sum_rows_into(CudaBackend::State& st, int rows, int cols, const float* d, float* out);
// Scratch of at least `floats` floats (st.partials).
float* partials(CudaBackend::State& st, size_t floats);
}  // namespace cuda_detail

}  // namespace elbo
