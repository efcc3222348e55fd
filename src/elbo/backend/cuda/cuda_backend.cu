// CUDA backend kernels. Each kernel mirrors one CPU op (cpu/cpu_backend.cpp) with
// the same formulas, so the CPU backend is the reference in the parity tests.
#include <algorithm>
#include <cmath>
#include <string>

#include "elbo/backend/cuda/cuda_internal.hpp"
#include "elbo/backend/dlm_math.hpp"

namespace elbo {

namespace {

using cuda_detail::act_code;
using cuda_detail::blocks_for;
using cuda_detail::sigmoid_f;
using cuda_detail::softplus_f;
using cuda_detail::kThreads;
constexpr double kLog2Pi = 1.8378770664093454835606594728112;


__global__ void fill_kernel(float* p, float v, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}

__global__ void bias_act_fwd_kernel(int act, int rows, int cols, const float* bias, float* pre, float* out) {
  size_t n = size_t(rows) * cols;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float p = pre[i] + bias[i % cols];
    pre[i] = p;
    out[i] = cuda_detail::activate(act, p);
  }
}

__global__ void normal_kernel(uint64_t seed, uint32_t stream, uint32_t step, uint64_t first_item, int rows, int cols,
                              float* out) {
  int blocks_per_row = (cols + 3) / 4;
  size_t n = size_t(rows) * blocks_per_row;
  for (size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x; t < n; t += size_t(gridDim.x) * blockDim.x) {
    int r = static_cast<int>(t / blocks_per_row), jb = static_cast<int>(t % blocks_per_row);
    uint32_t item = static_cast<uint32_t>(first_item + uint64_t(r));
    Philox4 blk = philox_block(seed, static_cast<RngStream>(stream), step, item, static_cast<uint32_t>(jb));
    float* o = out + size_t(r) * cols;
    for (int pair = 0; pair < 2; ++pair) {
      // Box-Muller in double, exactly as the CPU backend, so both draw the same eps.
      double u1 = u01_open0(blk.v[2 * pair]), u2 = u01_open0(blk.v[2 * pair + 1]);
      double rad = sqrt(-2.0 * log(u1)), ang = 6.283185307179586476925286766559 * u2;
      int j0 = 4 * jb + 2 * pair;
      if (j0 < cols) o[j0] = static_cast<float>(rad * cos(ang));
      if (j0 + 1 < cols) o[j0 + 1] = static_cast<float>(rad * sin(ang));
    }
  }
}

__global__ void posterior_fwd_kernel(int rows, int L, const float* mulv, const float* eps, float* z, float* kl) {
  int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* mu = mulv + size_t(r) * 2 * L;
  const float* lv = mu + L;
  float acc = 0.0f;
  for (int j = 0; j < L; ++j) {
    float ev = expf(lv[j]);
    z[size_t(r) * L + j] = mu[j] + sqrtf(ev) * eps[size_t(r) * L + j];
    acc += 1.0f + lv[j] - mu[j] * mu[j] - ev;
  }
  kl[r] = -0.5f * acc;
}

__global__ void posterior_bwd_kernel(int rows, int L, const float* mulv, const float* eps, const float* dz,
                                     const float* kl_w, float* dmulv) {
  size_t n = size_t(rows) * L;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    size_t r = i / L, j = i % L;
    const float mu = mulv[r * 2 * L + j], lv = mulv[r * 2 * L + L + j];
    float ev = expf(lv);
    const float w = kl_w[j];
    dmulv[r * 2 * L + j] = dz[i] + w * mu;
    dmulv[r * 2 * L + L + j] = dz[i] * eps[i] * 0.5f * sqrtf(ev) + w * 0.5f * (ev - 1.0f);
  }
}

__global__ void posterior_ratio_kernel(int rows, int L, const float* mulv, const float* eps, const float* z,
                                       float* out) {
  int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  double acc = 0.0;
  for (int j = 0; j < L; ++j) {
    double e = eps[size_t(r) * L + j], zz = z[size_t(r) * L + j], lv = mulv[size_t(r) * 2 * L + L + j];
    acc += -0.5 * (e * e + lv) + 0.5 * zz * zz;
  }
  out[r] = static_cast<float>(acc);
}

