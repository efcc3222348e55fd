// CPU convolutions as im2col + one OpenBLAS GEMM per chunk of samples, and
// GroupNorm as plain loops with double accumulators. The reference the cuDNN path
// is tested against.
//
// Columns layout: cols (c*r*s, nb*P) with P = oh*ow, column b*P + p for sample b and
// output position p. One GEMM per chunk of nb samples (rather than one per sample)
// keeps the GEMMs large enough for OpenBLAS on small images; the result comes out
// channel-major (k, nb*P) and is moved to NCHW with one pass over memory.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

namespace {

constexpr size_t kMaxColumns = size_t(1) << 24;  // floats of im2col scratch per chunk (64 MB)

// Samples per chunk so that the columns stay within kMaxColumns.
int chunk_samples(const ConvShape& s) {
  const size_t per = static_cast<size_t>(s.c) * s.r * s.s * s.out_h() * s.out_w();
  return static_cast<int>(std::clamp<size_t>(kMaxColumns / std::max<size_t>(per, 1), 1, static_cast<size_t>(s.n)));
}

// A 1x1 convolution with stride 1 and no padding: no columns needed (pointwise_* below).
bool is_pointwise(const ConvShape& s) { return s.r == 1 && s.s == 1 && s.stride == 1 && s.pad == 0; }

// A 1x1 input to a 1x1 output (a padded 3x3 at the hierarchical model's 1x1 stage): of
// the r*s taps only (pad, pad) meets the input, the others see padding. It is the
// pointwise case with that tap's (k, c) slice of the filter (gather_tap, add_tap) --
// im2col would build 9 columns of which 8 are zeros and a GEMM 9 times the work.
bool is_center_tap(const ConvShape& s) {
  return s.h == 1 && s.w == 1 && s.out_h() == 1 && s.out_w() == 1 && s.pad < s.r && s.pad < s.s;
}

template <class T>
void im2col(const ConvShape& s, const T* x, int nb, T* cols) {
  const int OH = s.out_h(), OW = s.out_w(), P = OH * OW;
  const size_t ld = static_cast<size_t>(nb) * P;
  for (int ch = 0; ch < s.c; ++ch)
    for (int i = 0; i < s.r; ++i)
      for (int j = 0; j < s.s; ++j) {
        T* row = cols + ((static_cast<size_t>(ch) * s.r + i) * s.s + j) * ld;
        for (int b = 0; b < nb; ++b) {
          const T* plane = x + (static_cast<size_t>(b) * s.c + ch) * s.h * s.w;
          T* out = row + static_cast<size_t>(b) * P;
          for (int oh = 0; oh < OH; ++oh) {
            const int ih = oh * s.stride - s.pad + i;
            T* o = out + static_cast<size_t>(oh) * OW;
            if (ih < 0 || ih >= s.h) {
              std::fill(o, o + OW, T(0));
              continue;
            }
            const T* in = plane + static_cast<size_t>(ih) * s.w;
            if (s.stride == 1) {
              // iw = ow - pad + j: zeros left and right of one contiguous run of the row.
              const int lo = std::clamp(s.pad - j, 0, OW), hi = std::clamp(s.w + s.pad - j, lo, OW);
              // Plain loops: the runs are a few floats (7 or 14 on Fashion-MNIST's stages),
              // where a memmove call costs more than the copy.
              const T* src = in - s.pad + j;
              for (int t = 0; t < lo; ++t) o[t] = T(0);
              for (int t = lo; t < hi; ++t) o[t] = src[t];
              for (int t = hi; t < OW; ++t) o[t] = T(0);
              continue;
            }
            for (int ow = 0; ow < OW; ++ow) {
              const int iw = ow * s.stride - s.pad + j;
              o[ow] = (iw >= 0 && iw < s.w) ? in[iw] : T(0);
            }
          }
        }
      }
}

// dx += the columns scattered back (the adjoint of im2col).
template <class T>
void col2im(const ConvShape& s, const T* cols, int nb, T* dx) {
  const int OH = s.out_h(), OW = s.out_w(), P = OH * OW;
  const size_t ld = static_cast<size_t>(nb) * P;
  for (int ch = 0; ch < s.c; ++ch)
    for (int i = 0; i < s.r; ++i)
      for (int j = 0; j < s.s; ++j) {
        const T* row = cols + ((static_cast<size_t>(ch) * s.r + i) * s.s + j) * ld;
        for (int b = 0; b < nb; ++b) {
          T* plane = dx + (static_cast<size_t>(b) * s.c + ch) * s.h * s.w;
          const T* in = row + static_cast<size_t>(b) * P;
          for (int oh = 0; oh < OH; ++oh) {
            const int ih = oh * s.stride - s.pad + i;
            if (ih < 0 || ih >= s.h) continue;
            T* out = plane + static_cast<size_t>(ih) * s.w;
            const T* c = in + static_cast<size_t>(oh) * OW;
            if (s.stride == 1) {  // the same sums over one contiguous run, as in im2col
              const int lo = std::clamp(s.pad - j, 0, OW), hi = std::clamp(s.w + s.pad - j, lo, OW);
              const int shift = j - s.pad;
              for (int ow = lo; ow < hi; ++ow) out[ow + shift] += c[ow];
              continue;
            }
            for (int ow = 0; ow < OW; ++ow) {
              const int iw = ow * s.stride - s.pad + j;
              if (iw >= 0 && iw < s.w) out[iw] += c[ow];
            }
          }
        }
      }
}

template <class T>
void gemm_rm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
             int ldc) {
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
                b, ldb, beta, c, ldc);
  else
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
                b, ldb, beta, c, ldc);
}

