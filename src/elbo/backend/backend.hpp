// The op set of a replica. The model, loss and optimizer are written once against
// this interface; cpu/ (OpenBLAS + loops, the reference) and cuda/ implement it.
// Pointers passed to ops live in the backend's memory space (host for CPU, device
// for CUDA): only allocate/upload/download cross that boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "elbo/config/choices.hpp"  // Activation, Likelihood and their names
#include "elbo/util/philox.hpp"

namespace elbo {

enum class DeviceKind { Cpu, Cuda };

// Elements [begin, end) of a flat buffer: a gradient bucket, a rank's slice of the
// optimizer state.
struct FlatRange {
  size_t begin = 0, end = 0;
  size_t size() const { return end - begin; }
  // Spelled out: the .cu files are compiled as C++17, where `= default` is not allowed.
  bool operator==(const FlatRange& o) const { return begin == o.begin && end == o.end; }
};

// Everything one Adam/AdamW update needs; `step` is 1-based (bias correction).
struct AdamArgs {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  // AdamW: decay the weights directly instead of adding wd*p to g
  int64_t step = 1;
};

// A 2-D convolution over NCHW tensors with PyTorch's semantics: cross-correlation,
// weight (k, c, r, s), the same stride and zero padding in both dimensions. A
// transposed convolution is this shape read backwards (its input is dy, its output
// dx): ConvTranspose2d(cin -> cout) is ConvShape{c = cout, k = cin} on the larger
// image, with PyTorch's (cin, cout, r, s) weight as is.
struct ConvShape {
  int n = 0, c = 0, h = 0, w = 0;  // input: batch, channels, height, width
  int k = 0, r = 0, s = 0;         // output channels, kernel height and width
  int stride = 1, pad = 0;
  int out_h() const { return (h + 2 * pad - r) / stride + 1; }
  int out_w() const { return (w + 2 * pad - s) / stride + 1; }
};

// The discretized logistic mixture over 8-bit images (PixelCNN++, Salimans et al. 2017):
// x (rows, C, hw) holds pixels as byte/255; the decoder output (rows, K * groups(), hw)
// holds, per pixel, groups of K values: [logits | mean of channel c (C groups) |
// log-scale of channel c (C groups) | coefficient (c, j) for j < c (C(C-1)/2 groups,
// c-major)]. Channel c's mean is mean_c + sum_{j<c} tanh(coeff_cj) * x_j (PixelCNN++'s
// autoregressive RGB: G depends on R, B on R and G). C is 1 to kMaxChannels.
struct DlmShape {
  static constexpr int kMaxChannels = 4;
  int channels = 1, hw = 1, components = 1;
  ELBO_HD int groups() const { return 1 + 2 * channels + channels * (channels - 1) / 2; }
  ELBO_HD int out_channels() const { return components * groups(); }  // K*3 for C = 1, K*10 for C = 3
  ELBO_HD int dim() const { return channels * hw; }
  ELBO_HD size_t out_width() const { return static_cast<size_t>(out_channels()) * hw; }
};

// Work recorded once and launched again and again: a CUDA graph on the GPU (one
// launch instead of one per kernel), the work itself on the CPU. The recorded work
// reads the same buffers and the same scalar arguments at every launch.
class CapturedWork {
 public:
  virtual ~CapturedWork() = default;
  virtual void launch() = 0;
};

template <class T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DeviceKind device() const = 0;

  // --- memory ---
  virtual T* allocate(size_t n) = 0;
  virtual void deallocate(T* p) noexcept = 0;
  virtual void upload(T* dst, const T* host, size_t n) = 0;
  virtual void download(T* host, const T* src, size_t n) = 0;
  // An upload that may still be in flight on return: `host` must come from
  // allocate_host and stay unchanged until the next download or synchronize.
  virtual void upload_async(T* dst, const T* host, size_t n) { upload(dst, host, n); }
  // A download that may still be in flight on return: `host` must come from
  // allocate_host, and holds the values after the next synchronize().
  virtual void download_async(T* host, const T* src, size_t n) { download(host, src, n); }
  virtual void fill(T* dst, T value, size_t n) = 0;
  virtual void synchronize() {}
  // Host memory the device copies from and to fastest (pinned on CUDA), for staging.
  virtual void* allocate_host(size_t bytes);
  virtual void free_host(void* p) noexcept;

  // Records `work` (backend calls only: no upload, download or synchronize inside)
  // for replay; nothing runs until launch(). The default keeps `work` and runs it at
  // every launch, so `work` must own what it uses (capture values, not references
  // to locals).
  virtual std::unique_ptr<CapturedWork> capture(std::function<void()> work);

