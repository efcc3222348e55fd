// What a run needs before it starts: its step count, computed without overflow, and an
// estimate of its memory, so that an impossible spec is refused up front with the keys
// to change (instead of training 0 steps, or ending in std::bad_alloc).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

struct StepPlan {
  int64_t per_epoch = 0;  // batches per epoch
  int64_t total = 0;      // steps of the run: per_epoch x train.epochs, capped by train.max_steps
};

// Throws a config error naming train.epochs, train.batch_size and train.max_steps when the
// run's step or sample count does not fit in 64 bits (a huge train.epochs with a
// train.max_steps cap is fine), or a rank's share of the batch exceeds what one pass
// holds (2^31 - 1 rows).
StepPlan plan_steps(const ExperimentSpec& spec, int64_t train_samples, int world = 1);

struct MemoryItem {
  std::string what;     // "activations for 64 rows"
  std::string keys;     // the spec keys that size it, for the message
  double bytes = 0;     // double: the estimate of an absurd spec must not overflow itself
  bool device = true;   // in the backend's memory (host memory for the CPU backend); else host
};

struct MemoryEstimate {
  // estimate_train_memory's first two items, for allocating(): the state that scales
  // with the model, the activations that scale with the batch.
  static constexpr size_t kModelState = 0, kActivations = 1;
  std::vector<MemoryItem> items;
  double device_bytes() const;
  double host_bytes() const;
  // Bytes in this process's RAM: everything for the CPU backend, the host items otherwise.
  double host_total(DeviceKind device) const { return device == DeviceKind::Cpu ? device_bytes() + host_bytes() : host_bytes(); }
};

// Activations of a Vae<float> for `rows` samples (per layer, z, losses, the activation
// gradients), as Vae's constructor allocates them; with iw_samples k > 0 the decoder's
// side holds rows * k samples, plus the importance-weighted passes' buffers.
double vae_activation_bytes(const VaeLayout& layout, int64_t rows, int iw_samples = 0);

// One training replica with `rows_per_rank` rows of each global batch: parameters,
// gradients and Adam's two moments (4 x P floats; the moments of 1/optimizer_shards of
// the parameters with dist.shard_optimizer), the activations, the inputs and eps, the
// host batch buffers, the host copies of the state for checkpoints and resume, and the
// CPU convolution scratch. With accumulation the model's buffers hold one micro-batch
// of `micro_rows` rows (0: all rows_per_rank in one pass); iw_samples as above (loss.type iwae).
MemoryEstimate estimate_train_memory(const VaeLayout& layout, int64_t rows_per_rank, DeviceKind device,
                                     int optimizer_shards = 1, int64_t micro_rows = 0, int iw_samples = 0);

// The parameters' moving average (optim.ema): one more (num_params) buffer in the
// backend's memory, and its host copies for checkpoints and resume.
MemoryItem ema_memory(const VaeLayout& layout);
void add_ema_memory(MemoryEstimate& est, const VaeLayout& layout);

// Evaluation's buffers on a rank holding `rank_samples` test samples (see evaluate()).
// `keys` names what sizes them (eval.batch_size/eval.iw_samples or the CLI options).
void add_eval_memory(MemoryEstimate& est, const VaeLayout& layout, int64_t rank_samples, int iw_samples,
                     int64_t batch_size, const std::string& keys);

// Memory one rank may use: the machine's physical memory (or the cgroup limit, when
// lower), shared by the ranks on the node. 0 when unknown.
double host_memory_per_rank(int local_ranks);

// Throws a config error (naming `source`, the largest items, their keys, the total and
// the limit) when the run's host memory exceeds `host_limit` bytes (0 = unknown: no check).
void check_memory(const MemoryEstimate& need, DeviceKind device, double host_limit, const std::string& source);

// "1.5 GB", "12 MB": decimal units, as free(1) -h does not, but as everyone reads them.
std::string format_bytes(double bytes);

// Runs make() (a constructor that allocates) and turns an allocation failure into a config
// error naming the buffer, its size and the keys that size it, instead of std::bad_alloc.
template <class F>
auto allocating(const MemoryItem& item, const std::string& source, F&& make) -> decltype(make()) {
  std::string why;
  try {
    return make();
  } catch (const std::bad_alloc&) {
    why = "out of memory";
  } catch (const Error& e) {
    why = e.what();
  }
  throw config_error(source + ": cannot allocate the " + item.what + " (" + format_bytes(item.bytes) + "; " +
                     why + "); reduce " + item.keys);
}

}  // namespace elbo
