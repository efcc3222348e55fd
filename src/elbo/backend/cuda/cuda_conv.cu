// Convolutions on cuDNN and the per-channel ops around them (bias + activation,
// GroupNorm) as kernels, mirroring cpu/cpu_conv.cpp and cpu/cpu_backend.cpp.
//
// Layout: NCHW, the layout of the CPU reference and of PyTorch's default, so the
// parity tests compare buffers directly. NHWC lets cuDNN use its channels-last
// kernels; which is faster for these small images is to be measured on the GPU
// (bench/gpu.sh) before switching.
//
// Per convolution shape, a plan is made once: descriptors, and the algorithms that
// cuDNN's heuristics rank first among those that are deterministic (so that a GPU
// run repeats bit for bit; train.deterministic: false drops that condition) with FMA
// math (no TF32, like the cuBLAS GEMMs). The
// workspace grows to the largest plan's need once; steady-state steps allocate
// nothing, and a graph recorded before a growth keeps a valid (retired) workspace.
#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>

#include "elbo/backend/cuda/cuda_internal.hpp"

namespace elbo {

struct ConvPlan {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  cudnnConvolutionFwdAlgo_t fwd{};
  cudnnConvolutionBwdDataAlgo_t bwd_data{};
  cudnnConvolutionBwdFilterAlgo_t bwd_filter{};
  size_t workspace = 0;
  ~ConvPlan() {
    if (x != nullptr) cudnnDestroyTensorDescriptor(x);
    if (y != nullptr) cudnnDestroyTensorDescriptor(y);
    if (w != nullptr) cudnnDestroyFilterDescriptor(w);
    if (conv != nullptr) cudnnDestroyConvolutionDescriptor(conv);
  }
};

struct ConvPlans {
  using Key = std::tuple<int, int, int, int, int, int, int, int, int>;
  std::map<Key, std::unique_ptr<ConvPlan>> by_shape;
};

void destroy(ConvPlans* p) noexcept { delete p; }

namespace {

using cuda_detail::act_code;
using cuda_detail::blocks_for;
using cuda_detail::kThreads;
using cuda_detail::partials;
using cuda_detail::sum_rows_into;

// The first algorithm in cuDNN's ranking that ran successfully in the heuristic and,
// when `deterministic`, gives the same bits every run.
template <class Perf>
Perf pick(const Perf* perf, int n, bool deterministic, const char* what, const ConvShape& s) {
  for (int i = 0; i < n; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && (!deterministic || perf[i].determinism == CUDNN_DETERMINISTIC))
      return perf[i];
  throw internal_error(std::string("cuDNN offers no ") + (deterministic ? "deterministic " : "") + what +
                       " algorithm for the convolution n " +
                       std::to_string(s.n) + ", c " + std::to_string(s.c) + ", " + std::to_string(s.h) + "x" +
                       std::to_string(s.w) + ", k " + std::to_string(s.k) + ", kernel " + std::to_string(s.r) + "x" +
                       std::to_string(s.s));
}

__global__ void channel_bias_act_fwd_kernel(int act, size_t total, int c, int hw, const float* bias, float* pre,
                                            float* out) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const float p = pre[i] + bias[(i / hw) % c];
    pre[i] = p;
    out[i] = cuda_detail::activate(act, p);
  }
}

__global__ void activation_kernel(int act, size_t total, const float* pre, float* out) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x)
    out[i] = cuda_detail::activate(act, pre[i]);
}

__global__ void activation_bwd_kernel(int act, size_t total, const float* pre, const float* out, const float* dout,
                                      float* dpre) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x)
    dpre[i] = cuda_detail::activate_grad(act, dout[i], pre[i], out[i]);
}

// Block-wide sum in double (deterministic: a fixed tree over the threads).
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// partial[b * c + ch] = sum over hw of d for sample b, channel ch: one block each.
__global__ void plane_sum_kernel(int hw, const float* d, float* partial) {
  __shared__ double shared[kThreads];
  const float* p = d + size_t(blockIdx.x) * hw;
  double acc = 0;
  for (int i = threadIdx.x; i < hw; i += blockDim.x) acc += p[i];
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = float(total);
}

// One block per (sample, group): mean and rstd in double, then y.
__global__ void group_norm_fwd_kernel(int c, int hw, int groups, float eps, const float* x, const float* gamma,
                                      const float* beta, float* y, float* stats) {
  __shared__ double shared[kThreads];
  const int b = blockIdx.x / groups, g = blockIdx.x % groups, cpg = c / groups;
  const size_t len = size_t(cpg) * hw, off = (size_t(b) * c + size_t(g) * cpg) * hw;
  double acc = 0;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) acc += x[off + i];
  const double mean = block_sum(acc, shared) / double(len);
  acc = 0;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const double d = x[off + i] - mean;
    acc += d * d;
  }
  const double rstd = rsqrt(block_sum(acc, shared) / double(len) + double(eps));
  if (threadIdx.x == 0) {
    stats[size_t(blockIdx.x) * 2] = float(mean);
    stats[size_t(blockIdx.x) * 2 + 1] = float(rstd);
  }
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const int cc = g * cpg + int(i / hw);
    const double a = rstd * gamma[cc];
    y[off + i] = float(x[off + i] * a + (beta[cc] - mean * a));
  }
}