__global__ void repeat_rows_kernel(int rows, int cols, int k, const float* in, float* out) {
  size_t n = size_t(rows) * k * cols;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    size_t row = i / cols, c = i % cols;
    out[i] = in[(row / k) * cols + c];
  }
}

// One thread per sample (row r*k + i), as posterior_fwd_kernel.
__global__ void iw_posterior_fwd_kernel(int rows, int k, int L, const float* mulv, const float* eps, float* z,
                                        float* log_ratio) {
  const size_t n = size_t(rows) * k;
  for (size_t row = blockIdx.x * size_t(blockDim.x) + threadIdx.x; row < n; row += size_t(gridDim.x) * blockDim.x) {
    const float* mu = mulv + (row / k) * 2 * L;
    const float* lv = mu + L;
    const float* e = eps + row * L;
    float* zr = z + row * L;
    float acc = 0.0f;
    for (int j = 0; j < L; ++j) {
      zr[j] = mu[j] + expf(0.5f * lv[j]) * e[j];
      acc += 0.5f * (zr[j] * zr[j] - e[j] * e[j] - lv[j]);
    }
    log_ratio[row] = acc;
  }
}

// One thread per input: its k samples in order, as the CPU loop (k is small).
__global__ void iw_weights_kernel(int rows, int k, float beta, const float* nll, const float* log_ratio, float* bound,
                                  float* weights) {
  for (size_t r = blockIdx.x * size_t(blockDim.x) + threadIdx.x; r < size_t(rows);
       r += size_t(gridDim.x) * blockDim.x) {
    const size_t o = r * k;
    float top = -INFINITY;
    for (int i = 0; i < k; ++i) top = fmaxf(top, -(nll[o + i] + beta * log_ratio[o + i]));
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) {
      weights[o + i] = expf(-(nll[o + i] + beta * log_ratio[o + i]) - top);
      sum += weights[o + i];
    }
    for (int i = 0; i < k; ++i) weights[o + i] /= sum;
    bound[r] = -(top + logf(sum / static_cast<float>(k)));
  }
}

__global__ void scale_rows_kernel(int rows, int cols, const float* row_scale, float s, float* x) {
  size_t n = size_t(rows) * cols;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] *= s * row_scale[i / cols];
}

// One thread per (input, latent dimension): the sum over its k samples in order.
__global__ void iw_posterior_bwd_kernel(int rows, int k, int L, const float* mulv, const float* eps, const float* z,
                                        const float* dz, const float* weights, float s_beta, bool dreg, float* dmulv) {
  const size_t n = size_t(rows) * L;
  for (size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x; t < n; t += size_t(gridDim.x) * blockDim.x) {
    const size_t r = t / L, j = t % L;
    const float sd = expf(0.5f * mulv[r * 2 * L + L + j]);
    float dmu = 0.0f, dlv = 0.0f;
    for (int i = 0; i < k; ++i) {
      const size_t row = r * k + i;
      const float w = weights[row], e = eps[row * L + j], zz = z[row * L + j], g = dz[row * L + j];
      const float a = dreg ? w * g + s_beta * w * w * (zz - e / sd) : g + s_beta * w * zz;
      dmu += a;
      dlv += a * e * 0.5f * sd;
      if (!dreg) dlv -= s_beta * w * 0.5f;
    }
    dmulv[r * 2 * L + j] = dmu;
    dmulv[r * 2 * L + L + j] = dlv;
  }
}

// One block per row: per-pixel terms summed in shared memory.
__global__ void likelihood_fwd_kernel(int lik, float sigma, int dim, const float* out, const float* x, float* nll) {
  __shared__ float partial[kThreads];
  const int r = blockIdx.x;
  const int ld = lik == 2 ? 2 * dim : dim;
  const float* o = out + size_t(r) * ld;
  const float* xr = x + size_t(r) * dim;
  float acc = 0.0f;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    if (lik == 0) {
      acc += softplus_f(o[d]) - xr[d] * o[d];
    } else if (lik == 1) {
      float diff = xr[d] - o[d];
      acc += diff * diff;
    } else {
      float diff = xr[d] - o[d], lv = o[dim + d];
      acc += diff * diff * expf(-lv) + lv;
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float total = partial[0];
    if (lik == 1) total = 0.5f * (total / (sigma * sigma) + dim * (float(kLog2Pi) + 2.0f * logf(sigma)));
    else if (lik == 2) total = 0.5f * (total + dim * float(kLog2Pi));
    nll[r] = total;
  }
}

