// Adam/AdamW over the one flat parameter buffer (or this rank's slice of it, when the
// optimizer is sharded), with global-norm gradient clipping and the learning-rate and
// KL-weight schedules.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"

namespace elbo {

// Learning rate for 0-based `step` of `total_steps`: linear warm-up from 0, then
// constant or cosine decay down to min_lr at the last step.
double learning_rate(const OptimSpec& o, int64_t step, int64_t total_steps);

// KL weight for 0-based `step`: beta ramps linearly over kl_warmup_steps.
double kl_weight(const LossSpec& l, int64_t step);

template <class T>
class Adam {
 public:
  // The squared gradient norm over every rank's slice from this rank's (a sum over
  // ranks, all-reduced as one double); the identity for an unsharded optimizer.
  using NormSum = std::function<double(double)>;

  // The whole buffer: moments for all num_params parameters.
  Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params);
  // A slice (ZeRO stage 1, dist.shard_optimizer): moments only for the `owned` ranges
  // (increasing, disjoint), packed back to back; the steps update params only there
  // and clip with the global norm that `norm_sum` completes.
  Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params, std::vector<FlatRange> owned, NormSum norm_sum);

  // Clips `grads` to the spec's global norm (when set), applies one update with `lr`,
  // and returns the gradient norm before clipping. A non-finite norm is returned
  // without touching anything: the caller's policy decides (skip or abort). A slice
  // reads grads and writes params on its owned ranges only.
  double step(T* params, T* grads, double lr);
  // The same with the gradients' (global) squared norm already known (computed while
  // the losses came back, where no all-reduce follows the backward pass).
  double step(T* params, T* grads, double lr, double squared_norm);

  int64_t steps_taken() const { return m_steps; }
  void set_steps_taken(int64_t n) { m_steps = n; }  // on resume, with the moments
  // The moments, packed in owned() order (for the whole buffer: the flat layout).
  Buffer<T>& first_moment() { return m_m; }
  Buffer<T>& second_moment() { return m_v; }
  const std::vector<FlatRange>& owned() const { return m_owned; }
  size_t owned_elems() const { return m_m.size(); }
  // On resume: this optimizer's ranges of the whole moments (host memory, flat layout).
  void load_moments(const T* m_flat, const T* v_flat);
  // For a checkpoint: the packed moments into host memory (owned_elems() each).
  void download_moments(T* m_packed, T* v_packed);

 private:
  OptimSpec m_spec;
  Backend<T>& m_be;
  std::vector<FlatRange> m_owned;
  NormSum m_norm_sum;  // empty: the whole buffer, nothing to sum over ranks
  Buffer<T> m_m, m_v;  // packed over m_owned (the flat layout when it is [0, n))
  int64_t m_steps = 0;
};

}  // namespace elbo
