// One data-parallel replica: the flat parameter and gradient buffers, the model, the
// optimizer, the gradient sync, the host staging buffers and the recorded step graph.
// step() is one training step of this rank; all ranks call it in lockstep. Kept apart
// from the loop (issue 14) so that the loop reads as the algorithm and the update has
// one seam (sync_and_update) where a sharded optimizer fits. The skip policy for
// steps that were not applied lives here too.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/dist/grad_sync.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/model/hvae.hpp"
#include "elbo/model/model.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/optim/adam.hpp"
#include "elbo/optim/kl.hpp"
#include "elbo/train/batch_prep.hpp"
#include "elbo/train/footprint.hpp"

namespace elbo {

// What all ranks agree on after one step (the same on every rank, except nonfinite_here).
struct StepResult {
  double rec = 0, kl = 0;        // loss sums over the global batch
  double iw_bound = 0;           // loss.type iwae: the importance-weighted bound's sum (at the step's beta)
  int nonfinite_ranks = 0;       // ranks whose loss was not finite
  bool nonfinite_here = false;   // this rank is one of them
  int stop_ranks = 0;            // ranks asked to stop before this step
  double grad_norm = std::numeric_limits<double>::quiet_NaN();  // before clipping; NaN: a loss not finite
  bool over_threshold = false;   // grad_norm > train.skip_threshold (on some rank, so on all): not applied
  int kl_clamped_dims = -1;      // free bits: latent dimensions whose group sat at its floor; -1: off
  std::vector<double> kl_groups;  // hierarchical: each latent group's KL sum over the global batch; empty otherwise
  // Whether the update was applied (finite losses on every rank, a finite gradient
  // norm, not over train.skip_threshold).
  bool applied() const { return nonfinite_ranks == 0 && std::isfinite(grad_norm) && !over_threshold; }
};

class Replica {
 public:
  // Allocates the state (a failed allocation names its buffer and the keys from
  // `need`), sets up the gradient sync (collectively) and initialises the parameters
  // from spec.seed, broadcast from rank 0. `warn` reports what costs speed, not the
  // run (a step that cannot be recorded as a graph).
  Replica(const ExperimentSpec& spec, Communicator& comm, Backend<float>& be, const ModelLayout& layout,
          const Placement& place, const MemoryEstimate& need, int local_rows, int dim,
          std::function<void(const std::string&)> warn);
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  // One training step (one update) on this rank's slice of the global batch: forward
  // and backward into the flat gradient buffer, in train.accumulate micro-batches whose
  // gradients add up (the buckets' all-reduces overlapping the last one's backward),
  // then sync_and_update. With free bits (loss.free_bits > 0; one micro-batch) the
  // ranks' per-dimension KL sums are all-reduced between forward and backward, so that
  // the floor applies to the KL averaged over the global batch, as on one rank (a
  // hierarchical model's floors are per latent group: loss.free_bits x its elements).
  // `while_device_runs` is host work done while the device computes (preparing the next
  // batch); it runs only on a rank with rows this step.
  // `stop_requested` travels in the losses' all-reduce, so all ranks learn of it.
  StepResult step(const BatchPrep::Batch& batch, int64_t step, double beta, double lr, bool stop_requested,
                  const std::function<void()>& while_device_runs);

  size_t num_params() const { return m_n; }
  // Device memory, (num_params), complete (a sharded optimizer's all-gather finished).
  const float* params();
  int64_t adam_steps() const { return m_optim.steps_taken(); }
  // The state a checkpoint holds, as host copies of (num_params) values each, on rank
  // 0 (others pass nullptr). Collective: a sharded optimizer gathers its moments.
  void gather_state(float* params, float* exp_avg, float* exp_avg_sq);
  void download_params(float* params);
  // The state of a checkpoint (every rank passes the same values).
  void load_state(const float* params, const float* exp_avg, const float* exp_avg_sq, int64_t adam_steps);

  // The parameters' exponential moving average (optim.ema > 0; see update_ema). Kept
  // out of download_state/load_state so that the optimizer state's seam stays the
  // optimizer's alone.
  bool has_ema() const { return m_ema.size() > 0; }
  void download_ema(float* ema);    // (num_params) host values; only with has_ema()
  void load_ema(const float* ema);  // every rank passes the same values
  // What evaluation, image grids and model.h5 use: the moving average when there is
  // one, else the parameters (device memory, (num_params)).
  const float* eval_params() { return has_ema() ? m_ema.data() : params(); }

  std::string describe_gradient_sync() const { return m_sync->describe(); }
  GradientSync::Counts gradient_sync_counts() const { return m_sync->counts(); }
  // "adam, moments 2.61 MB per rank (sharded over 2 rank(s) ...)", for the log.
  std::string describe_optimizer() const;
  bool sharded() const { return m_sync->shard_plan() != nullptr; }
  bool uses_graph() const { return m_use_graph; }
  // The gradient buffer's all-reduce bandwidth (zeroes the gradients).
  AllreduceRate measure_allreduce(int iters);