// One block per (sample, group): dx, and per-(sample, channel) partials of dgamma and
// dbeta, summed over samples in a fixed order afterwards (no float atomics).
__global__ void group_norm_bwd_kernel(int c, int hw, int groups, const float* x, const float* gamma,
                                      const float* stats, const float* dy, float* dx, float* pg, float* pb) {
  __shared__ double shared[kThreads];
  const int b = blockIdx.x / groups, g = blockIdx.x % groups, cpg = c / groups;
  const size_t len = size_t(cpg) * hw, off = (size_t(b) * c + size_t(g) * cpg) * hw;
  const double mean = stats[size_t(blockIdx.x) * 2], rstd = stats[size_t(blockIdx.x) * 2 + 1];
  double s1 = 0, s2 = 0;
  for (int ch = 0; ch < cpg; ++ch) {
    const int cc = g * cpg + ch;
    const size_t o = off + size_t(ch) * hw;
    double dg = 0, db = 0;
    for (int i = threadIdx.x; i < hw; i += blockDim.x) {
      const double xhat = (x[o + i] - mean) * rstd, d = dy[o + i];
      dg += d * xhat;
      db += d;
      s1 += d * gamma[cc];
      s2 += d * gamma[cc] * xhat;
    }
    dg = block_sum(dg, shared);
    db = block_sum(db, shared);
    if (threadIdx.x == 0) {
      pg[size_t(b) * c + cc] = float(dg);
      pb[size_t(b) * c + cc] = float(db);
    }
  }
  const double m1 = block_sum(s1, shared) / double(len), m2 = block_sum(s2, shared) / double(len);
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const int cc = g * cpg + int(i / hw);
    const double xhat = (x[off + i] - mean) * rstd;
    dx[off + i] = float(rstd * (double(dy[off + i]) * gamma[cc] - m1 - xhat * m2));
  }
}


