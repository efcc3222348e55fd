// A run's state across jobs: where a run continues from (rank 0 finds and verifies the
// checkpoint, every rank receives it) and the checkpoints that make continuing
// possible (rank 0 copies the state to host memory, a thread writes the file). Both
// sides live here because they are one contract: a checkpoint holds everything needed
// to continue bit-exactly.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/train/batch_prep.hpp"
#include "elbo/train/replica.hpp"

namespace elbo {

struct ResumePoint {
  bool resumed = false;
  TrainState state;   // where the loop starts
  std::string notes;  // rank 0: the "resume: ..." lines for the run log's header
};

// Collective. `resume` is TrainOptions::resume: "" (a fresh run: `fresh` is returned),
// "auto" (the newest checkpoint in output.dir/checkpoints that verifies; fresh when
// there is none, but an error over a finished model or over checkpoints that all fail
// to verify) or a checkpoint path. A checkpoint must match the data (sample shape and
// count) and pass the spec's resume rules; its parameters, Adam state and moving
// average (optim.ema; from its parameters when it holds none) go into `replica`, its
// TrainState comes back with this run's total_steps and world_size.
ResumePoint resume_run(const std::string& resume, const ExperimentSpec& spec, Communicator& comm,
                       const TrainingData& data, const TrainState& fresh, Replica& replica);

// Writes checkpoints of rank 0's replica into output.dir/checkpoints on a thread, so
// that the other ranks wait only for the copy of the state to host memory, not for the
// file system. One write in flight at a time; a failure surfaces at the next save() or
// wait(). On other ranks every call does nothing.
class Checkpoints {
 public:
  Checkpoints(const ExperimentSpec& spec, bool root, const std::vector<int>& input_shape, const ModelLayout& layout,
              Replica& replica);
  ~Checkpoints();
  Checkpoints(const Checkpoints&) = delete;
  Checkpoints& operator=(const Checkpoints&) = delete;

  // Copies the replica's state (and `state`) and starts writing it; with `wait`,
  // returns once it is written and published (keep-K applied).
  void save(const TrainState& state, bool wait);
  // Waits for the write in flight; rethrows its failure.
  void wait();
  const std::string& last_path() const { return m_last_path; }  // the last checkpoint started

 private:
  const ExperimentSpec& m_spec;
  const bool m_root;
  const std::vector<int>& m_input_shape;
  const ModelLayout& m_layout;
  Replica& m_replica;
  const std::string m_dir;
  std::string m_last_path;
  std::thread m_thread;
  std::exception_ptr m_error;
};

}  // namespace elbo
