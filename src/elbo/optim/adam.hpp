// Adam/AdamW over the one flat parameter buffer, with global-norm gradient clipping
// and the learning-rate and KL-weight schedules.
#pragma once

#include <cstdint>

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
  Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params);

  // Clips `grads` to the spec's global norm (when set), applies one update with `lr`,
  // and returns the gradient norm before clipping. A non-finite norm is returned
  // without touching anything: the caller's policy decides (skip or abort).
  double step(T* params, T* grads, double lr);
  // The same with the gradients' squared norm already known (computed while the
  // losses came back, where no all-reduce follows the backward pass).
  double step(T* params, T* grads, double lr, double squared_norm);

  int64_t steps_taken() const { return m_steps; }
  void set_steps_taken(int64_t n) { m_steps = n; }  // on resume, with the moments
  Buffer<T>& first_moment() { return m_m; }
  Buffer<T>& second_moment() { return m_v; }

 private:
  OptimSpec m_spec;
  Backend<T>& m_be;
  size_t m_n;
  Buffer<T> m_m, m_v;  // flat, same layout as the parameters
  int64_t m_steps = 0;
};

}  // namespace elbo
