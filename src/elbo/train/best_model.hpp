// The best model of a run and early stopping: after each evaluation during training
// (eval.every) the held-out bound either improves on the best so far (the caller
// writes best.h5) or counts toward train.patience. The state lives in TrainState, so a
// checkpoint carries it and a resumed run decides as an uninterrupted one.
#pragma once

#include <cstdint>

#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/config/spec.hpp"

namespace elbo {

// Records the evaluation at `step` with held-out bound `bound` (the test -ELBO, nats
// per sample; lower is better). Returns true when it is strictly better than the best
// so far (or the first): `st`'s best is now this one. Otherwise (also for a NaN bound)
// it counts one more evaluation without improvement.
bool record_evaluation(TrainState& st, int64_t step, double bound);

// Whether train.patience (> 0) evaluations in a row have brought no improvement.
bool patience_exhausted(const TrainSpec& train, const TrainState& st);

}  // namespace elbo
