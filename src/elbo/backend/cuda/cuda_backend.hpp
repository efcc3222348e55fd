// The CUDA backend: cuBLAS for GEMMs, fused kernels for everything else, all on
// one stream owned by the backend. Float only (double stays on the CPU reference).
// The header exposes no CUDA types so host code compiles without the toolkit.
#pragma once

#include <memory>

#include "elbo/backend/backend.hpp"

namespace elbo {

class CudaBackend final : public Backend<float> {
 public:
  // Uses `device` (a CUDA ordinal); throws a Usage error when it does not exist.
  explicit CudaBackend(int device = 0);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  DeviceKind device() const override { return DeviceKind::Cuda; }

  float* allocate(size_t n) override;
  void deallocate(float* p) noexcept override;
  void upload(float* dst, const float* host, size_t n) override;
  void download(float* host, const float* src, size_t n) override;
  void upload_async(float* dst, const float* host, size_t n) override;
  void download_async(float* host, const float* src, size_t n) override;
  void fill(float* dst, float value, size_t n) override;
  void synchronize() override;
  void* allocate_host(size_t bytes) override;  // pinned (cudaMallocHost)
  void free_host(void* p) noexcept override;

  // The stream every op of this backend is issued on, as a cudaStream_t; the NCCL
  // reducer orders its work against it with events.
  // A CUDA graph of `work`, captured from this backend's stream.
  std::unique_ptr<CapturedWork> capture(std::function<void()> work) override;
  // false: cuDNN's first-ranked algorithm even where it is not deterministic.
  void set_deterministic(bool deterministic) override;

  void* stream_handle() const;
  int device_ordinal() const;
  // Device memory held for cuDNN workspaces and reduction scratch, retired allocations
  // included (kept for recorded graphs; see GrowingBuffer in cuda_internal.hpp).
  size_t scratch_bytes() const;

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
            int ldb, float beta, float* c, int ldc) override;
  // Identity and ReLU: one cuBLASLt GEMM with the bias (and ReLU) epilogue; others: GEMM + kernel.
  void linear_forward(Activation act, int rows, int in, int out, const float* x, const float* w, const float* bias,
                      float* pre, float* y) override;
  void bias_act_forward(Activation act, int rows, int cols, const float* bias, float* pre, float* out) override;
  void bias_act_backward(Activation act, int rows, int cols, const float* pre, const float* out, const float* dout,
                         float* dpre, float* db) override;
  void conv2d_forward(const ConvShape& s, const float* x, const float* w, float* y) override;
  void conv2d_backward_data(const ConvShape& s, const float* dy, const float* w, float* dx) override;
  void conv2d_backward_filter(const ConvShape& s, const float* x, const float* dy, float* dw) override;
  void channel_bias_act_forward(Activation act, int n, int c, int hw, const float* bias, float* pre,
                                float* out) override;
  void channel_bias_act_backward(Activation act, int n, int c, int hw, const float* pre, const float* out,
                                 const float* dout, float* dpre, float* db) override;
  void activation_forward(Activation act, size_t n, const float* pre, float* out) override;
  void activation_backward(Activation act, size_t n, const float* pre, const float* out, const float* dout,
                           float* dpre) override;
  void group_norm_forward(int n, int c, int hw, int groups, float eps, const float* x, const float* gamma,
                          const float* beta, float* y, float* stats) override;
  void group_norm_backward(int n, int c, int hw, int groups, const float* x, const float* gamma, const float* stats,
                           const float* dy, float* dx, float* dgamma, float* dbeta) override;
  // The hierarchical model's kernels (cuda_hier.cu).
  void channel_copy(int n, int hw, int count, const float* src, int src_c, int src_off, float* dst, int dst_c,
                    int dst_off, bool accumulate) override;
  void avg_pool_forward(int n, int c, int h, int w, int f, const float* x, float* y) override;
  void avg_pool_backward(int n, int c, int h, int w, int f, const float* dy, float* dx) override;
  void unpool_forward(int n, int c, int h, int w, int f, const float* x, float* y) override;
  void unpool_backward(int n, int c, int h, int w, int f, const float* dy, float* dx) override;
  void gaussian_sample(int n, int zc, int hw, const float* par, size_t stride, const float* eps, size_t eps_stride,
                       float* z) override;
  void gaussian_kl_forward(int n, int zc, int hw, const float* q, size_t q_stride, const float* p, size_t p_stride,
                           const float* eps, size_t eps_stride, float* kl, float* log_ratio,
                           size_t out_stride) override;
  void gaussian_kl_backward(int n, int zc, int hw, const float* q, size_t q_stride, const float* p, size_t p_stride,
                            const float* eps, size_t eps_stride, const float* dz, const float* kl_weight, float* dq,
                            float* dp) override;
  void normal(uint64_t seed, RngStream stream, uint32_t step, uint64_t first_item, int rows, int cols,
              float* out) override;
  void posterior_forward(int rows, int latent, const float* mulv, const float* eps, float* z, float* kl) override;
  void posterior_backward(int rows, int latent, const float* mulv, const float* eps, const float* dz,
                          const float* kl_weights, float* dmulv) override;
  void posterior_log_ratio(int rows, int latent, const float* mulv, const float* eps, const float* z,
                           float* out) override;
  void repeat_rows(int rows, int cols, int k, const float* in, float* out) override;
  void iw_posterior_forward(int rows, int k, int latent, const float* mulv, const float* eps, float* z,
                            float* log_ratio) override;
  void iw_weights(int rows, int k, float beta, const float* nll, const float* log_ratio, float* bound,
                  float* weights) override;
  void scale_rows(int rows, int cols, const float* row_scale, float s, float* x) override;
  void iw_posterior_backward(int rows, int k, int latent, const float* mulv, const float* eps, const float* z,
                             const float* dz, const float* weights, float s_beta, bool dreg, float* dmulv) override;
  void likelihood_forward(Likelihood lik, float sigma, int rows, int dim, const float* out, const float* x,
                          float* nll) override;
  void likelihood_backward(Likelihood lik, float sigma, int rows, int dim, const float* out, const float* x,
                           float weight, float* dout) override;
  void likelihood_mean(Likelihood lik, int rows, int dim, const float* out, float* mean) override;
  void dlm_forward(const DlmShape& s, int rows, const float* out, const float* x, float* nll) override;
  void dlm_backward(const DlmShape& s, int rows, const float* out, const float* x, float weight, float* dout) override;
  void dlm_mean(const DlmShape& s, int rows, const float* out, float* mean) override;
  void adam_step(const AdamArgs& args, size_t n, float* params, const float* grads, float* m, float* v) override;
  double sum_squares(size_t n, const float* x) override;
  void sum_squares_async(size_t n, const float* x, double* host) override;
  void scale(size_t n, float s, float* x) override;
  void axpby(size_t n, float a, const float* x, float b, float* y) override;

 // Defined in cuda_internal.hpp, for the backend's .cu files only.
  struct State;

 private:
  std::unique_ptr<State> m_state;
};

}  // namespace elbo
