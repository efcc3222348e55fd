// BatchPrep against the definition of a batch: for world sizes 1, 2, 3, the memory and
// stream loaders and both shuffled orders, every rank's rows of every batch (the short
// last one too, across the epoch boundary, prefetched or not, and from a mid-epoch
// start as after a resume) are the model input of exactly those samples of the epoch
// order, binarized with (seed, epoch, dataset index); and preparing the next batch
// leaves the one in use alone.
#include <gtest/gtest.h>

#include <filesystem>
#include <ostream>
#include <span>
#include <unistd.h>

#include "../data/shard_test_util.hpp"
#include "elbo/backend/backend.hpp"
#include "elbo/train/batch_prep.hpp"

namespace elbo {
namespace {

namespace fs = std::filesystem;

struct Split {
  fs::path dir;
  Split() {
    dir = fs::temp_directory_path() / ("elbo_test_batch_prep_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    data::IdxArray img = data::testing::random_images(300, 1, 32, 32, 3);  // 1 KiB samples: blocks of 64
    data::write_split((dir / "train").string(), "train", img, nullptr, 3, "synthetic", false);
  }
  ~Split() { fs::remove_all(dir); }
  std::string path() const { return (dir / "train").string(); }
};

struct Case {
  Loader loader;
  Shuffle shuffle;  // Global or Blocks
  int world;
};
std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.loader << ", shuffle " << c.shuffle << ", " << c.world << " rank(s)";
}

class BatchPrepCase : public ::testing::TestWithParam<Case> {};

// The model input of batch b of `epoch`, all global rows: straight from the definition.
std::vector<float> expected_batch(const data::ShardSet& set, const data::OrderSpec& order, const ExperimentSpec& spec,
                                  int64_t epoch, int64_t b, int dim) {
  const std::vector<int64_t> o = data::epoch_order(order, epoch);
  const int64_t B = order.batch_size, g0 = b * B, g = std::min(B, order.n - g0);
  std::vector<uint8_t> px(static_cast<size_t>(g) * dim);
  set.gather(std::span<const int64_t>(o.data() + g0, g), px.data());
  std::vector<float> x(px.size());
  data::pixels_to_input<float>(px.data(), o.data() + g0, g, dim, spec.data.binarize, spec.seed,
                               static_cast<uint32_t>(epoch), x.data());
  return x;
}

TEST_P(BatchPrepCase, EveryRankGetsItsRowsOfEveryBatch) {
  const Case c = GetParam();
  Split s;
  ExperimentSpec spec;
  spec.seed = 7;
  spec.data.binarize = true;  // keyed by (seed, epoch, index): a wrong epoch or index shows
  spec.data.shuffle = c.shuffle;
  spec.data.cache_mb = 0.25;
  spec.train.batch_size = 48;
  spec.train.epochs = 2;
  const data::ShardSet whole = data::ShardSet::open(s.path());
  const int64_t n = 290;  // data.max_samples below the split: 6 full batches and one of 2 rows
  const int dim = static_cast<int>(whole.sample_dim());
  const data::OrderSpec order = training_order(spec, n, dim);
  const int64_t per_epoch = data::batches_per_epoch(n, spec.train.batch_size, false);
  ASSERT_EQ(per_epoch, 7);
  auto backend = make_backend<float>(DeviceKind::Cpu, 1, 0);
  const int local_rows = static_cast<int>(spec.train.batch_size / c.world);

  for (int r = 0; r < c.world; ++r) {
    // Three passes: the loop's pattern (prefetch the next batch, across the epoch
    // boundary), no prefetch at all, and a start at epoch 0 batch 5 (a resume).
    for (int pass = 0; pass < 3; ++pass) {
      TrainingData d;
      d.train.emplace(data::ShardSet::open(s.path(), data::OpenOptions{c.loader == Loader::Memory, r, c.world}));
      d.train_loader = c.loader;
      d.n = n;
      d.dim = dim;
      BatchPrep prep(*backend, d, spec, r, c.world, local_rows);
      EXPECT_EQ(prep.stream() != nullptr, c.loader == Loader::Stream);
      for (int64_t e = 0; e < spec.train.epochs; ++e) {
        for (int64_t b = (pass == 2 && e == 0) ? 5 : 0; b < per_epoch; ++b) {
          const BatchPrep::Batch got = prep.get(e, b);
          const std::vector<float> want = expected_batch(whole, order, spec, e, b, dim);
          const int64_t g = static_cast<int64_t>(want.size()) / dim;
          const data::Slice sl = data::rank_slice(g, r, c.world);
          ASSERT_EQ(got.global_rows, g);
          ASSERT_EQ(got.rows, sl.count) << "rank " << r << " epoch " << e << " batch " << b;
          ASSERT_EQ(got.first, sl.begin);
          ASSERT_TRUE(std::equal(got.x, got.x + sl.count * dim, want.begin() + sl.begin * dim))
              << "rank " << r << " of " << c.world << ", epoch " << e << " batch " << b << ", pass " << pass;
          const bool last = b + 1 == per_epoch;
          if (pass != 1 && !(last && e + 1 == spec.train.epochs)) {
            prep.prefetch(last ? e + 1 : e, last ? 0 : b + 1);
            // The device may still be reading this batch: preparing the next must not touch it.
            ASSERT_TRUE(std::equal(got.x, got.x + sl.count * dim, want.begin() + sl.begin * dim))
                << "prefetch overwrote the batch in use: rank " << r << ", epoch " << e << " batch " << b;
          }
        }
      }
      EXPECT_GE(prep.take_busy_seconds(), 0.0);
      EXPECT_EQ(prep.take_busy_seconds(), 0.0) << "taking the time resets it";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Loaders, BatchPrepCase,
                         ::testing::Values(Case{Loader::Memory, Shuffle::Global, 1},
                                           Case{Loader::Memory, Shuffle::Global, 3},
                                           Case{Loader::Memory, Shuffle::Blocks, 2},
                                           Case{Loader::Stream, Shuffle::Blocks, 1},
                                           Case{Loader::Stream, Shuffle::Blocks, 2},
                                           Case{Loader::Stream, Shuffle::Blocks, 3},
                                           Case{Loader::Stream, Shuffle::Global, 2}));

}  // namespace
}  // namespace elbo