__global__ void likelihood_bwd_kernel(int lik, float sigma, int rows, int dim, const float* out, const float* x,
                                      float w, float* dout) {
  size_t n = size_t(rows) * dim;
  const int ld = lik == 2 ? 2 * dim : dim;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    size_t r = i / dim, d = i % dim;
    const float o = out[r * ld + d], xv = x[i];
    if (lik == 0) {
      dout[r * ld + d] = w * (sigmoid_f(o) - xv);
    } else if (lik == 1) {
      dout[r * ld + d] = w / (sigma * sigma) * (o - xv);
    } else {
      float diff = xv - o, prec = expf(-out[r * ld + dim + d]);
      dout[r * ld + d] = -w * diff * prec;
      dout[r * ld + dim + d] = w * 0.5f * (1.0f - diff * diff * prec);
    }
  }
}

__global__ void likelihood_mean_kernel(int lik, int rows, int dim, const float* out, float* mean) {
  size_t n = size_t(rows) * dim;
  const int ld = lik == 2 ? 2 * dim : dim;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float o = out[(i / dim) * ld + i % dim];
    mean[i] = lik == 0 ? sigmoid_f(o) : o;
  }
}

// The discretized logistic mixture, with the per-pixel math of dlm_math.hpp (shared
// with the CPU op). Forward: one block per row, the pixels' -log P summed in shared memory.
__global__ void dlm_fwd_kernel(DlmShape s, const float* out, const float* x, float* nll) {
  __shared__ float partial[kThreads];
  const int r = blockIdx.x;
  const float* o = out + size_t(r) * s.out_width();
  const float* xr = x + size_t(r) * s.dim();
  float acc = 0.0f;
  for (int p = threadIdx.x; p < s.hw; p += blockDim.x) acc -= dlm::Pixel<float>(s, o + p, xr + p).log_prob();
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) partial[threadIdx.x] += partial[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) nll[r] = partial[0];
}

// One thread per pixel: it writes all of that pixel's K * groups output gradients.
__global__ void dlm_bwd_kernel(DlmShape s, int rows, const float* out, const float* x, float w, float* dout) {
  const size_t n = size_t(rows) * s.hw;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / s.hw, p = i % s.hw;
    const size_t ro = r * s.out_width() + p;
    dlm::Pixel<float>(s, out + ro, x + r * s.dim() + p).backward(w, dout + ro);
  }
}

__global__ void dlm_mean_kernel(DlmShape s, int rows, const float* out, float* mean) {
  const size_t n = size_t(rows) * s.hw;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / s.hw, p = i % s.hw;
    dlm::Pixel<float>(s, out + r * s.out_width() + p, nullptr).mean_pixel(mean + r * s.dim() + p);
  }
}

__global__ void adam_kernel(size_t n, float* p, const float* g, float* m, float* v, float lr_bc1, float inv_sqrt_bc2,
                            float b1, float b2, float eps, float wd, float decay, int decoupled) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float gi = g[i];
    if (decoupled) p[i] *= decay;
    else gi += wd * p[i];
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr_bc1 * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
  }
}

constexpr unsigned kSumBlocks = 1024;

// Sum of squares in two fixed-order passes (no atomics), so a GPU run repeats bit for
// bit even where the norm feeds gradient clipping: per-block partials, then one block
// adds them in a fixed tree into partial[kSumBlocks].
__global__ void sum_squares_kernel(size_t n, const float* x, double* partial_out) {
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    acc += double(x[i]) * x[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial_out[blockIdx.x] = partial[0];
}

__global__ void sum_partials_kernel(unsigned blocks, double* partials) {
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (unsigned i = threadIdx.x; i < blocks; i += blockDim.x) acc += partials[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[kSumBlocks] = partial[0];
}

__global__ void scale_kernel(size_t n, float s, float* x) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) x[i] *= s;
}

