// The hierarchical model's kernels, each mirroring its CPU op (cpu/cpu_hier.cpp) with
// the same formulas: channel copies, average pooling and nearest unpooling, and the
// softplus-scaled Gaussian groups (sampling, KL and log-ratio per row, KL backward).
#include "elbo/backend/cuda/cuda_internal.hpp"

namespace elbo {

namespace {

using cuda_detail::blocks_for;
using cuda_detail::kThreads;
using cuda_detail::sigmoid_f;
using cuda_detail::softplus_f;

// log softplus(x), as the CPU's log_softplus: x itself below -20.
__device__ __forceinline__ float log_softplus_f(float x) { return x < -20.0f ? x : logf(softplus_f(x)); }

// Grid-stride loops: blocks_for caps the grid, so a thread may take several elements.
__global__ void channel_copy_kernel(int n, int hw, int count, const float* src, int src_c, int src_off, float* dst,
                                    int dst_c, int dst_off, bool accumulate) {
  const size_t len = size_t(count) * hw, total = size_t(n) * len;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / len, k = i % len;
    const float v = src[(r * src_c + src_off) * hw + k];
    float* d = dst + (r * dst_c + dst_off) * hw + k;
    *d = accumulate ? *d + v : v;
  }
}

// Average pooling and nearest unpooling are each other's adjoints: two kernels, as the
// CPU's block_sums and spread. block_sums: one thread per output of (planes, oh, ow),
// scale * the sum of its f x f block of in (planes, oh*f, ow*f) in the CPU's order (no
// atomics: deterministic); avg-pool forward (1/f^2) and unpool backward (1).
__global__ void block_sums_kernel(size_t planes, int oh, int ow, int f, float scale, const float* in, float* out) {
  const int w = ow * f;
  const size_t total = planes * oh * ow;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t plane = i / (size_t(oh) * ow);
    const int k = int(i % (size_t(oh) * ow)), oi = k / ow, oj = k % ow;
    const float* ip = in + plane * oh * f * w;
    float acc = 0.0f;
    for (int a = 0; a < f; ++a)
      for (int b = 0; b < f; ++b) acc += ip[(oi * f + a) * w + oj * f + b];
    out[i] = acc * scale;
  }
}

// spread: one thread per element of out (planes, h*f, w*f) = scale * its block's value
// of in (planes, h, w); unpool forward (1) and avg-pool backward (1/f^2).
__global__ void spread_kernel(size_t planes, int h, int w, int f, float scale, const float* in, float* out) {
  const int oh = h * f, ow = w * f;
  const size_t total = planes * oh * ow;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t plane = i / (size_t(oh) * ow);
    const int k = int(i % (size_t(oh) * ow)), oi = k / ow, oj = k % ow;
    out[i] = in[plane * h * w + (oi / f) * w + oj / f] * scale;
  }
}

__global__ void gaussian_sample_kernel(int n, size_t len, const float* par, size_t stride, const float* eps,
                                       size_t eps_stride, float* z) {
  const size_t total = size_t(n) * len;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / len, k = i % len;
    const float* mu = par + r * stride;
    z[i] = mu[k] + softplus_f(mu[len + k]) * eps[r * eps_stride + k];
  }
}

// One block per row: the group's KL and log-ratio terms summed in shared memory.
__global__ void gaussian_kl_fwd_kernel(size_t len, const float* q, size_t q_stride, const float* p, size_t p_stride,
                                       const float* eps, size_t eps_stride, float* kl, float* log_ratio,
                                       size_t out_stride) {
  __shared__ float part_kl[kThreads];
  __shared__ float part_ratio[kThreads];
  const size_t r = blockIdx.x;
  const float* mq = q + r * q_stride;
  const float* mp = p + r * p_stride;
  const float* e = eps + r * eps_stride;
  float acc_kl = 0.0f, acc_ratio = 0.0f;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float rq = mq[len + i], rp = mp[len + i];
    const float sq = softplus_f(rq), sp = softplus_f(rp);
    const float log_sq = log_softplus_f(rq), log_sp = log_softplus_f(rp);
    const float d = mq[i] - mp[i];
    const float t = sq / sp, u0 = d / sp;
    acc_kl += log_sp - log_sq + 0.5f * (t * t + u0 * u0) - 0.5f;
    const float u = (mq[i] + sq * e[i] - mp[i]) / sp;
    acc_ratio += log_sp - log_sq - 0.5f * e[i] * e[i] + 0.5f * u * u;
  }
  part_kl[threadIdx.x] = acc_kl;
  part_ratio[threadIdx.x] = acc_ratio;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      part_kl[threadIdx.x] += part_kl[threadIdx.x + s];
      part_ratio[threadIdx.x] += part_ratio[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    kl[r * out_stride] = part_kl[0];
    log_ratio[r * out_stride] = part_ratio[0];
  }
}

