// The best held-out bound so far and train.patience (see best_model.hpp).
#include "elbo/train/best_model.hpp"

#include <cmath>

namespace elbo {

bool record_evaluation(TrainState& st, int64_t step, double bound) {
  // Strictly better: a tie keeps the earlier model (fewer steps, same bound). A NaN
  // bound never becomes the best.
  if (!std::isnan(bound) && (st.best_step < 0 || bound < st.best_bound)) {
    st.best_bound = bound;
    st.best_step = step;
    st.evals_since_best = 0;
    return true;
  }
  ++st.evals_since_best;
  return false;
}

bool patience_exhausted(const TrainSpec& train, const TrainState& st) {
  return train.patience > 0 && st.evals_since_best >= train.patience;
}

}  // namespace elbo
