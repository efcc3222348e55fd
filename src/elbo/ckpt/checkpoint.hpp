// Training checkpoints: everything needed to continue a run bit-exactly, in HDF5
// that h5py reads like a PyTorch state_dict. Parameters sit under /params/<name>
// (as in model.h5), Adam's moments under /optim/exp_avg/<name> and
// /optim/exp_avg_sq/<name>, the parameters' moving average (optim.ema) under
// /optim/ema/<name>; the loop position, counters, world size and resolved spec
// are attributes. A checksum over all arrays catches silent corruption; truncation
// fails the HDF5 open. Files are written to a temporary name, fsynced, renamed, and
// the directory fsynced: a crash at any instant leaves the previous checkpoint valid.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "elbo/config/spec.hpp"
#include "elbo/model/model.hpp"

namespace elbo {

// Where the loop stands after `step` optimizer steps. The sample order, every eps
// and every binarization draw are functions of (seed, epoch, step, position), so
// these counters are the whole RNG state.
struct TrainState {
  int64_t step = 0;            // steps completed (optimizer updates plus skipped steps)
  int64_t epoch = 0;           // epoch of the next step
  int64_t batch_in_epoch = 0;  // index of the next batch inside that epoch
  int64_t samples_seen = 0;
  int64_t adam_steps = 0;      // Adam's bias-correction counter (skipped steps excluded)
  int64_t skipped_steps = 0;   // steps dropped by train.on_nonfinite: skip
  int64_t total_steps = 0;     // the planned run length when written (LR schedule horizon)
  int64_t world_size = 1;
  int64_t train_samples = 0;   // the epoch order is a permutation of this many samples
  uint64_t seed = 0;
  // The best held-out bound of the evaluations during training (eval.every) so far, the
  // step it was reached at (-1: none yet; its parameters are best.h5) and the
  // evaluations since then without a better one (train.patience counts them). Kept so
  // that a resumed run makes the same best.h5 and early-stopping decisions.
  double best_bound = 0;
  int64_t best_step = -1;
  int64_t evals_since_best = 0;
};

struct Checkpoint {
  std::string path;
  ExperimentSpec spec;           // the resolved spec of the run that wrote it
  std::vector<int> input_shape;  // [C, H, W]
  std::vector<float> params, exp_avg, exp_avg_sq;  // flat, layout order
  std::vector<float> ema;  // the parameters' moving average (optim.ema); empty when the run kept none
  TrainState state;
};

// `ema` (may be null: no moving average) goes to /optim/ema/<name> and into the checksum
// after the other arrays; without it the file is what it was before EMA existed.
void write_checkpoint(const std::string& path, const ExperimentSpec& spec, const std::vector<int>& input_shape,
                      const ModelLayout& layout, const float* params, const float* exp_avg, const float* exp_avg_sq,
                      const float* ema, const TrainState& state);

// Reads and verifies one checkpoint (format, version, shapes, checksum); every
// problem is a Model error naming the file.
Checkpoint read_checkpoint(const std::string& path);

// "ckpt-000000100.h5" for step 100: names sort by step.
std::string checkpoint_file_name(int64_t step);
// Checkpoint files in `dir`, newest (highest step) first.
std::vector<std::string> list_checkpoints(const std::string& dir);
// Writes DIR/latest (the newest file's name) atomically and removes all but the
// newest `keep` checkpoints (keep <= 0 keeps all).
void publish_checkpoint(const std::string& dir, const std::string& file_name, int keep);

// The newest (highest step) checkpoint in `dir` that reads and verifies, whatever
// `latest` says. Each one skipped is described in `skipped` (file and reason), so
// the caller can say that it fell back. Returns false when none is usable.
bool find_resume_checkpoint(const std::string& dir, Checkpoint* out, std::vector<std::string>* skipped);

// Spec keys that may not change on resume because they change the model or the
// sample/eps sequence; throws a Config error naming the first such key (with both
// values). Returns the compatible changes as "key: old -> new" for the log.
std::vector<std::string> check_resume_compatible(const ExperimentSpec& stored, const ExperimentSpec& now,
                                                 const std::string& checkpoint_path);

}  // namespace elbo