__global__ void gaussian_kl_bwd_kernel(int n, size_t len, const float* q, size_t q_stride, const float* p,
                                       size_t p_stride, const float* eps, size_t eps_stride, const float* dz,
                                       const float* kl_weight, float* dq, float* dp) {
  const size_t total = size_t(n) * len;
  const float w = kl_weight[0];
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / len, k = i % len;
    const float* mq = q + r * q_stride;
    const float* mp = p + r * p_stride;
    const float rq = mq[len + k], rp = mp[len + k];
    const float sq = softplus_f(rq), sp = softplus_f(rp);
    const float d = mq[k] - mp[k];
    const float inv_var_p = 1.0f / (sp * sp);
    const float g = dz[i], e = eps[r * eps_stride + k];
    const float dkl_dm = d * inv_var_p;
    float* dmq = dq + r * q_stride;
    float* dmp = dp + r * p_stride;
    dmq[k] = w * dkl_dm + g;
    dmp[k] = -w * dkl_dm;
    dmq[len + k] = (w * (sq * inv_var_p - 1.0f / sq) + g * e) * sigmoid_f(rq);
    dmp[len + k] = w * (1.0f / sp - (sq * sq + d * d) * inv_var_p / sp) * sigmoid_f(rp);
  }
}

}  // namespace

void CudaBackend::channel_copy(int n, int hw, int count, const float* src, int src_c, int src_off, float* dst,
                               int dst_c, int dst_off, bool accumulate) {
  const size_t total = size_t(n) * count * hw;
  if (total == 0) return;
  channel_copy_kernel<<<blocks_for(total), kThreads, 0, m_state->stream>>>(n, hw, count, src, src_c, src_off, dst,
                                                                           dst_c, dst_off, accumulate);
  CHECK_LAUNCH(channel_copy_kernel);
}

namespace {

void launch_block_sums(cudaStream_t stream, size_t planes, int oh, int ow, int f, float scale, const float* in,
                       float* out) {
  block_sums_kernel<<<blocks_for(planes * oh * ow), kThreads, 0, stream>>>(planes, oh, ow, f, scale, in, out);
  CHECK_LAUNCH(block_sums_kernel);
}

void launch_spread(cudaStream_t stream, size_t planes, int h, int w, int f, float scale, const float* in, float* out) {
  spread_kernel<<<blocks_for(planes * h * f * w * f), kThreads, 0, stream>>>(planes, h, w, f, scale, in, out);
  CHECK_LAUNCH(spread_kernel);
}

}  // namespace

void CudaBackend::avg_pool_forward(int n, int c, int h, int w, int f, const float* x, float* y) {
  launch_block_sums(m_state->stream, size_t(n) * c, h / f, w / f, f, 1.0f / float(f * f), x, y);
}

void CudaBackend::avg_pool_backward(int n, int c, int h, int w, int f, const float* dy, float* dx) {
  launch_spread(m_state->stream, size_t(n) * c, h / f, w / f, f, 1.0f / float(f * f), dy, dx);
}

void CudaBackend::unpool_forward(int n, int c, int h, int w, int f, const float* x, float* y) {
  launch_spread(m_state->stream, size_t(n) * c, h, w, f, 1.0f, x, y);
}

void CudaBackend::unpool_backward(int n, int c, int h, int w, int f, const float* dy, float* dx) {
  launch_block_sums(m_state->stream, size_t(n) * c, h, w, f, 1.0f, dy, dx);
}

void CudaBackend::gaussian_sample(int n, int zc, int hw, const float* par, size_t stride, const float* eps,
                                  size_t eps_stride, float* z) {
  const size_t len = size_t(zc) * hw;
  gaussian_sample_kernel<<<blocks_for(n * len), kThreads, 0, m_state->stream>>>(n, len, par, stride, eps, eps_stride,
                                                                                z);
  CHECK_LAUNCH(gaussian_sample_kernel);
}

void CudaBackend::gaussian_kl_forward(int n, int zc, int hw, const float* q, size_t q_stride, const float* p,
                                      size_t p_stride, const float* eps, size_t eps_stride, float* kl, float* log_ratio,
                                      size_t out_stride) {
  if (n == 0) return;
  gaussian_kl_fwd_kernel<<<n, kThreads, 0, m_state->stream>>>(size_t(zc) * hw, q, q_stride, p, p_stride, eps,
                                                              eps_stride, kl, log_ratio, out_stride);
  CHECK_LAUNCH(gaussian_kl_fwd_kernel);
}

void CudaBackend::gaussian_kl_backward(int n, int zc, int hw, const float* q, size_t q_stride, const float* p,
                                       size_t p_stride, const float* eps, size_t eps_stride, const float* dz,
                                       const float* kl_weight, float* dq, float* dp) {
  const size_t len = size_t(zc) * hw;
  gaussian_kl_bwd_kernel<<<blocks_for(n * len), kThreads, 0, m_state->stream>>>(n, len, q, q_stride, p, p_stride, eps,
                                                                                eps_stride, dz, kl_weight, dq, dp);
  CHECK_LAUNCH(gaussian_kl_bwd_kernel);
}

}  // namespace elbo