  // Whether library kernels must give the same bits every run (train.deterministic).
  // With false a backend may pick faster algorithms that reduce in a varying order
  // (cuDNN's atomics-based ones). The CPU backend is deterministic either way. Set
  // before the first op: plans made earlier keep their algorithms.
  virtual void set_deterministic(bool deterministic) { (void)deterministic; }

  // --- dense layers (all matrices row-major) ---
  // C (m x n) = alpha * op(A) * op(B) + beta * C, op(A) is m x k, op(B) is k x n.
  virtual void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
                    const T* b, int ldb, T beta, T* c, int ldc) = 0;
  // A linear layer: pre (rows x out) = x (rows x in) . w^T with w (out x in), then
  // bias_act_forward. A backend that fuses bias and activation into the GEMM (cuBLASLt
  // epilogues) may leave pre unwritten for ReLU: ReLU's backward reads only out.
  virtual void linear_forward(Activation act, int rows, int in, int out, const T* x, const T* w, const T* bias,
                              T* pre, T* y);
  // pre (rows x cols) += bias; out = act(pre). out may alias pre only for Identity.
  virtual void bias_act_forward(Activation act, int rows, int cols, const T* bias, T* pre, T* out) = 0;
  // dpre = dout * act'(pre) (written; may alias dout), db += column sums of dpre. ReLU's
  // derivative is read from out, tanh's too; softplus's from pre.
  virtual void bias_act_backward(Activation act, int rows, int cols, const T* pre, const T* out,
                                 const T* dout, T* dpre, T* db) = 0;

  // --- convolutions and per-sample normalization (NCHW) ---
  // y (n, k, oh, ow) = conv(x (n, c, h, w), w (k, c, r, s)); written.
  virtual void conv2d_forward(const ConvShape& s, const T* x, const T* w, T* y) = 0;
  // dx (n, c, h, w) from dy (n, k, oh, ow); written.
  virtual void conv2d_backward_data(const ConvShape& s, const T* dy, const T* w, T* dx) = 0;
  // dw (k, c, r, s) += the filter gradient from x and dy.
  virtual void conv2d_backward_filter(const ConvShape& s, const T* x, const T* dy, T* dw) = 0;
  // Per-channel bias and activation over (n, c, hw): pre += bias[c]; out = act(pre).
  // out may alias pre only for Identity.
  virtual void channel_bias_act_forward(Activation act, int n, int c, int hw, const T* bias, T* pre, T* out) = 0;
  // dpre = dout * act'(pre) (written; may alias dout), db[c] += its sum over (n, hw).
  virtual void channel_bias_act_backward(Activation act, int n, int c, int hw, const T* pre, const T* out,
                                         const T* dout, T* dpre, T* db) = 0;
  // An activation on its own (after GroupNorm): out = act(pre) over n values; dpre =
  // dout * act'(pre) (written; may alias dout).
  virtual void activation_forward(Activation act, size_t n, const T* pre, T* out) = 0;
  virtual void activation_backward(Activation act, size_t n, const T* pre, const T* out, const T* dout, T* dpre) = 0;
  // GroupNorm over (n, c, hw) in `groups` groups of channels, per sample (no batch
  // statistics, so no cross-rank communication): y = (x - mean) * rstd * gamma[c] +
  // beta[c]; stats (n, groups, 2) keeps [mean, rstd] for the backward pass.
  virtual void group_norm_forward(int n, int c, int hw, int groups, T eps, const T* x, const T* gamma,
                                  const T* beta, T* y, T* stats) = 0;
  // dx (written) and dgamma, dbeta (+=) from dy, with the forward pass's stats.
  virtual void group_norm_backward(int n, int c, int hw, int groups, const T* x, const T* gamma, const T* stats,
                                   const T* dy, T* dx, T* dgamma, T* dbeta) = 0;

  // --- the hierarchical model's ops (model/hvae.hpp), over NCHW tensors ---
  // Channels [src_off, src_off + count) of src (n, src_c, hw) into channels [dst_off,
  // dst_off + count) of dst (n, dst_c, hw), written or (accumulate) added: the
  // concatenation along channels and its backward, the split.
  virtual void channel_copy(int n, int hw, int count, const T* src, int src_c, int src_off, T* dst, int dst_c,
                            int dst_off, bool accumulate) = 0;
  // y (n, c, h/f, w/f) = the mean of each f x f block of x (n, c, h, w), written; f divides h and w.
  virtual void avg_pool_forward(int n, int c, int h, int w, int f, const T* x, T* y) = 0;
  // dx (n, c, h, w) = dy / f^2 over each block (written).
  virtual void avg_pool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) = 0;
  // Nearest-neighbour unpooling: y (n, c, h*f, w*f) repeats each value of x (n, c, h, w) f x f times.
  virtual void unpool_forward(int n, int c, int h, int w, int f, const T* x, T* y) = 0;
  // dx (n, c, h, w) = the sum of dy over each f x f block (written).
  virtual void unpool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) = 0;
  // A diagonal Gaussian group of zc channels over hw positions: sample r's parameters
  // start at par + r * stride as [mu (zc, hw) | raw (zc, hw)], scale softplus(raw).
  // z (n, zc, hw) = mu + softplus(raw) * eps with eps (n, zc * hw) in rows of eps_stride.
  virtual void gaussian_sample(int n, int zc, int hw, const T* par, size_t stride, const T* eps, size_t eps_stride,
                               T* z) = 0;
  // kl[r * out_stride] = KL(q || p) summed over the group and log_ratio[r * out_stride] =
  // log q(z) - log p(z) at z = mu_q + sigma_q * eps (written), q and p laid out as above.
  virtual void gaussian_kl_forward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p, size_t p_stride,
                                   const T* eps, size_t eps_stride, T* kl, T* log_ratio, size_t out_stride) = 0;
  // The [mu | raw] parts of dq and dp (strides of q and p; written) from dz (n, zc, hw),
  // the gradient reaching z = mu_q + sigma_q * eps, and kl_weight[0] (backend memory) * KL.
  virtual void gaussian_kl_backward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p, size_t p_stride,
                                    const T* eps, size_t eps_stride, const T* dz, const T* kl_weight, T* dq, T* dp) = 0;

  // --- randomness: out[r, j] = N(0,1) keyed by (seed, stream, step, first_item + r, j) ---
  virtual void normal(uint64_t seed, RngStream stream, uint32_t step, uint64_t first_item, int rows,
                      int cols, T* out) = 0;

  // --- Gaussian posterior q(z|x); mulv is (rows x 2L) = [mu | logvar] ---
  // z = mu + exp(logvar/2) * eps; kl[r] = KL(q || N(0, I)) in closed form.
  virtual void posterior_forward(int rows, int latent, const T* mulv, const T* eps, T* z, T* kl) = 0;
  // dmulv (written) from dz and the KL term, dimension j's KL weighted by kl_weights[j]
  // (L values in backend memory: one weight for all, or free bits' per-dimension ones).
  virtual void posterior_backward(int rows, int latent, const T* mulv, const T* eps, const T* dz,
                                  const T* kl_weights, T* dmulv) = 0;
  // out[r] = log q(z|x) - log p(z) for the importance-weighted bound.
  virtual void posterior_log_ratio(int rows, int latent, const T* mulv, const T* eps, const T* z,
                                   T* out) = 0;

  // --- importance-weighted bound (loss.type: iwae): k samples per input, sample i of
  // input r in row r*k + i of the (rows*k)-row tensors ---
  // out (rows*k, cols): row r*k + i is in's row r.
  virtual void repeat_rows(int rows, int cols, int k, const T* in, T* out) = 0;
  // z (rows*k, L) = mu_r + exp(logvar_r / 2) * eps (eps is (rows*k, L)); log_ratio[r*k + i]
  // = log q(z|x_r) - log p(z) at that sample (a Monte-Carlo term, not the closed-form KL).
  virtual void iw_posterior_forward(int rows, int k, int latent, const T* mulv, const T* eps, T* z, T* log_ratio) = 0;
  // With log w = -(nll + beta * log_ratio) per sample: bound[r] = -log (1/k sum_i w_ri),
  // weights[r*k + i] = w_ri / sum_i w_ri (computed with the largest log w subtracted).
  virtual void iw_weights(int rows, int k, T beta, const T* nll, const T* log_ratio, T* bound, T* weights) = 0;
  // x (rows, cols): row r *= s * row_scale[r].
  virtual void scale_rows(int rows, int cols, const T* row_scale, T s, T* x) = 0;
  // dmulv (rows, 2L), written: the encoder-side gradient of s * sum_r bound[r] summed over
  // each input's k samples. dz (rows*k, L) is the decoder's input gradient, already
  // weighted by s * weights. reparam (dreg false): the total derivative through z and
  // through q's own parameters; dreg: Tucker et al.'s estimator, the path derivative
  // through z only, weighted by weights^2 (q's parameters held fixed inside log q).
  virtual void iw_posterior_backward(int rows, int k, int latent, const T* mulv, const T* eps, const T* z, const T* dz,
                                     const T* weights, T s_beta, bool dreg, T* dmulv) = 0;

  // --- likelihood p(x|z); `out` is the decoder output (rows x D, or rows x 2D = [mean | logvar]
  // for GaussianLearned); nll[r] = -log p(x_r | z_r) summed over the D dimensions ---
  virtual void likelihood_forward(Likelihood lik, T sigma, int rows, int dim, const T* out, const T* x,
                                  T* nll) = 0;
  // dout (written) = weight * d nll / d out.
  virtual void likelihood_backward(Likelihood lik, T sigma, int rows, int dim, const T* out, const T* x,
                                   T weight, T* dout) = 0;
  // probs (rows x dim) = E[x|z]: sigmoid(logits) or the Gaussian mean.
  virtual void likelihood_mean(Likelihood lik, int rows, int dim, const T* out, T* mean) = 0;

  // --- the discretized logistic mixture (DlmShape); the same contract as the likelihood ops ---
  // nll[r] = -log P(x_r | out_r) summed over C*hw pixel values (nats).
  virtual void dlm_forward(const DlmShape& s, int rows, const T* out, const T* x, T* nll) = 0;
  // dout (rows, out_width, written) = weight * d nll / d out.
  virtual void dlm_backward(const DlmShape& s, int rows, const T* out, const T* x, T weight, T* dout) = 0;
  // mean (rows, C, hw): the mixture's mean pixel in [0, 1] (see dlm_math.hpp).
  virtual void dlm_mean(const DlmShape& s, int rows, const T* out, T* mean) = 0;

  // --- optimizer and reductions over the flat buffers ---
  virtual void adam_step(const AdamArgs& args, size_t n, T* params, const T* grads, T* m, T* v) = 0;
  virtual double sum_squares(size_t n, const T* x) = 0;
  // The same, delivered into `host` (from allocate_host) by the next synchronize().
  virtual void sum_squares_async(size_t n, const T* x, double* host) { *host = sum_squares(n, x); }
  virtual void scale(size_t n, T s, T* x) = 0;
  // y = a * x + b * y over n values, each product rounded before the sum (no fused
  // multiply-add), so every backend gives the same bits; the EMA of the parameters.
  virtual void axpby(size_t n, T a, const T* x, T b, T* y) = 0;
};

