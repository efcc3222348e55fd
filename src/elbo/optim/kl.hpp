// The KL term's weight: its schedule over the run (linear warm-up, or cyclical
// annealing after Fu et al. 2019) and free bits (Kingma et al. 2016), which turn the
// per-step KL weight into one weight per latent dimension.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "elbo/config/spec.hpp"

namespace elbo {

// beta for 0-based `step` of a run of `total_steps`. A pure function of (step,
// total_steps), so a resumed run continues the same schedule bit for bit.
//   linear:   beta * min(1, (step + 1) / kl_warmup_steps) (beta at once without warm-up).
//   cyclical: Fu et al. (2019), eq. 5-6: with t = step + 1, tau = mod(t - 1, ceil(T/M)) / (T/M),
//             beta * min(1, tau / R), where M = kl_cycles and R = kl_ramp: each of the M
//             cycles starts at 0, ramps linearly over its first R, then holds beta.
double kl_weight(const LossSpec& l, int64_t step, int64_t total_steps);

// KL(q(z|x_r) || N(0, I)) of each latent dimension, summed over `rows` rows of mulv
// (rows, 2L) = [mu | logvar]: sums[j] += sum_r -0.5 (1 + logvar_rj - mu_rj^2 - exp(logvar_rj)).
// Summed in double on the host: the free-bits floor and the evaluation's kl_per_dim read it.
template <class T>
void add_kl_per_dim(int rows, int latent, const T* mulv, double* sums);

// Free bits (Kingma et al. 2016, "IAF", eq. 15): the KL part of the objective becomes
//   beta * sum_g max(free_bits * |g|, KLbar_g),
// where the latent dimensions are cut into groups g of free_bits_group consecutive ones
// (the last may be smaller) and KLbar_g = sum_{j in g} kl_sums[j] / global_rows is the
// group's KL averaged over the GLOBAL batch. The gradient of that term with respect to
// one row's KL of dimension j is beta / global_rows when j's group is above its floor,
// and 0 when it is at or below it (a clamped group pulls on nothing).
struct FreeBits {
  std::vector<uint8_t> clamped;  // (L): 1 where the dimension's group is at or below its floor
  int clamped_dims = 0;          // how many
  double objective_kl = 0;       // sum_g max(floor_g, KLbar_g): the KL term of the objective, unweighted
  // The per-dimension KL weights for posterior_backward: `active` (beta / global rows,
  // computed by the caller in its own precision) where unclamped, 0 where clamped.
  template <class T>
  std::vector<T> weights(T active) const {
    std::vector<T> w(clamped.size());
    for (size_t j = 0; j < w.size(); ++j) w[j] = clamped[j] ? T(0) : active;
    return w;
  }
};
// `kl_sums` (L) are the per-dimension KL sums over all ranks' rows of the step.
FreeBits free_bits(const LossSpec& l, const double* kl_sums, int latent, int64_t global_rows);
// The same for a hierarchical model, whose free-bits groups are its latent groups: group
// l (group_sizes[l] latent elements) has the floor free_bits * group_sizes[l] on its KL
// averaged over the global batch, KLbar_l = group_sums[l] / global_rows. clamped and
// weights() are per group (the model's backward takes one KL weight per group);
// clamped_dims counts latent elements.
FreeBits free_bits_groups(const LossSpec& l, const double* group_sums, const std::vector<int>& group_sizes,
                          int64_t global_rows);

}  // namespace elbo
