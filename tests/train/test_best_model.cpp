// best.h5 and train.patience decisions (record_evaluation, patience_exhausted) on
// sequences of held-out bounds, including a resume in the middle of one.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "elbo/train/best_model.hpp"

namespace elbo {
namespace {

// The steps at which best.h5 is written, and where patience stops (-1: never), for
// bounds evaluated every 10 steps.
struct Outcome {
  std::vector<int64_t> written;
  int64_t stop = -1;
};

Outcome run(const std::vector<double>& bounds, int64_t patience, TrainState st = {}, size_t from = 0) {
  TrainSpec t;
  t.patience = patience;
  Outcome o;
  for (size_t i = from; i < bounds.size(); ++i) {
    const int64_t step = 10 * static_cast<int64_t>(i + 1);
    if (record_evaluation(st, step, bounds[i])) o.written.push_back(step);
    if (patience_exhausted(t, st)) {
      o.stop = step;
      break;
    }
  }
  return o;
}

const std::vector<double> kBounds = {120, 110, 111, 105, 105, 107, 108, 104, 109, 110, 112};

TEST(BestModel, WrittenAtEachStrictImprovement) {
  const Outcome o = run(kBounds, 0);
  EXPECT_EQ(o.written, (std::vector<int64_t>{10, 20, 40, 80}));  // the tie at 50 keeps step 40
  EXPECT_EQ(o.stop, -1);
}

TEST(BestModel, PatienceStopsAfterThatManyEvaluationsWithoutImprovement) {
  EXPECT_EQ(run(kBounds, 1).stop, 30);
  EXPECT_EQ(run(kBounds, 2).stop, 60);  // 50 (a tie) and 60 do not improve on 40
  EXPECT_EQ(run(kBounds, 3).stop, 70);
  EXPECT_EQ(run(kBounds, 4).stop, -1);  // 80 improved: 90, 100, 110 are three, and the run ends
}

TEST(BestModel, StateCarriedOverDecidesAsAnUninterruptedRun) {
  TrainState st;
  TrainSpec t;
  for (size_t i = 0; i < 5; ++i) record_evaluation(st, 10 * static_cast<int64_t>(i + 1), kBounds[i]);
  EXPECT_EQ(st.best_step, 40);
  EXPECT_EQ(st.best_bound, 105);
  EXPECT_EQ(st.evals_since_best, 1);
  const TrainState checkpointed = st;  // what a checkpoint at step 50 carries
  const Outcome resumed = run(kBounds, 2, checkpointed, 5);
  EXPECT_EQ(resumed.written, std::vector<int64_t>{});
  EXPECT_EQ(resumed.stop, 60);
  // A fresh best-so-far at the resume would instead write best.h5 at 60: the state matters.
  EXPECT_EQ(run(kBounds, 2, TrainState{}, 5).written.front(), 60);
}

TEST(BestModel, NanNeverBecomesTheBest) {
  TrainState st;
  EXPECT_FALSE(record_evaluation(st, 10, std::nan("")));
  EXPECT_EQ(st.best_step, -1);
  EXPECT_EQ(st.evals_since_best, 1);
  EXPECT_TRUE(record_evaluation(st, 20, 100.0));
  EXPECT_FALSE(record_evaluation(st, 30, std::nan("")));
  EXPECT_EQ(st.best_step, 20);
}

}  // namespace
}  // namespace elbo
