// The CPU reference backend: OpenBLAS for GEMMs, plain loops for everything else.
// Instantiated for float (training) and double (finite-difference checks).
#pragma once

#include <vector>

#include "elbo/backend/backend.hpp"

namespace elbo {

template <class T>
class CpuBackend final : public Backend<T> {
 public:
  explicit CpuBackend(int threads = 1);
  std::string name() const override { return "cpu"; }
  DeviceKind device() const override { return DeviceKind::Cpu; }

  T* allocate(size_t n) override;
  void deallocate(T* p) noexcept override;
  void upload(T* dst, const T* host, size_t n) override;
  void download(T* host, const T* src, size_t n) override;
  void fill(T* dst, T value, size_t n) override;

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
            int ldb, T beta, T* c, int ldc) override;
  void bias_act_forward(Activation act, int rows, int cols, const T* bias, T* pre, T* out) override;
  void bias_act_backward(Activation act, int rows, int cols, const T* pre, const T* out, const T* dout,
                         T* dpre, T* db) override;
  void conv2d_forward(const ConvShape& s, const T* x, const T* w, T* y) override;
  void conv2d_backward_data(const ConvShape& s, const T* dy, const T* w, T* dx) override;
  void conv2d_backward_filter(const ConvShape& s, const T* x, const T* dy, T* dw) override;
  void channel_bias_act_forward(Activation act, int n, int c, int hw, const T* bias, T* pre, T* out) override;
  void channel_bias_act_backward(Activation act, int n, int c, int hw, const T* pre, const T* out, const T* dout,
                                 T* dpre, T* db) override;
  void activation_forward(Activation act, size_t n, const T* pre, T* out) override;
  void activation_backward(Activation act, size_t n, const T* pre, const T* out, const T* dout, T* dpre) override;
  void group_norm_forward(int n, int c, int hw, int groups, T eps, const T* x, const T* gamma, const T* beta, T* y,
                          T* stats) override;
  void group_norm_backward(int n, int c, int hw, int groups, const T* x, const T* gamma, const T* stats, const T* dy,
                           T* dx, T* dgamma, T* dbeta) override;
  // The hierarchical model's ops (cpu_hier.cpp).
  void channel_copy(int n, int hw, int count, const T* src, int src_c, int src_off, T* dst, int dst_c, int dst_off,
                    bool accumulate) override;
  void avg_pool_forward(int n, int c, int h, int w, int f, const T* x, T* y) override;
  void avg_pool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) override;
  void unpool_forward(int n, int c, int h, int w, int f, const T* x, T* y) override;
  void unpool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) override;
  void gaussian_sample(int n, int zc, int hw, const T* par, size_t stride, const T* eps, size_t eps_stride,
                       T* z) override;
  void gaussian_kl_forward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p, size_t p_stride,
                           const T* eps, size_t eps_stride, T* kl, T* log_ratio, size_t out_stride) override;
  void gaussian_kl_backward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p, size_t p_stride,
                            const T* eps, size_t eps_stride, const T* dz, const T* kl_weight, T* dq, T* dp) override;
  void normal(uint64_t seed, RngStream stream, uint32_t step, uint64_t first_item, int rows, int cols,
              T* out) override;
  void posterior_forward(int rows, int latent, const T* mulv, const T* eps, T* z, T* kl) override;
  void posterior_backward(int rows, int latent, const T* mulv, const T* eps, const T* dz, const T* kl_weights,
                          T* dmulv) override;
  void posterior_log_ratio(int rows, int latent, const T* mulv, const T* eps, const T* z, T* out) override;
  void repeat_rows(int rows, int cols, int k, const T* in, T* out) override;
  void iw_posterior_forward(int rows, int k, int latent, const T* mulv, const T* eps, T* z, T* log_ratio) override;
  void iw_weights(int rows, int k, T beta, const T* nll, const T* log_ratio, T* bound, T* weights) override;
  void scale_rows(int rows, int cols, const T* row_scale, T s, T* x) override;
  void iw_posterior_backward(int rows, int k, int latent, const T* mulv, const T* eps, const T* z, const T* dz,
                             const T* weights, T s_beta, bool dreg, T* dmulv) override;
  void likelihood_forward(Likelihood lik, T sigma, int rows, int dim, const T* out, const T* x,
                          T* nll) override;
  void likelihood_backward(Likelihood lik, T sigma, int rows, int dim, const T* out, const T* x, T weight,
                           T* dout) override;
  void likelihood_mean(Likelihood lik, int rows, int dim, const T* out, T* mean) override;
  void dlm_forward(const DlmShape& s, int rows, const T* out, const T* x, T* nll) override;
  void dlm_backward(const DlmShape& s, int rows, const T* out, const T* x, T weight, T* dout) override;
  void dlm_mean(const DlmShape& s, int rows, const T* out, T* mean) override;
  void adam_step(const AdamArgs& args, size_t n, T* params, const T* grads, T* m, T* v) override;
  double sum_squares(size_t n, const T* x) override;
  void scale(size_t n, T s, T* x) override;
  void axpby(size_t n, T a, const T* x, T b, T* y) override;

 private:
  // Convolution scratch (im2col columns and the GEMM's channel-major result), kept
  // between calls so steady-state steps allocate nothing.
  std::vector<T> m_cols, m_gemm;
  // Sizes the scratch for `s`; returns the samples per chunk.
  int conv_scratch(const ConvShape& s);
};

}  // namespace elbo