// Chunk [n0, n0 + nb) of an NCHW tensor with k channels of P values, to and from the
// channel-major (k, nb*P) layout the GEMMs use.
template <class T>
void to_channel_major(const T* nchw, int n0, int nb, int k, int P, T* cm) {
  for (int b = 0; b < nb; ++b)
    for (int c = 0; c < k; ++c)
      std::memcpy(cm + static_cast<size_t>(c) * nb * P + static_cast<size_t>(b) * P,
                  nchw + ((static_cast<size_t>(n0) + b) * k + c) * P, sizeof(T) * P);
}
template <class T>
void from_channel_major(const T* cm, int n0, int nb, int k, int P, T* nchw) {
  for (int b = 0; b < nb; ++b)
    for (int c = 0; c < k; ++c)
      std::memcpy(nchw + ((static_cast<size_t>(n0) + b) * k + c) * P,
                  cm + static_cast<size_t>(c) * nb * P + static_cast<size_t>(b) * P, sizeof(T) * P);
}

void check_shape(const ConvShape& s, const char* op) {
  if (s.n < 1 || s.c < 1 || s.k < 1 || s.r < 1 || s.s < 1 || s.stride < 1 || s.pad < 0 || s.out_h() < 1 ||
      s.out_w() < 1)
    throw internal_error(std::string(op) + ": invalid convolution shape (n " + std::to_string(s.n) + ", c " +
                         std::to_string(s.c) + ", " + std::to_string(s.h) + "x" + std::to_string(s.w) + ", k " +
                         std::to_string(s.k) + ", kernel " + std::to_string(s.r) + "x" + std::to_string(s.s) +
                         ", stride " + std::to_string(s.stride) + ", pad " + std::to_string(s.pad) + ")");
}

// A pointwise convolution on NCHW needs no columns: sample b's input plane stack is
// already the (c, P) matrix, and its output (k, P) is where NCHW wants it. So one GEMM
// per sample reads and writes the tensors in place, where the general path copies both
// sides (the hierarchical model's blocks are mostly 1x1 at small resolutions, where
// the copies cost more than the GEMMs). With P = 1 the tensors are (n, c) and (n, k)
// matrices and the whole batch is one GEMM.
template <class T>
void pointwise_forward(const ConvShape& s, const T* x, const T* w, T* y) {
  const int P = s.h * s.w;
  if (P == 1) {  // y (n, k) = x (n, c) . w^T
    gemm_rm<T>(false, true, s.n, s.k, s.c, T(1), x, s.c, w, s.c, T(0), y, s.k);
    return;
  }
  for (int b = 0; b < s.n; ++b)  // y_b (k, P) = w (k, c) . x_b (c, P)
    gemm_rm<T>(false, false, s.k, P, s.c, T(1), w, s.c, x + static_cast<size_t>(b) * s.c * P, P, T(0),
               y + static_cast<size_t>(b) * s.k * P, P);
}