// y = a x + b y with each product rounded (__fmul_rn is never contracted into an FMA):
// the same bits as the CPU's loop.
__global__ void axpby_kernel(size_t n, float a, const float* x, float b, float* y) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] = __fadd_rn(__fmul_rn(a, x[i]), __fmul_rn(b, y[i]));
}

int lik_code(Likelihood l) {
  ELBO_ASSERT(l != Likelihood::DiscretizedLogisticMixture, "the discretized logistic mixture has the dlm_* ops");
  return l == Likelihood::Bernoulli ? 0 : l == Likelihood::GaussianFixed ? 1 : 2;
}

}  // namespace

bool GrowingBuffer::reserve(size_t need) {
  if (need <= bytes) return false;
  const size_t grown = std::max(need, 2 * bytes);
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, grown));
  if (ptr != nullptr) {
    retired.push_back(ptr);  // a recorded graph may still point into it
    retired_bytes += bytes;
  }
  ptr = p;
  bytes = grown;
  return true;
}

size_t GrowingBuffer::held() const { return bytes + retired_bytes; }

GrowingBuffer::~GrowingBuffer() {
  // cudaFree waits for the device; failures here are not actionable.
  for (void* p : retired) cudaFree(p);
  if (ptr != nullptr) cudaFree(ptr);
}

namespace cuda_detail {

float* partials(CudaBackend::State& st, size_t floats) {
  st.partials.reserve(floats * sizeof(float));
  return static_cast<float*>(st.partials.ptr);
}

void sum_rows_into(CudaBackend::State& st, int rows, int cols, const float* d, float* out) {
  if (rows == 0 || cols == 0) return;
  if (st.ones.reserve(size_t(rows) * sizeof(float))) {
    const size_t n = st.ones.bytes / sizeof(float);
    fill_kernel<<<blocks_for(n), kThreads, 0, st.stream>>>(static_cast<float*>(st.ones.ptr), 1.0f, n);
    CHECK_LAUNCH(fill_kernel);
  }
  // Row-major d (rows x cols) is the column-major cols x rows matrix with ld = cols;
  // times ones(rows) it gives the column sums; beta = 1 accumulates into out.
  const float one = 1.0f;
  CHECK_CUBLAS(cublasSgemv(st.blas, CUBLAS_OP_N, cols, rows, &one, d, cols, static_cast<const float*>(st.ones.ptr), 1,
                           &one, out, 1));
}

}  // namespace cuda_detail


CudaBackend::CudaBackend(int device) : m_state(std::make_unique<State>()) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();
    throw usage_error("CUDA device " + std::to_string(device) + " is not available (" + std::to_string(count) +
                      " device(s) visible)");
  }
  m_state->device = device;
  CHECK_CUDA(cudaSetDevice(device));
  CHECK_CUDA(cudaStreamCreateWithFlags(&m_state->stream, cudaStreamNonBlocking));
  CHECK_CUBLAS(cublasCreate(&m_state->blas));
  CHECK_CUBLAS(cublasSetStream(m_state->blas, m_state->stream));
  // Full FP32 GEMMs: the parity tests hold the GPU to the CPU reference.
  CHECK_CUBLAS(cublasSetMathMode(m_state->blas, CUBLAS_DEFAULT_MATH));
  CHECK_CUDA(cudaMalloc(&m_state->scratch, (kSumBlocks + 1) * sizeof(double)));
  // A workspace of its own (32 MiB, NVIDIA's advice for Hopper) keeps cuBLAS from
  // allocating inside a graph capture.
  constexpr size_t kBlasWorkspace = size_t(32) << 20;
  CHECK_CUDA(cudaMalloc(&m_state->blas_workspace, kBlasWorkspace));
  CHECK_CUBLAS(cublasSetWorkspace(m_state->blas, m_state->blas_workspace, kBlasWorkspace));
  m_state->blas_workspace_bytes = kBlasWorkspace;
  CHECK_CUBLAS(cublasLtCreate(&m_state->lt));
}

namespace {

class CudaGraph final : public CapturedWork {
 public:
  CudaGraph(cudaStream_t stream, cudaGraphExec_t exec) : m_stream(stream), m_exec(exec) {}
  ~CudaGraph() override { cudaGraphExecDestroy(m_exec); }
  void launch() override { CHECK_CUDA(cudaGraphLaunch(m_exec, m_stream)); }

