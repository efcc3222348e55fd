// What a run shows and leaves behind: the header, progress lines and metrics.csv, the
// epoch bar and warnings, image grids, and the output files (spec.yaml, model.h5,
// eval.yaml), plus the checks that make output.dir safe to write into. Every rank
// holds a RunLog (the interval statistics come from all-reduced sums, the same on all
// ranks); only rank 0 writes. Kept apart from the loop (issue 14) so that formats and
// files live in one place and the loop says only what happened.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/data/stream.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/train/batch_prep.hpp"
#include "elbo/train/evaluate.hpp"
#include "elbo/train/footprint.hpp"
#include "elbo/train/replica.hpp"
#include "elbo/train/resume.hpp"
#include "elbo/util/progress.hpp"
#include "elbo/viz/tensorboard.hpp"

namespace elbo {

// Makes output.dir ready for this job (rank 0, under the run lock). A directory holds
// one run: a fresh start refuses a directory with a run in it unless output.overwrite,
// which then removes that run's files first (never a mix of two runs' checkpoints);
// --resume PATH may only continue the run already there (or start in an empty
// directory); overwrite and --resume contradict each other. Also removes the temporary
// file of a checkpoint writer that was killed.
void prepare_output_dir(const ExperimentSpec& spec, const std::string& resume);

class RunLog {
 public:
  using Clock = std::chrono::steady_clock;

  RunLog(const ExperimentSpec& spec, std::ostream& log, bool root);

  // Rank 0: the header (placement, gradients, data, model, resume notes, the resolved
  // spec), spec.yaml, metrics.csv (a fresh one, or the resumed run's cut at its step)
  // and, with output.tensorboard, a new event file (earlier ones cut at the step too).
  void start(const Communicator& comm, const Backend<float>& be, const Placement& place, int threads,
             const Replica& replica, const TrainingData& data, const BatchPrep& batches, const ModelLayout& layout,
             const StepPlan& plan, const ResumePoint& resumed);
  // Rank 0: one line, below any epoch bar. warning() prefixes "warning: ".
  void line(const std::string& text);
  void warning(const std::string& text);

  // The training loop's clock (elapsed time, ETA) starts; `first_step` is where this job began.
  void begin_training(int64_t first_step, int64_t total_steps);
  void begin_epoch(int64_t epoch, int64_t per_epoch);  // the epoch bar (on a terminal)
  void batch_done(int64_t batches_done);
  void end_epoch();

  // This step's share of the interval: its losses and norm when it was applied, a
  // skipped step otherwise; `data_wait_s`: time spent getting batches ready for it.
  void count(const StepResult& r, int64_t global_rows, double data_wait_s);
  // Work that is not training (evaluation, pictures): the throughput figure leaves it out.
  template <class F>
  void untimed(F&& work) {
    clear_bar();
    const auto start = Clock::now();
    work();
    m_iv.start += Clock::now() - start;
  }
  // The interval ends at `state.step` (of 0-based `epoch`): a progress line and a
  // metrics.csv row (with the held-out metrics when `eval` is given), or a row of
  // empty losses when every step in it was skipped; the row's cells also go to
  // TensorBoard as scalars.
  void end_interval(const TrainState& state, int64_t epoch, double beta, double lr, const EvalResult* eval);
  double last_neg_elbo() const { return m_last_neg_elbo; }  // of the last progress line (all ranks)

  // Rank 0: an evaluation during training; its image grids go to output.dir/images
  // (and TensorBoard).
  void periodic_eval(int64_t step, const EvalResult& r, const ModelLayout& layout, Backend<float>& be,
                     const float* params, const data::ShardSet& test);
  // Collective: how much of the split streaming read per rank per epoch.
  void stream_summary(Communicator& comm, const data::StreamStats& mine, double epochs_run, double split_bytes);
  // Rank 0: model.h5 from host parameters (the moving average, with the raw
  // parameters in `extras`, under optim.ema).
  void write_model(const std::string& path, const std::vector<int>& input_shape, const ModelLayout& layout,
                   const float* host_params, int64_t step, int64_t epoch, const ModelFileExtras& extras = {});
  // Rank 0: output.dir/best.h5, the model file of the evaluation at `state.best_step`
  // (its bound in `extras`), replacing the previous best; `previous` is the state before
  // this evaluation, for the log line.
  void write_best(const std::vector<int>& input_shape, const ModelLayout& layout, const float* host_params,
                  const TrainState& state, const TrainState& previous, const ModelFileExtras& extras);
  // Rank 0: the final evaluation's line, eval.yaml and output.dir's image grids (in
  // TensorBoard at `step`, the last one trained).
  void final_eval(int64_t step, const EvalResult& r, const std::string& model_path, const ModelLayout& layout,
                  Backend<float>& be, const float* params, const data::ShardSet& test);

 private:
  // Interval statistics for the progress line, summed over the global batch.
  struct Interval {
    double rec = 0, kl = 0, samples = 0, grad_norm = 0;
    double kl_clamped_dims = 0;  // free bits: summed over the applied steps
    double iw_bound = 0;         // loss.type iwae: the bound's sum over the applied steps' samples
    std::vector<double> kl_groups;  // hierarchical: each group's KL sum over the applied steps' samples
    int64_t steps = 0;
    int64_t skipped = 0;  // steps dropped by train.on_nonfinite: skip
    double data_s = 0;    // rank 0's time spent getting batches ready (the step waits for it)
    Clock::time_point start = Clock::now();
  };
  void clear_bar();
  void write_row(const std::string& row);  // metrics.csv and TensorBoard, flushed

  const ExperimentSpec& m_spec;
  std::ostream& m_log;
  const bool m_root;
  std::ofstream m_csv;
  std::unique_ptr<viz::EventWriter> m_tb;  // rank 0, output.tensorboard
  std::optional<Progress> m_bar;
  Interval m_iv;
  Clock::time_point m_t0 = Clock::now();
  int64_t m_first_step = 0, m_total_steps = 0;
  double m_last_neg_elbo = 0;
  int m_latent_values = 0;  // latent values per sample (the free-bits note's denominator)
  // Bits/dim for a likelihood of 8-bit pixels (EvalResult::dim): D, or 0 for the
  // others, whose log lines and metrics.csv columns stay as they were.
  int m_bpd_dim = 0;
  std::string m_header;  // metrics.csv's columns for this run
};

}  // namespace elbo