template <class T>
void pointwise_backward_data(const ConvShape& s, const T* dy, const T* w, T* dx) {
  const int P = s.h * s.w;
  if (P == 1) {  // dx (n, c) = dy (n, k) . w
    gemm_rm<T>(false, false, s.n, s.c, s.k, T(1), dy, s.k, w, s.c, T(0), dx, s.c);
    return;
  }
  for (int b = 0; b < s.n; ++b)  // dx_b (c, P) = w^T (c, k) . dy_b (k, P)
    gemm_rm<T>(true, false, s.c, P, s.k, T(1), w, s.c, dy + static_cast<size_t>(b) * s.k * P, P, T(0),
               dx + static_cast<size_t>(b) * s.c * P, P);
}

template <class T>
void pointwise_backward_filter(const ConvShape& s, const T* x, const T* dy, T* dw) {
  const int P = s.h * s.w;
  if (P == 1) {  // dw (k, c) += dy^T (k, n) . x (n, c)
    gemm_rm<T>(true, false, s.k, s.c, s.n, T(1), dy, s.k, x, s.c, T(1), dw, s.c);
    return;
  }
  for (int b = 0; b < s.n; ++b)  // dw (k, c) += dy_b (k, P) . x_b^T (P, c), samples in order
    gemm_rm<T>(false, true, s.k, s.c, P, T(1), dy + static_cast<size_t>(b) * s.k * P, P,
               x + static_cast<size_t>(b) * s.c * P, P, T(1), dw, s.c);
}

// The center tap's filter slice, tap[k*c + ch] = w[k][ch][pad][pad], into `buf` (grown
// to fit), and back (added).
template <class T>
T* gather_tap(const ConvShape& s, const T* w, std::vector<T>& buf) {
  const size_t rs = static_cast<size_t>(s.r) * s.s, at = static_cast<size_t>(s.pad) * s.s + s.pad;
  const size_t kc = static_cast<size_t>(s.k) * s.c;
  if (buf.size() < kc) buf.resize(kc);
  for (size_t i = 0; i < kc; ++i) buf[i] = w[i * rs + at];
  return buf.data();
}
template <class T>
void add_tap(const ConvShape& s, const T* tap, T* dw) {
  const size_t rs = static_cast<size_t>(s.r) * s.s, at = static_cast<size_t>(s.pad) * s.s + s.pad;
  for (size_t i = 0; i < static_cast<size_t>(s.k) * s.c; ++i) dw[i * rs + at] += tap[i];
}

}  // namespace

template <class T>
int CpuBackend<T>::conv_scratch(const ConvShape& s) {
  const int nb_max = chunk_samples(s);
  const size_t P = static_cast<size_t>(s.out_h()) * s.out_w();
  // Grown only: resize() zero-fills whatever it adds, so following each layer's size
  // up and down would clear megabytes per call (every element is written before use).
  const size_t cols = static_cast<size_t>(s.c) * s.r * s.s * nb_max * P, gemm = static_cast<size_t>(s.k) * nb_max * P;
  if (m_cols.size() < cols) m_cols.resize(cols);
  if (m_gemm.size() < gemm) m_gemm.resize(gemm);
  return nb_max;
}

template <class T>
void CpuBackend<T>::conv2d_forward(const ConvShape& s, const T* x, const T* w, T* y) {
  check_shape(s, "conv2d_forward");
  if (is_pointwise(s)) return pointwise_forward(s, x, w, y);
  // y (n, k) = x (n, c) . tap^T
  if (is_center_tap(s)) return pointwise_forward(s, x, gather_tap(s, w, m_gemm), y);
  const int P = s.out_h() * s.out_w(), CRS = s.c * s.r * s.s;
  const int nb_max = conv_scratch(s);
  for (int n0 = 0; n0 < s.n; n0 += nb_max) {
    const int nb = std::min(nb_max, s.n - n0);
    const int cols = nb * P;
    im2col(s, x + static_cast<size_t>(n0) * s.c * s.h * s.w, nb, m_cols.data());
    // (k, nb*P) = w (k, CRS) . cols (CRS, nb*P)
    gemm_rm<T>(false, false, s.k, cols, CRS, T(1), w, CRS, m_cols.data(), cols, T(0), m_gemm.data(), cols);
    from_channel_major(m_gemm.data(), n0, nb, s.k, P, y);
  }
}