 private:
  // The one place where the replicas' gradients become an update (see replica.cpp).
  // Fills result's grad_norm and over_threshold; `sums` are this rank's [rec, KL,
  // non-finite, stop, over threshold, IWAE bound] and after those kStepSums values any
  // other per-step sums (the hierarchical model's per-group KL), the sums over the
  // ranks on return.
  static constexpr size_t kStepSums = 6;
  void sync_and_update(double lr, std::vector<double>& sums, StepResult& result);
  // Free bits: every rank (also one without rows this step) joins the all-reduce of the
  // per-dimension (Vae) or per-group (Hvae) KL sums of the forward pass just run on `rows` rows; the result's
  // per-dimension weights (kl_weight where unclamped) go to m_kl_weights.
  FreeBits exchange_kl(int rows, int64_t global_rows, float kl_weight);
  // ema = d * ema + (1 - d) * params (d = optim.ema), after every applied update and
  // on every rank alike (the parameters are the same everywhere, so is their average).
  void update_ema();

  const ExperimentSpec& m_spec;
  Communicator& m_comm;
  Backend<float>& m_be;
  const int m_local_rows, m_dim;
  const int m_latent;                     // eps per sample of one pass (the Vae's latent dimensions)
  const size_t m_n;                       // parameters
  Buffer<float> m_params;                 // (m_n), the one flat parameter buffer
  Buffer<float> m_grads;                  // (m_n), the one flat gradient buffer
  std::unique_ptr<GradientSync> m_sync;   // reduces m_grads over the ranks
  const int m_micro_rows;                 // rows per pass: m_local_rows / train.accumulate
  std::unique_ptr<Model<float>> m_model;  // activations for m_micro_rows rows
  // The same model where its type matters: the Vae's importance-weighted passes and
  // per-dimension KL (free bits), the Hvae's per-group KL. Exactly one is set.
  Vae<float>* m_vae = nullptr;
  Hvae<float>* m_hvae = nullptr;
  Adam<float> m_optim;                    // moments (m_n) each, or this rank's slice when sharded
  Buffer<float> m_ema;                    // (m_n) with optim.ema > 0, else empty
  const bool m_iwae;                      // loss.type: iwae
  const int m_eps_cols;                   // eps per input: m_latent, times loss.samples for iwae
  Buffer<float> m_x, m_eps;               // (m_micro_rows, m_dim), (m_micro_rows, m_eps_cols)
  const bool m_free_bits;                 // loss.free_bits > 0
  Buffer<float>
      m_kl_weights;  // (kl_parts) free bits: the backward's KL weights, per Vae latent dimension or Hvae group
  std::vector<float> m_mulv_host;         // (m_local_rows, 2 m_latent) free bits: [mu | logvar] on the host
  // The per-sample losses come back in pinned memory: two copies, one wait.
  HostBuffer<float, float> m_losses;     // (3, m_local_rows): rec, KL, then the IWAE bound (iwae)
  HostBuffer<float, float> m_kl_groups;  // (m_local_rows, groups) hierarchical: per-group KL; else empty
  // With one rank the gradients are final when backward ends: their norm comes back
  // with the losses, and the optimizer step needs no wait of its own.
  const bool m_norm_with_losses;
  HostBuffer<double, float> m_squared_norm;  // (1)
  // The steady-state step recorded as a graph (train.cuda_graph).
  bool m_use_graph;
  bool m_steady_warm = false;             // a steady-state step has run op by op
  std::unique_ptr<CapturedWork> m_graph;  // recorded at the second steady-state step
  std::function<void(const std::string&)> m_warn;
};

// What a step whose update was not applied means. Over train.skip_threshold: skipped.
// A loss or the gradient not finite: train.on_nonfinite (abort ends the run; skip
// skips). Skipping goes on until the skips (of both kinds) show that the run is
// not learning (train.max_consecutive_skips in a row, or more than
// train.max_skip_fraction of this job's steps). Next to the step because it is the
// meaning of a StepResult that was not applied; the loop only asks.
class SkipPolicy {
 public:
  SkipPolicy(const TrainSpec& train, int64_t first_step, int64_t skipped_before)
      : m_train(train), m_first_step(first_step), m_skipped_before(skipped_before) {}

  void applied() { m_in_a_row = 0; }
  // Every rank calls it for the same steps (all see the same sums and the same reduced
  // gradient). Counts the skip in `st` (at the step just taken) and returns the
  // warning, or throws an AgreedError naming the first rank with a non-finite loss.
  std::string skip(Communicator& comm, const StepResult& r, TrainState& st);

 private:
  const TrainSpec& m_train;
  const int64_t m_first_step, m_skipped_before;
  int64_t m_in_a_row = 0;  // skipped steps since the last applied one
};

}  // namespace elbo
