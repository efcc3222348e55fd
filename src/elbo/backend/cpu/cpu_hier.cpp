// The hierarchical model's ops on the CPU (the reference): channel copies for
// concatenation, average pooling and nearest unpooling between resolutions, and the
// diagonal Gaussian latent groups with softplus scales (sampling, KL, its backward).
#include <algorithm>
#include <cmath>

#include "elbo/backend/cpu/cpu_backend.hpp"

namespace elbo {

namespace {

template <class T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <class T>
T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}
// log softplus(x): below -20, softplus(x) = e^x (1 - e^x / 2 + ...) and its log is x to
// within 1e-9, where log(softplus) itself would underflow to log(0) for very negative x.
template <class T>
T log_softplus(T x) {
  return x < T(-20) ? x : std::log(softplus(x));
}

}  // namespace

template <class T>
void CpuBackend<T>::channel_copy(int n, int hw, int count, const T* src, int src_c, int src_off, T* dst, int dst_c,
                                 int dst_off, bool accumulate) {
  const size_t len = static_cast<size_t>(count) * hw;
  for (int r = 0; r < n; ++r) {
    const T* s = src + (static_cast<size_t>(r) * src_c + src_off) * hw;
    T* d = dst + (static_cast<size_t>(r) * dst_c + dst_off) * hw;
    if (accumulate)
      for (size_t i = 0; i < len; ++i) d[i] += s[i];
    else
      std::copy(s, s + len, d);
  }
}

namespace {

// Average pooling and nearest unpooling are each other's adjoints, so the four passes
// are two routines. block_sums: out (planes, oh, ow) = scale * the sum of each f x f
// block of in (planes, oh*f, ow*f), a then b in order (avg-pool forward with 1/f^2,
// unpool backward with 1: times 1 is exact).
template <class T>
void block_sums(size_t planes, int oh, int ow, int f, T scale, const T* in, T* out) {
  const int w = ow * f;
  for (size_t plane = 0; plane < planes; ++plane) {
    const T* ip = in + plane * oh * f * w;
    T* op = out + plane * oh * ow;
    for (int i = 0; i < oh; ++i)
      for (int j = 0; j < ow; ++j) {
        T acc = 0;
        for (int a = 0; a < f; ++a)
          for (int b = 0; b < f; ++b) acc += ip[(i * f + a) * w + j * f + b];
        op[i * ow + j] = acc * scale;
      }
  }
}

// spread: out (planes, h*f, w*f) = scale * in (planes, h, w) repeated over each f x f
// block (unpool forward with 1, avg-pool backward with 1/f^2). Each input row goes once
// into its first output row, which the next f - 1 rows copy.
template <class T>
void spread(size_t planes, int h, int w, int f, T scale, const T* in, T* out) {
  const int ow = w * f;
  for (size_t plane = 0; plane < planes; ++plane) {
    const T* ip = in + plane * h * w;
    T* op = out + plane * h * f * ow;
    for (int i = 0; i < h; ++i) {
      T* row = op + static_cast<size_t>(i) * f * ow;
      for (int j = 0; j < w; ++j) std::fill_n(row + j * f, f, ip[i * w + j] * scale);
      for (int a = 1; a < f; ++a) std::copy_n(row, ow, row + static_cast<size_t>(a) * ow);
    }
  }
}

}  // namespace

template <class T>
void CpuBackend<T>::avg_pool_forward(int n, int c, int h, int w, int f, const T* x, T* y) {
  block_sums(static_cast<size_t>(n) * c, h / f, w / f, f, T(1) / static_cast<T>(f * f), x, y);
}

template <class T>
void CpuBackend<T>::avg_pool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) {
  spread(static_cast<size_t>(n) * c, h / f, w / f, f, T(1) / static_cast<T>(f * f), dy, dx);
}

template <class T>
void CpuBackend<T>::unpool_forward(int n, int c, int h, int w, int f, const T* x, T* y) {
  spread(static_cast<size_t>(n) * c, h, w, f, T(1), x, y);
}

template <class T>
void CpuBackend<T>::unpool_backward(int n, int c, int h, int w, int f, const T* dy, T* dx) {
  block_sums(static_cast<size_t>(n) * c, h, w, f, T(1), dy, dx);
}

