// The training loop of one replica: data slice -> forward -> backward into the
// flat gradient buffer -> all-reduce -> Adam on the flat parameter buffer ->
// logging; rank 0 alone writes files. The parts: replica.hpp (the step),
// batch_prep.hpp (the data), resume.hpp (checkpoints), run_log.hpp (log and outputs).
#pragma once

#include <iosfwd>
#include <string>

#include "elbo/config/spec.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/train/evaluate.hpp"

namespace elbo {

struct TrainOptions {
  // "" = fresh run; "auto" = continue from the newest valid checkpoint in
  // output.dir/checkpoints (fresh when there is none); otherwise a checkpoint path.
  std::string resume;
};

struct TrainResult {
  int64_t steps = 0;
  bool stopped = false;        // a stop signal ended the run early, after a checkpoint
  bool early_stopped = false;  // train.patience ended training (the outputs are written as for a finished run)
  int stop_signal = 0;
  std::string checkpoint_path; // the last checkpoint written
  int64_t epochs_completed = 0;
  double last_neg_elbo = 0;  // mean over the last logging interval
  std::string model_path;
  bool evaluated = false;
  EvalResult eval;
};

// Runs the whole job described by `spec` on this rank. Progress goes to `log` on
// rank 0. Setup errors are agreed by all ranks (see collectively()) and thrown.
TrainResult train(const ExperimentSpec& spec, Communicator& comm, std::ostream& log,
                  const TrainOptions& options = {});

// BLAS threads for this rank: the spec's value, or the node's cores shared among
// the ranks placed on it.
int threads_per_rank(int requested, int local_ranks);

}  // namespace elbo