// A move-only array in a backend's memory.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend<T>& be, size_t n) : m_be(&be), m_n(n), m_p(n > 0 ? be.allocate(n) : nullptr) {}
  Buffer(Buffer&& o) noexcept : m_be(o.m_be), m_n(o.m_n), m_p(o.m_p) { o.m_p = nullptr; o.m_n = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      m_be = o.m_be; m_n = o.m_n; m_p = o.m_p;
      o.m_p = nullptr; o.m_n = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }
  T* data() { return m_p; }
  const T* data() const { return m_p; }
  size_t size() const { return m_n; }

 private:
  void release() noexcept {
    if (m_p != nullptr) m_be->deallocate(m_p);
    m_p = nullptr;
  }
  Backend<T>* m_be = nullptr;
  size_t m_n = 0;
  T* m_p = nullptr;
};

// E elements of host memory from a backend's allocate_host (pinned on CUDA, so copies
// to and from it can run asynchronously), released with free_host.
template <class E, class T>
class HostBuffer {
 public:
  HostBuffer(Backend<T>& be, size_t n) : m_be(&be), m_p(static_cast<E*>(be.allocate_host(n * sizeof(E)))) {}
  ~HostBuffer() { m_be->free_host(m_p); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  E* data() { return m_p; }

 private:
  Backend<T>* m_be;
  E* m_p;
};

// The backend for a device kind; Cuda throws a clear error in CPU-only builds or
// when no GPU is present. `threads` sets the BLAS thread count of the CPU backend,
// `gpu` the CUDA device ordinal of the CUDA backend.
template <class T>
std::unique_ptr<Backend<T>> make_backend(DeviceKind kind, int threads = 1, int gpu = 0);

// What the build and the machine offer, for `elbo info` and test skips.
struct BackendReport {
  bool cuda_compiled = false;
  int cuda_devices = 0;
  std::string cuda_detail;  // device names, or why none is usable
};
BackendReport probe_backends();

}  // namespace elbo