 private:
  cudaStream_t m_stream;
  cudaGraphExec_t m_exec;
};

}  // namespace

std::unique_ptr<CapturedWork> CudaBackend::capture(std::function<void()> work) {
  cudaStream_t st = m_state->stream;
  // Thread-local mode: the checkpoint writer thread's host work cannot invalidate it.
  CHECK_CUDA(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  try {
    work();
  } catch (...) {
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(st, &partial);  // leave the stream usable, then report the first error
    if (partial != nullptr) cudaGraphDestroy(partial);
    throw;
  }
  cudaGraph_t graph = nullptr;
  CHECK_CUDA(cudaStreamEndCapture(st, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t rc = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (rc != cudaSuccess) cuda_failed("cudaGraphInstantiate(&exec, graph, 0)", __FILE__, __LINE__, cudaGetErrorString(rc));
  return std::make_unique<CudaGraph>(st, exec);
}

CudaBackend::~CudaBackend() = default;  // State::~State releases the handles and memory

CudaBackend::State::~State() {
  // Destructors only release; failures here are not actionable. The growing buffers
  // are members and go after this body.
  plans.reset();
  linear_plans.reset();
  if (lt != nullptr) cublasLtDestroy(lt);
  if (dnn != nullptr) cudnnDestroy(dnn);
  if (scratch != nullptr) cudaFree(scratch);
  if (blas_workspace != nullptr) cudaFree(blas_workspace);
  if (blas != nullptr) cublasDestroy(blas);
  if (stream != nullptr) cudaStreamDestroy(stream);
}

float* CudaBackend::allocate(size_t n) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(float)));
  return static_cast<float*>(p);
}

void CudaBackend::deallocate(float* p) noexcept { cudaFree(p); }

void CudaBackend::upload(float* dst, const float* host, size_t n) {
  CHECK_CUDA(cudaMemcpyAsync(dst, host, n * sizeof(float), cudaMemcpyHostToDevice, m_state->stream));
  // The host buffer may be reused as soon as we return.
  CHECK_CUDA(cudaStreamSynchronize(m_state->stream));
}

void CudaBackend::upload_async(float* dst, const float* host, size_t n) {
  // From pinned memory this is a true DMA in stream order; no wait here.
  CHECK_CUDA(cudaMemcpyAsync(dst, host, n * sizeof(float), cudaMemcpyHostToDevice, m_state->stream));
}

void CudaBackend::download_async(float* host, const float* src, size_t n) {
  CHECK_CUDA(cudaMemcpyAsync(host, src, n * sizeof(float), cudaMemcpyDeviceToHost, m_state->stream));
}

void CudaBackend::download(float* host, const float* src, size_t n) {
  CHECK_CUDA(cudaMemcpyAsync(host, src, n * sizeof(float), cudaMemcpyDeviceToHost, m_state->stream));
  CHECK_CUDA(cudaStreamSynchronize(m_state->stream));
}

void CudaBackend::fill(float* dst, float value, size_t n) {
  fill_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(dst, value, n);
  CHECK_LAUNCH(fill_kernel);
}

void CudaBackend::synchronize() { CHECK_CUDA(cudaStreamSynchronize(m_state->stream)); }

void* CudaBackend::allocate_host(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMallocHost(&p, std::max<size_t>(bytes, 1)));
  return p;
}

void CudaBackend::free_host(void* p) noexcept { cudaFreeHost(p); }

void* CudaBackend::stream_handle() const { return m_state->stream; }

int CudaBackend::device_ordinal() const { return m_state->device; }

void CudaBackend::set_deterministic(bool deterministic) { m_state->deterministic = deterministic; }

size_t CudaBackend::scratch_bytes() const {
  return m_state->workspace.held() + m_state->partials.held() + m_state->ones.held();
}

void CudaBackend::gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  CHECK_CUBLAS(cublasSgemm(m_state->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                           n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc));
}