template <class T>
void CpuBackend<T>::conv2d_backward_data(const ConvShape& s, const T* dy, const T* w, T* dx) {
  check_shape(s, "conv2d_backward_data");
  if (is_pointwise(s)) return pointwise_backward_data(s, dy, w, dx);
  // dx (n, c) = dy (n, k) . tap
  if (is_center_tap(s)) return pointwise_backward_data(s, dy, gather_tap(s, w, m_gemm), dx);
  const int P = s.out_h() * s.out_w(), CRS = s.c * s.r * s.s;
  const int nb_max = conv_scratch(s);
  std::fill(dx, dx + static_cast<size_t>(s.n) * s.c * s.h * s.w, T(0));
  for (int n0 = 0; n0 < s.n; n0 += nb_max) {
    const int nb = std::min(nb_max, s.n - n0);
    const int cols = nb * P;
    to_channel_major(dy, n0, nb, s.k, P, m_gemm.data());
    // dcols (CRS, nb*P) = w^T (CRS, k) . dy (k, nb*P)
    gemm_rm<T>(true, false, CRS, cols, s.k, T(1), w, CRS, m_gemm.data(), cols, T(0), m_cols.data(), cols);
    col2im(s, m_cols.data(), nb, dx + static_cast<size_t>(n0) * s.c * s.h * s.w);
  }
}

template <class T>
void CpuBackend<T>::conv2d_backward_filter(const ConvShape& s, const T* x, const T* dy, T* dw) {
  check_shape(s, "conv2d_backward_filter");
  if (is_pointwise(s)) return pointwise_backward_filter(s, x, dy, dw);
  if (is_center_tap(s)) {  // the other taps' gradients are 0: only the center one grows
    const size_t kc = static_cast<size_t>(s.k) * s.c;
    m_gemm.resize(std::max(m_gemm.size(), kc));
    std::fill(m_gemm.begin(), m_gemm.begin() + static_cast<std::ptrdiff_t>(kc), T(0));
    pointwise_backward_filter(s, x, dy, m_gemm.data());
    add_tap(s, m_gemm.data(), dw);
    return;
  }
  const int P = s.out_h() * s.out_w(), CRS = s.c * s.r * s.s;
  const int nb_max = conv_scratch(s);
  for (int n0 = 0; n0 < s.n; n0 += nb_max) {
    const int nb = std::min(nb_max, s.n - n0);
    const int cols = nb * P;
    im2col(s, x + static_cast<size_t>(n0) * s.c * s.h * s.w, nb, m_cols.data());
    to_channel_major(dy, n0, nb, s.k, P, m_gemm.data());
    // dw (k, CRS) += dy (k, nb*P) . cols^T (nb*P, CRS)
    gemm_rm<T>(false, true, s.k, CRS, cols, T(1), m_gemm.data(), cols, m_cols.data(), cols, T(1), dw, CRS);
  }
}

template <class T>
void CpuBackend<T>::group_norm_forward(int n, int c, int hw, int groups, T eps, const T* x, const T* gamma,
                                       const T* beta, T* y, T* stats) {
  ELBO_ASSERT(groups >= 1 && c % groups == 0, "group_norm: channels must divide into groups");
  const int cpg = c / groups;
  const size_t len = static_cast<size_t>(cpg) * hw;
  for (int b = 0; b < n; ++b)
    for (int g = 0; g < groups; ++g) {
      const size_t off = (static_cast<size_t>(b) * c + static_cast<size_t>(g) * cpg) * hw;
      double sum = 0, sq = 0;
      for (size_t i = 0; i < len; ++i) sum += x[off + i];
      const double mean = sum / static_cast<double>(len);
      for (size_t i = 0; i < len; ++i) sq += (x[off + i] - mean) * (x[off + i] - mean);
      const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(len) + static_cast<double>(eps));
      stats[(static_cast<size_t>(b) * groups + g) * 2] = static_cast<T>(mean);
      stats[(static_cast<size_t>(b) * groups + g) * 2 + 1] = static_cast<T>(rstd);
      for (int ch = 0; ch < cpg; ++ch) {
        const int cc = g * cpg + ch;
        const double a = rstd * gamma[cc], bias = beta[cc] - mean * a;
        const size_t o = off + static_cast<size_t>(ch) * hw;
        for (int i = 0; i < hw; ++i) y[o + i] = static_cast<T>(x[o + i] * a + bias);
      }
    }
}

