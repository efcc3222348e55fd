"""An independent NumPy discretized logistic mixture (PixelCNN++'s
discretized_mix_logistic_loss, transcribed in float64 with its edge bins at 0 and 255
and its mid-bin density fallback) on random decoder outputs in elbo's layout, written
as text for test_dlm_reference to compare with the backend op.

Layout per sample (see DlmShape in backend.hpp): out (K * G, hw) with G = 1 + 2C +
C(C-1)/2 groups of K channels: logits, C means, C log-scales, the coefficients (c, j),
j < c; x (C, hw) = byte / 255.
"""
import sys

import numpy as np


def softplus(a):
    return np.logaddexp(0.0, a)


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def log_prob(out, xb, C, K):
    """out (N, K*G, hw), xb (N, C, hw) bytes -> log P per sample (N,)."""
    n, _, hw = out.shape
    g = out.reshape(n, -1, K, hw)  # (N, G, K, hw)
    logits = g[:, 0]
    means = g[:, 1:1 + C]
    log_scales = np.maximum(g[:, 1 + C:1 + 2 * C], -7.0)
    coeffs = np.tanh(g[:, 1 + 2 * C:])
    x = xb.astype(np.float64) / 127.5 - 1.0  # PixelCNN++'s rescaling to [-1, 1]
    x = x[:, :, None, :]  # (N, C, 1, hw)
    mu = means.copy()
    idx = 0
    for c in range(C):  # PixelCNN++: m2 = means[1] + coeffs[0] * x[0]; m3 = means[2] + coeffs[1] * x[0] + coeffs[2] * x[1]
        for j in range(c):
            mu[:, c] = mu[:, c] + coeffs[:, idx] * x[:, j]
            idx += 1
    centered = x - mu
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    cdf_plus = sigmoid(plus_in)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    cdf_min = sigmoid(min_in)
    log_cdf_plus = plus_in - softplus(plus_in)
    log_one_minus_cdf_min = -softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * softplus(mid_in)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.where(cdf_delta > 1e-5, np.log(np.maximum(cdf_delta, 1e-12)), log_pdf_mid - np.log(127.5))
    lp = np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, inner))
    lp = lp.sum(axis=1) + logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # (N, K, hw)
    return np.logaddexp.reduce(lp, axis=1).sum(axis=1)


def case(rng, C, K, n, hw):
    G = 1 + 2 * C + C * (C - 1) // 2
    g = rng.normal(0.0, 1.0, size=(n, G, K, hw))
    g[:, 0] *= 2.0  # logits
    g[:, 1:1 + C] = rng.uniform(-1.1, 1.1, size=(n, C, K, hw))  # means
    g[:, 1 + C:1 + 2 * C] = rng.uniform(-5.5, 0.5, size=(n, C, K, hw))  # log-scales
    xb = rng.integers(0, 256, size=(n, C, hw))
    # Edge bins in every sample, and where the mean sits: both edges, sharp and wide.
    xb[:, :, 0] = 0
    xb[:, :, 1] = 255
    g[:n // 3, 1 + C:1 + 2 * C] = -8.0  # below PixelCNN++'s floor of -7: clamped
    # Far-tail bins (mass < 1e-5): the mid-bin density branch.
    g[n // 3:2 * n // 3, 1:1 + C, :, 2] = -1.0
    g[n // 3:2 * n // 3, 1 + C:1 + 2 * C, :, 2] = -4.0
    xb[n // 3:2 * n // 3, :, 2] = 200
    return g.reshape(n, G * K, hw), xb


def main():
    path = sys.argv[1]
    rng = np.random.default_rng(2017)
    with open(path, "w") as f:
        cases = [(1, 1), (1, 5), (3, 1), (3, 4), (2, 3)]
        f.write(f"{len(cases)}\n")
        for C, K in cases:
            n, hw = 24, 6
            out, xb = case(rng, C, K, n, hw)
            ref = -log_prob(out, xb, C, K)
            f.write(f"{C} {K} {n} {hw}\n")
            f.write(" ".join(repr(float(v)) for v in out.ravel()) + "\n")
            f.write(" ".join(repr(float(b) / 255.0) for b in xb.ravel()) + "\n")
            f.write(" ".join(repr(float(v)) for v in ref) + "\n")


if __name__ == "__main__":
    with np.errstate(over="ignore"):  # exp overflow in sigmoid is its 0 limit
        main()
