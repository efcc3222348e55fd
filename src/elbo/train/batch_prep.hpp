// Where a step's batch comes from: the training (and test) splits opened and checked
// by all ranks, the epoch order, and BatchPrep, which turns (epoch, batch) into this
// rank's rows of model input in pinned memory, one batch ahead. Kept apart from the
// loop (issue 14) so that the loop only says "batch b of epoch e".
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/data/sampler.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/data/stream.hpp"
#include "elbo/dist/comm.hpp"

namespace elbo {

// The splits of one run. Not movable once BatchPrep reads from it (the stream reader
// holds a reference to the training set).
struct TrainingData {
  std::optional<data::ShardSet> train;
  std::optional<data::ShardSet> test;  // only when the run evaluates (eval.at_end or eval.every)
  Loader train_loader = Loader::Memory;  // data.loader resolved for the training split: Memory or Stream
  std::vector<int> input_shape;        // [C, H, W]
  int64_t n = 0;                       // samples trained on: the split, or its first data.max_samples
  int dim = 0;                         // values per sample (C*H*W)
};

// Opens the splits on every rank and checks them against the spec and each other
// (shapes, an empty split, train.drop_last with too few samples); a failure on any
// rank is agreed by all (collectively) and thrown everywhere. `data` must be empty.
void open_training_data(const ExperimentSpec& spec, Communicator& comm, TrainingData& data);

// The epoch order of the training samples (data/sampler.hpp): a function of the spec,
// the sample count and the sample size only, never of the world size.
data::OrderSpec training_order(const ExperimentSpec& spec, int64_t n, int dim);

// The host side of a batch: dataset indices -> pixels -> model input in pinned
// memory, for this rank's slice. Two buffers, so that the next batch is prepared while
// the device still runs the current one (its upload reads the other buffer). With
// data.loader stream it owns the reader that hands over this rank's rows.
class BatchPrep {
 public:
  BatchPrep(Backend<float>& be, const TrainingData& data, const ExperimentSpec& spec, int rank, int world,
            int local_rows);

  struct Batch {
    const float* x = nullptr;  // (rows, dim) in pinned memory
    int rows = 0;              // this rank's rows
    int64_t global_rows = 0;   // the whole batch's (the last one of an epoch may be short)
    int64_t first = 0;         // this rank's first row's position in the global batch
  };

  // Batch b of `epoch` (prepared now unless prefetched).
  Batch get(int64_t epoch, int64_t b);
  // Prepares batch b of `epoch` into the buffer get() did not just hand out.
  void prefetch(int64_t epoch, int64_t b);

  // Seconds spent in get() and prefetch() since the last call (the "data wait" of
  // the progress lines: the step waits for both).
  double take_busy_seconds();

  const data::OrderSpec& order() const { return m_order; }
  data::StreamReader* stream() const { return m_stream.get(); }  // nullptr with data.loader memory

 private:
  struct Buf {
    std::unique_ptr<HostBuffer<float, float>> host;
    int64_t epoch = -1, batch = -1;
    Batch batch_info;
  };

  const std::vector<int64_t>& epoch_order(int64_t epoch);
  Buf& fill(Buf& buf, int64_t epoch, int64_t b);

  const data::ShardSet& m_set;
  const ExperimentSpec& m_spec;
  data::OrderSpec m_order;
  std::unique_ptr<data::StreamReader> m_stream;
  int64_t m_n;
  int m_rank, m_world, m_dim;
  std::vector<uint8_t> m_pixels;
  std::vector<int64_t> m_idx;
  Buf m_bufs[2];
  Buf* m_last = nullptr;
  std::pair<int64_t, std::vector<int64_t>> m_orders[2] = {{-1, {}}, {-2, {}}};
  double m_busy_s = 0;
};

}  // namespace elbo