template <class T>
void CpuBackend<T>::gaussian_sample(int n, int zc, int hw, const T* par, size_t stride, const T* eps, size_t eps_stride,
                                    T* z) {
  const size_t len = static_cast<size_t>(zc) * hw;
  for (int r = 0; r < n; ++r) {
    const T* mu = par + r * stride;
    const T* raw = mu + len;
    const T* e = eps + r * eps_stride;
    T* zr = z + r * len;
    for (size_t i = 0; i < len; ++i) zr[i] = mu[i] + softplus(raw[i]) * e[i];
  }
}

template <class T>
void CpuBackend<T>::gaussian_kl_forward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p, size_t p_stride,
                                        const T* eps, size_t eps_stride, T* kl, T* log_ratio, size_t out_stride) {
  const size_t len = static_cast<size_t>(zc) * hw;
  for (int r = 0; r < n; ++r) {
    const T* mq = q + r * q_stride;
    const T* rq = mq + len;
    const T* mp = p + r * p_stride;
    const T* rp = mp + len;
    const T* e = eps + r * eps_stride;
    double kl_acc = 0, ratio_acc = 0;
    for (size_t i = 0; i < len; ++i) {
      const T sq = softplus(rq[i]), sp = softplus(rp[i]);
      const T log_sq = log_softplus(rq[i]), log_sp = log_softplus(rp[i]);
      const T d = mq[i] - mp[i];
      // KL(N(mq, sq^2) || N(mp, sp^2)) = log sp - log sq + ((sq/sp)^2 + (d/sp)^2) / 2 - 1/2,
      // with ratios rather than squares, which underflow first for tiny scales.
      const T t = sq / sp, u0 = d / sp;
      kl_acc += log_sp - log_sq + T(0.5) * (t * t + u0 * u0) - T(0.5);
      // z = mq + sq * eps: log q(z) = -log sq - eps^2/2, log p(z) = -log sp - ((z - mp)/sp)^2/2
      // (the log 2pi terms cancel).
      const T u = (mq[i] + sq * e[i] - mp[i]) / sp;
      ratio_acc += log_sp - log_sq - T(0.5) * e[i] * e[i] + T(0.5) * u * u;
    }
    kl[r * out_stride] = static_cast<T>(kl_acc);
    log_ratio[r * out_stride] = static_cast<T>(ratio_acc);
  }
}

template <class T>
void CpuBackend<T>::gaussian_kl_backward(int n, int zc, int hw, const T* q, size_t q_stride, const T* p,
                                         size_t p_stride, const T* eps, size_t eps_stride, const T* dz,
                                         const T* kl_weight, T* dq, T* dp) {
  const size_t len = static_cast<size_t>(zc) * hw;
  const T w = kl_weight[0];
  for (int r = 0; r < n; ++r) {
    const T* mq = q + r * q_stride;
    const T* rq = mq + len;
    const T* mp = p + r * p_stride;
    const T* rp = mp + len;
    const T* e = eps + r * eps_stride;
    const T* g = dz + r * len;
    T* dmq = dq + r * q_stride;
    T* drq = dmq + len;
    T* dmp = dp + r * p_stride;
    T* drp = dmp + len;
    for (size_t i = 0; i < len; ++i) {
      const T sq = softplus(rq[i]), sp = softplus(rp[i]);
      const T d = mq[i] - mp[i];
      const T inv_var_p = T(1) / (sp * sp);
      // dKL/dmq = d/sp^2 = -dKL/dmp; dKL/dsq = sq/sp^2 - 1/sq; dKL/dsp = 1/sp - (sq^2 + d^2)/sp^3;
      // d softplus(r)/dr = sigmoid(r); z = mq + sq * eps adds dz and dz * eps.
      const T dkl_dm = d * inv_var_p;
      dmq[i] = w * dkl_dm + g[i];
      dmp[i] = -w * dkl_dm;
      drq[i] = (w * (sq * inv_var_p - T(1) / sq) + g[i] * e[i]) * sigmoid(rq[i]);
      drp[i] = w * (T(1) / sp - (sq * sq + d * d) * inv_var_p / sp) * sigmoid(rp[i]);
    }
  }
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace elbo
