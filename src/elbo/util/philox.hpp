// Counter-based RNG (Philox4x32-10, Salmon et al. 2011). Every random number in
// elbo is a pure function of (seed, counter), so eps, binarization and the epoch
// order never depend on the world size, the rank or the order of evaluation.
// Header-only and host/device-callable so the CUDA backend draws the same numbers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ELBO_HD __host__ __device__ __forceinline__
#else
#define ELBO_HD inline
#endif

namespace elbo {

// Streams separate the independent uses of one seed.
enum class RngStream : uint32_t { Eps = 1, Binarize = 2, Shuffle = 3, EvalEps = 4, Init = 5, Sample = 6 };

struct Philox4 {
  uint32_t v[4];
};

ELBO_HD Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in (0, 1], never 0, so log() in Box-Muller is finite.
ELBO_HD double u01_open0(uint32_t x) { return (static_cast<double>(x) + 1.0) * (1.0 / 4294967296.0); }

// The counter layout used everywhere: (element block, item, step, stream).
// `item` is a global sample index; `step` the optimizer step (or epoch, or IW sample).
ELBO_HD Philox4 philox_block(uint64_t seed, RngStream stream, uint32_t step, uint32_t item,
                             uint32_t block) {
  return philox4x32(block, item, step, static_cast<uint32_t>(stream), seed);
}

// Standard normal number j of (seed, stream, step, item), via Box-Muller on a
// pair of uniforms; computed in double so float and double builds agree.
ELBO_HD double philox_normal(uint64_t seed, RngStream stream, uint32_t step, uint32_t item, uint32_t j) {
  Philox4 r = philox_block(seed, stream, step, item, j / 4);
  uint32_t pair = (j % 4) / 2;
  double u1 = u01_open0(r.v[2 * pair]);
  double u2 = u01_open0(r.v[2 * pair + 1]);
  double rad = std::sqrt(-2.0 * std::log(u1));
  double ang = 6.283185307179586476925286766559 * u2;
  return (j % 2 == 0) ? rad * std::cos(ang) : rad * std::sin(ang);
}

// Uniform in [0, 1) for element j.
ELBO_HD double philox_uniform(uint64_t seed, RngStream stream, uint32_t step, uint32_t item, uint32_t j) {
  Philox4 r = philox_block(seed, stream, step, item, j / 4);
  return static_cast<double>(r.v[j % 4]) * (1.0 / 4294967296.0);
}

// Uniform integer in [0, n) with a 64-bit draw (bias below 2^-32 for n < 2^32).
ELBO_HD uint64_t philox_below(uint64_t seed, RngStream stream, uint32_t step, uint32_t item, uint64_t n) {
  Philox4 r = philox_block(seed, stream, step, item, 0);
  uint64_t x = (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
  // High 64 bits of the 128-bit product x * n, from 32-bit halves (portable C++).
  uint64_t a_lo = x & 0xFFFFFFFFu, a_hi = x >> 32, b_lo = n & 0xFFFFFFFFu, b_hi = n >> 32;
  uint64_t p0 = a_lo * b_lo, p1 = a_lo * b_hi, p2 = a_hi * b_lo, p3 = a_hi * b_hi;
  uint64_t mid = (p0 >> 32) + (p1 & 0xFFFFFFFFu) + (p2 & 0xFFFFFFFFu);
  return p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
}

}  // namespace elbo