// The plan for `s`, made on first use.
ConvPlan& plan_for(CudaBackend::State& st, const ConvShape& s) {
  if (st.dnn == nullptr) {
    CHECK_CUDNN(cudnnCreate(&st.dnn));
    CHECK_CUDNN(cudnnSetStream(st.dnn, st.stream));
    st.plans.reset(new ConvPlans());
  }
  const ConvPlans::Key key{s.n, s.c, s.h, s.w, s.k, s.r, s.s, s.stride, s.pad};
  auto it = st.plans->by_shape.find(key);
  if (it != st.plans->by_shape.end()) return *it->second;
  auto p = std::make_unique<ConvPlan>();
  CHECK_CUDNN(cudnnCreateTensorDescriptor(&p->x));
  CHECK_CUDNN(cudnnCreateTensorDescriptor(&p->y));
  CHECK_CUDNN(cudnnCreateFilterDescriptor(&p->w));
  CHECK_CUDNN(cudnnCreateConvolutionDescriptor(&p->conv));
  CHECK_CUDNN(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, s.n, s.c, s.h, s.w));
  CHECK_CUDNN(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, s.n, s.k, s.out_h(), s.out_w()));
  CHECK_CUDNN(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, s.k, s.c, s.r, s.s));
  CHECK_CUDNN(cudnnSetConvolution2dDescriptor(p->conv, s.pad, s.pad, s.stride, s.stride, 1, 1,
                                              CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
  CHECK_CUDNN(cudnnSetConvolutionMathType(p->conv, CUDNN_FMA_MATH));
  int n = 0;
  cudnnConvolutionFwdAlgoPerf_t fwd[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
  CHECK_CUDNN(cudnnGetConvolutionForwardAlgorithm_v7(st.dnn, p->x, p->w, p->conv, p->y,
                                                     CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, fwd));
  const auto f = pick(fwd, n, st.deterministic, "forward", s);
  cudnnConvolutionBwdDataAlgoPerf_t bd[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
  CHECK_CUDNN(cudnnGetConvolutionBackwardDataAlgorithm_v7(st.dnn, p->w, p->y, p->conv, p->x,
                                                          CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, bd));
  const auto d = pick(bd, n, st.deterministic, "backward-data", s);
  cudnnConvolutionBwdFilterAlgoPerf_t bf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
  CHECK_CUDNN(cudnnGetConvolutionBackwardFilterAlgorithm_v7(st.dnn, p->x, p->y, p->conv, p->w,
                                                            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, bf));
  const auto w = pick(bf, n, st.deterministic, "backward-filter", s);
  p->fwd = f.algo;
  p->bwd_data = d.algo;
  p->bwd_filter = w.algo;
  p->workspace = std::max({f.memory, d.memory, w.memory});
  // Grown here, once per new shape, never inside a steady-state step; the old
  // allocation stays valid for graphs recorded with it.
  st.workspace.reserve(p->workspace);
  return *st.plans->by_shape.emplace(key, std::move(p)).first->second;
}

}  // namespace

void CudaBackend::conv2d_forward(const ConvShape& s, const float* x, const float* w, float* y) {
  ConvPlan& p = plan_for(*m_state, s);
  const float one = 1.0f, zero = 0.0f;
  CHECK_CUDNN(cudnnConvolutionForward(m_state->dnn, &one, p.x, x, p.w, w, p.conv, p.fwd, m_state->workspace.ptr,
                                      m_state->workspace.bytes, &zero, p.y, y));
}

void CudaBackend::conv2d_backward_data(const ConvShape& s, const float* dy, const float* w, float* dx) {
  ConvPlan& p = plan_for(*m_state, s);
  const float one = 1.0f, zero = 0.0f;
  CHECK_CUDNN(cudnnConvolutionBackwardData(m_state->dnn, &one, p.w, w, p.y, dy, p.conv, p.bwd_data,
                                           m_state->workspace.ptr, m_state->workspace.bytes, &zero, p.x, dx));
}

void CudaBackend::conv2d_backward_filter(const ConvShape& s, const float* x, const float* dy, float* dw) {
  ConvPlan& p = plan_for(*m_state, s);
  const float one = 1.0f;  // beta = 1: parameter gradients accumulate
  CHECK_CUDNN(cudnnConvolutionBackwardFilter(m_state->dnn, &one, p.x, x, p.y, dy, p.conv, p.bwd_filter,
                                             m_state->workspace.ptr, m_state->workspace.bytes, &one, p.w, dw));
}

void CudaBackend::channel_bias_act_forward(Activation act, int n, int c, int hw, const float* bias, float* pre,
                                           float* out) {
  const size_t total = size_t(n) * c * hw;
  channel_bias_act_fwd_kernel<<<blocks_for(total), kThreads, 0, m_state->stream>>>(act_code(act), total, c, hw, bias,
                                                                                    pre, out);
  CHECK_LAUNCH(channel_bias_act_fwd_kernel);
}

void CudaBackend::channel_bias_act_backward(Activation act, int n, int c, int hw, const float* pre, const float* out,
                                            const float* dout, float* dpre, float* db) {
  activation_backward(act, size_t(n) * c * hw, pre, out, dout, dpre);
  float* part = partials(*m_state, size_t(n) * c);
  plane_sum_kernel<<<n * c, kThreads, 0, m_state->stream>>>(hw, dpre, part);
  CHECK_LAUNCH(plane_sum_kernel);
  sum_rows_into(*m_state, n, c, part, db);  // over samples
}

void CudaBackend::activation_forward(Activation act, size_t n, const float* pre, float* out) {
  activation_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(act_code(act), n, pre, out);
  CHECK_LAUNCH(activation_kernel);
}

void CudaBackend::activation_backward(Activation act, size_t n, const float* pre, const float* out, const float* dout,
                                      float* dpre) {
  activation_bwd_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(act_code(act), n, pre, out, dout, dpre);
  CHECK_LAUNCH(activation_bwd_kernel);
}

void CudaBackend::group_norm_forward(int n, int c, int hw, int groups, float eps, const float* x, const float* gamma,
                                     const float* beta, float* y, float* stats) {
  if (groups < 1 || c % groups != 0) throw internal_error("group_norm_forward: channels must divide into groups");
  group_norm_fwd_kernel<<<n * groups, kThreads, 0, m_state->stream>>>(c, hw, groups, eps, x, gamma, beta, y, stats);
  CHECK_LAUNCH(group_norm_fwd_kernel);
}

void CudaBackend::group_norm_backward(int n, int c, int hw, int groups, const float* x, const float* gamma,
                                      const float* stats, const float* dy, float* dx, float* dgamma, float* dbeta) {
  float* part = partials(*m_state, 2 * size_t(n) * c);
  float* pg = part;
  float* pb = part + size_t(n) * c;
  group_norm_bwd_kernel<<<n * groups, kThreads, 0, m_state->stream>>>(c, hw, groups, x, gamma, stats, dy, dx, pg, pb);
  CHECK_LAUNCH(group_norm_bwd_kernel);
  sum_rows_into(*m_state, n, c, pg, dgamma);  // over samples
  sum_rows_into(*m_state, n, c, pb, dbeta);
}

}  // namespace elbo