void CudaBackend::bias_act_forward(Activation act, int rows, int cols, const float* bias, float* pre, float* out) {
  bias_act_fwd_kernel<<<blocks_for(size_t(rows) * cols), kThreads, 0, m_state->stream>>>(act_code(act), rows, cols,
                                                                                          bias, pre, out);
  CHECK_LAUNCH(bias_act_fwd_kernel);
}

void CudaBackend::bias_act_backward(Activation act, int rows, int cols, const float* pre, const float* out,
                                    const float* dout, float* dpre, float* db) {
  activation_backward(act, size_t(rows) * cols, pre, out, dout, dpre);
  cuda_detail::sum_rows_into(*m_state, rows, cols, dpre, db);
}

void CudaBackend::normal(uint64_t seed, RngStream stream, uint32_t step, uint64_t first_item, int rows, int cols,
                         float* out) {
  size_t n = size_t(rows) * ((cols + 3) / 4);
  normal_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(seed, static_cast<uint32_t>(stream), step,
                                                                 first_item, rows, cols, out);
  CHECK_LAUNCH(normal_kernel);
}

void CudaBackend::posterior_forward(int rows, int latent, const float* mulv, const float* eps, float* z, float* kl) {
  posterior_fwd_kernel<<<blocks_for(rows), kThreads, 0, m_state->stream>>>(rows, latent, mulv, eps, z, kl);
  CHECK_LAUNCH(posterior_fwd_kernel);
}

void CudaBackend::posterior_backward(int rows, int latent, const float* mulv, const float* eps, const float* dz,
                                     const float* kl_weights, float* dmulv) {
  posterior_bwd_kernel<<<blocks_for(size_t(rows) * latent), kThreads, 0, m_state->stream>>>(rows, latent, mulv, eps,
                                                                                            dz, kl_weights, dmulv);
  CHECK_LAUNCH(posterior_bwd_kernel);
}

void CudaBackend::posterior_log_ratio(int rows, int latent, const float* mulv, const float* eps, const float* z,
                                      float* out) {
  posterior_ratio_kernel<<<blocks_for(rows), kThreads, 0, m_state->stream>>>(rows, latent, mulv, eps, z, out);
  CHECK_LAUNCH(posterior_ratio_kernel);
}

void CudaBackend::repeat_rows(int rows, int cols, int k, const float* in, float* out) {
  const size_t n = size_t(rows) * k * cols;
  if (n == 0) return;
  repeat_rows_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(rows, cols, k, in, out);
  CHECK_LAUNCH(repeat_rows_kernel);
}

void CudaBackend::iw_posterior_forward(int rows, int k, int latent, const float* mulv, const float* eps, float* z,
                                       float* log_ratio) {
  const size_t n = size_t(rows) * k;
  if (n == 0) return;
  iw_posterior_fwd_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(rows, k, latent, mulv, eps, z, log_ratio);
  CHECK_LAUNCH(iw_posterior_fwd_kernel);
}

void CudaBackend::iw_weights(int rows, int k, float beta, const float* nll, const float* log_ratio, float* bound,
                             float* weights) {
  if (rows == 0) return;
  iw_weights_kernel<<<blocks_for(rows), kThreads, 0, m_state->stream>>>(rows, k, beta, nll, log_ratio, bound, weights);
  CHECK_LAUNCH(iw_weights_kernel);
}

void CudaBackend::scale_rows(int rows, int cols, const float* row_scale, float s, float* x) {
  const size_t n = size_t(rows) * cols;
  if (n == 0) return;
  scale_rows_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(rows, cols, row_scale, s, x);
  CHECK_LAUNCH(scale_rows_kernel);
}

void CudaBackend::iw_posterior_backward(int rows, int k, int latent, const float* mulv, const float* eps,
                                        const float* z, const float* dz, const float* weights, float s_beta, bool dreg,
                                        float* dmulv) {
  const size_t n = size_t(rows) * latent;
  if (n == 0) return;
  iw_posterior_bwd_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(rows, k, latent, mulv, eps, z, dz, weights,
                                                                           s_beta, dreg, dmulv);
  CHECK_LAUNCH(iw_posterior_bwd_kernel);
}