template <class T>
void CpuBackend<T>::group_norm_backward(int n, int c, int hw, int groups, const T* x, const T* gamma, const T* stats,
                                        const T* dy, T* dx, T* dgamma, T* dbeta) {
  const int cpg = c / groups;
  const size_t len = static_cast<size_t>(cpg) * hw;
  for (int b = 0; b < n; ++b)
    for (int g = 0; g < groups; ++g) {
      const size_t off = (static_cast<size_t>(b) * c + static_cast<size_t>(g) * cpg) * hw;
      const double mean = stats[(static_cast<size_t>(b) * groups + g) * 2];
      const double rstd = stats[(static_cast<size_t>(b) * groups + g) * 2 + 1];
      // With xhat = (x - mean) * rstd and dxhat = dy * gamma:
      // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group.
      double s1 = 0, s2 = 0;
      for (int ch = 0; ch < cpg; ++ch) {
        const int cc = g * cpg + ch;
        const size_t o = off + static_cast<size_t>(ch) * hw;
        double dg = 0, db = 0;
        for (int i = 0; i < hw; ++i) {
          const double xhat = (x[o + i] - mean) * rstd;
          dg += dy[o + i] * xhat;
          db += dy[o + i];
          const double dxhat = static_cast<double>(dy[o + i]) * gamma[cc];
          s1 += dxhat;
          s2 += dxhat * xhat;
        }
        dgamma[cc] += static_cast<T>(dg);
        dbeta[cc] += static_cast<T>(db);
      }
      const double m1 = s1 / static_cast<double>(len), m2 = s2 / static_cast<double>(len);
      for (int ch = 0; ch < cpg; ++ch) {
        const int cc = g * cpg + ch;
        const size_t o = off + static_cast<size_t>(ch) * hw;
        for (int i = 0; i < hw; ++i) {
          const double xhat = (x[o + i] - mean) * rstd;
          dx[o + i] = static_cast<T>(rstd * (static_cast<double>(dy[o + i]) * gamma[cc] - m1 - xhat * m2));
        }
      }
    }
}

template int CpuBackend<float>::conv_scratch(const ConvShape&);
template int CpuBackend<double>::conv_scratch(const ConvShape&);
template void CpuBackend<float>::conv2d_forward(const ConvShape&, const float*, const float*, float*);
template void CpuBackend<double>::conv2d_forward(const ConvShape&, const double*, const double*, double*);
template void CpuBackend<float>::conv2d_backward_data(const ConvShape&, const float*, const float*, float*);
template void CpuBackend<double>::conv2d_backward_data(const ConvShape&, const double*, const double*, double*);
template void CpuBackend<float>::conv2d_backward_filter(const ConvShape&, const float*, const float*, float*);
template void CpuBackend<double>::conv2d_backward_filter(const ConvShape&, const double*, const double*, double*);
template void CpuBackend<float>::group_norm_forward(int, int, int, int, float, const float*, const float*,
                                                    const float*, float*, float*);
template void CpuBackend<double>::group_norm_forward(int, int, int, int, double, const double*, const double*,
                                                     const double*, double*, double*);
template void CpuBackend<float>::group_norm_backward(int, int, int, int, const float*, const float*, const float*,
                                                     const float*, float*, float*, float*);
template void CpuBackend<double>::group_norm_backward(int, int, int, int, const double*, const double*,
                                                      const double*, const double*, double*, double*, double*);

}  // namespace elbo
