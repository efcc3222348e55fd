// KL schedules and the free-bits weights; see kl.hpp for the formulas.
#include "elbo/optim/kl.hpp"

#include <algorithm>
#include <cmath>

namespace elbo {

double kl_weight(const LossSpec& l, int64_t step, int64_t total_steps) {
  if (l.kl_schedule == KlSchedule::Cyclical) {
    // The paper's cycle length is the real T/M; the counter wraps every ceil(T/M)
    // steps, so tau can only reach 1 at the end of a cycle when M divides T.
    const double period = static_cast<double>(std::max<int64_t>(total_steps, 1)) / l.kl_cycles;
    const int64_t wrap = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(period)));
    const double tau = static_cast<double>(step % wrap) / period;
    return tau >= l.kl_ramp ? l.beta : l.beta * (tau / l.kl_ramp);
  }
  if (l.kl_warmup_steps <= 0) return l.beta;
  double ramp = std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(l.kl_warmup_steps));
  return l.beta * ramp;
}

template <class T>
void add_kl_per_dim(int rows, int latent, const T* mulv, double* sums) {
  for (int r = 0; r < rows; ++r) {
    const T* mu = mulv + static_cast<size_t>(r) * 2 * latent;
    const T* lv = mu + latent;
    for (int j = 0; j < latent; ++j) {
      const double m = mu[j], v = lv[j];
      sums[j] += -0.5 * (1.0 + v - m * m - std::exp(v));
    }
  }
}
template void add_kl_per_dim<float>(int, int, const float*, double*);
template void add_kl_per_dim<double>(int, int, const double*, double*);

FreeBits free_bits(const LossSpec& l, const double* kl_sums, int latent, int64_t global_rows) {
  FreeBits out;
  out.clamped.assign(static_cast<size_t>(latent), 0);
  const double n = static_cast<double>(std::max<int64_t>(global_rows, 1));
  const int G = std::max(1, l.free_bits_group);
  for (int g0 = 0; g0 < latent; g0 += G) {
    const int g1 = std::min(latent, g0 + G);
    double kl = 0;
    for (int j = g0; j < g1; ++j) kl += kl_sums[j];
    kl /= n;
    const double floor = l.free_bits * (g1 - g0);
    out.objective_kl += std::max(floor, kl);
    if (kl > floor) continue;
    out.clamped_dims += g1 - g0;
    for (int j = g0; j < g1; ++j) out.clamped[static_cast<size_t>(j)] = 1;
  }
  return out;
}

FreeBits free_bits_groups(const LossSpec& l, const double* group_sums, const std::vector<int>& group_sizes,
                          int64_t global_rows) {
  FreeBits out;
  out.clamped.assign(group_sizes.size(), 0);
  const double n = static_cast<double>(std::max<int64_t>(global_rows, 1));
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    const double kl = group_sums[g] / n, floor = l.free_bits * group_sizes[g];
    out.objective_kl += std::max(floor, kl);
    if (kl > floor) continue;
    out.clamped_dims += group_sizes[g];
    out.clamped[g] = 1;
  }
  return out;
}

}  // namespace elbo