void CudaBackend::likelihood_forward(Likelihood lik, float sigma, int rows, int dim, const float* out, const float* x,
                                     float* nll) {
  if (rows == 0) return;
  likelihood_fwd_kernel<<<rows, kThreads, 0, m_state->stream>>>(lik_code(lik), sigma, dim, out, x, nll);
  CHECK_LAUNCH(likelihood_fwd_kernel);
}

void CudaBackend::likelihood_backward(Likelihood lik, float sigma, int rows, int dim, const float* out,
                                      const float* x, float weight, float* dout) {
  likelihood_bwd_kernel<<<blocks_for(size_t(rows) * dim), kThreads, 0, m_state->stream>>>(lik_code(lik), sigma, rows,
                                                                                          dim, out, x, weight, dout);
  CHECK_LAUNCH(likelihood_bwd_kernel);
}

void CudaBackend::likelihood_mean(Likelihood lik, int rows, int dim, const float* out, float* mean) {
  likelihood_mean_kernel<<<blocks_for(size_t(rows) * dim), kThreads, 0, m_state->stream>>>(lik_code(lik), rows, dim,
                                                                                           out, mean);
  CHECK_LAUNCH(likelihood_mean_kernel);
}

void CudaBackend::dlm_forward(const DlmShape& s, int rows, const float* out, const float* x, float* nll) {
  if (rows == 0) return;
  dlm_fwd_kernel<<<rows, kThreads, 0, m_state->stream>>>(s, out, x, nll);
  CHECK_LAUNCH(dlm_fwd_kernel);
}

void CudaBackend::dlm_backward(const DlmShape& s, int rows, const float* out, const float* x, float weight,
                               float* dout) {
  if (rows == 0) return;
  dlm_bwd_kernel<<<blocks_for(size_t(rows) * s.hw), kThreads, 0, m_state->stream>>>(s, rows, out, x, weight, dout);
  CHECK_LAUNCH(dlm_bwd_kernel);
}

void CudaBackend::dlm_mean(const DlmShape& s, int rows, const float* out, float* mean) {
  if (rows == 0) return;
  dlm_mean_kernel<<<blocks_for(size_t(rows) * s.hw), kThreads, 0, m_state->stream>>>(s, rows, out, mean);
  CHECK_LAUNCH(dlm_mean_kernel);
}

void CudaBackend::adam_step(const AdamArgs& a, size_t n, float* params, const float* grads, float* m, float* v) {
  const double bc1 = 1.0 - std::pow(a.beta1, double(a.step)), bc2 = 1.0 - std::pow(a.beta2, double(a.step));
  adam_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(
      n, params, grads, m, v, float(a.lr / bc1), float(1.0 / std::sqrt(bc2)), float(a.beta1), float(a.beta2),
      float(a.eps), float(a.weight_decay), float(1.0 - a.lr * a.weight_decay), a.decoupled ? 1 : 0);
  CHECK_LAUNCH(adam_kernel);
}

void CudaBackend::sum_squares_async(size_t n, const float* x, double* host) {
  const unsigned blocks = std::min<unsigned>(blocks_for(n), kSumBlocks);
  sum_squares_kernel<<<blocks, kThreads, 0, m_state->stream>>>(n, x, m_state->scratch);
  CHECK_LAUNCH(sum_squares_kernel);
  sum_partials_kernel<<<1, kThreads, 0, m_state->stream>>>(blocks, m_state->scratch);
  CHECK_LAUNCH(sum_partials_kernel);
  CHECK_CUDA(cudaMemcpyAsync(host, m_state->scratch + kSumBlocks, sizeof(double), cudaMemcpyDeviceToHost,
                             m_state->stream));
}

double CudaBackend::sum_squares(size_t n, const float* x) {
  double out = 0;
  sum_squares_async(n, x, &out);  // pageable target: the copy completes before the wait below returns
  CHECK_CUDA(cudaStreamSynchronize(m_state->stream));
  return out;
}

void CudaBackend::scale(size_t n, float s, float* x) {
  scale_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(n, s, x);
  CHECK_LAUNCH(scale_kernel);
}

void CudaBackend::axpby(size_t n, float a, const float* x, float b, float* y) {
  axpby_kernel<<<blocks_for(n), kThreads, 0, m_state->stream>>>(n, a, x, b, y);
  CHECK_LAUNCH(axpby_kernel);
}

}  // namespace elbo
