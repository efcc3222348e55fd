// The streaming reader against the memory loader: the same rows for every rank and
// batch, for every order and world size 1, 2, 3; restarts mid-epoch; the bytes each rank
// reads with the block order; the cache bound.
#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>
#include <set>

#include "elbo/config/spec.hpp"
#include "elbo/data/stream.hpp"
#include "elbo/util/error.hpp"
#include "shard_test_util.hpp"

namespace elbo::data {
namespace {

namespace fs = std::filesystem;
using namespace elbo::data::testing;

struct Split {
  fs::path dir;
  IdxArray img;
  Split(uint32_t n, int shards) {
    static int counter = 0;
    dir = fs::temp_directory_path() / ("elbo_test_stream_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    img = random_images(n, 1, 32, 32, 11);  // 1 KiB samples: blocks of 64
    write_split((dir / "train").string(), "train", img, nullptr, shards, "synthetic", false);
  }
  ~Split() { fs::remove_all(dir); }
  std::string path() const { return (dir / "train").string(); }
};

OrderSpec order_of(int64_t n, int64_t B, const std::string& shuffle) {
  OrderSpec o;
  o.n = n;
  o.batch_size = B;
  o.seed = 5;
  o.shuffle = shuffle != "false";
  o.blocks = shuffle == "blocks";
  o.block = shuffle_block_samples(1024);
  return o;
}

TEST(BlockOrder, IsASeededPermutationThatKeepsRanksOnTheirOwnBlocks) {
  const int64_t n = 3000, B = 60, K = 64;
  auto a = epoch_order_blocks(n, B, K, 1, 0);
  EXPECT_EQ(a, epoch_order_blocks(n, B, K, 1, 0));
  EXPECT_NE(a, epoch_order_blocks(n, B, K, 1, 1));
  EXPECT_NE(a, epoch_order_blocks(n, B, K, 2, 0));
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> iota(n);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);
  // Each world size dividing the canonical streams: the ranks' blocks are (nearly) disjoint.
  for (int world : {2, 3, 4, 6}) {
    std::vector<std::set<int64_t>> blocks(world);
    for (int64_t g0 = 0; g0 < n; g0 += B) {
      const int64_t g = std::min(B, n - g0);
      for (int r = 0; r < world; ++r) {
        Slice sl = rank_slice(g, r, world);
        for (int64_t k = 0; k < sl.count; ++k) blocks[r].insert(a[g0 + sl.begin + k] / K);
      }
    }
    size_t total = 0;
    for (auto& s : blocks) total += s.size();
    const size_t nb = (n + K - 1) / K;
    EXPECT_LE(total, nb + nb / 4) << "world " << world << ": blocks read by several ranks";
  }
}

struct Case {
  std::string shuffle;
  int world;
};

class StreamVsMemory : public ::testing::TestWithParam<Case> {};

TEST_P(StreamVsMemory, SameRowsForEveryRankAndBatch) {
  const Case c = GetParam();
  Split s(1000, 3);
  ShardSet mem = ShardSet::open(s.path());
  const int64_t n = 990, B = 48;  // data.max_samples below the split; a short last batch
  const OrderSpec o = order_of(n, B, c.shuffle);
  const int64_t per_epoch = batches_per_epoch(n, B, false);
  std::vector<int64_t> seen(n, 0);
  for (int r = 0; r < c.world; ++r) {
    ShardSet set = ShardSet::open(s.path(), OpenOptions{false, r, c.world});
    StreamOptions so;
    so.order = o;
    so.rank = r;
    so.world = c.world;
    so.end_epoch = 2;
    so.cache_bytes = 256 << 10;
    StreamReader reader(set, so);
    std::vector<uint8_t> px(B * 1024), want(B * 1024);
    std::vector<int64_t> idx(B);
    for (int64_t e = 0; e < 2; ++e) {
      const std::vector<int64_t> order = epoch_order(o, e);
      for (int64_t b = 0; b < per_epoch; ++b) {
        const int64_t g = std::min(B, n - b * B);
        const Slice sl = rank_slice(g, r, c.world);
        ASSERT_EQ(reader.fetch(e, b, px.data(), idx.data()), sl.count);
        ASSERT_TRUE(std::equal(idx.begin(), idx.begin() + sl.count, order.begin() + b * B + sl.begin));
        mem.gather(std::span<const int64_t>(idx.data(), sl.count), want.data());
        ASSERT_TRUE(std::equal(px.begin(), px.begin() + sl.count * 1024, want.begin())) << "epoch " << e << " batch " << b;
        if (e == 0)
          for (int64_t k = 0; k < sl.count; ++k) ++seen[idx[k]];
      }
    }
    EXPECT_LE(reader.stats().cache_peak_bytes, so.cache_bytes);
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), n) << "every sample once per epoch over the ranks";
}

INSTANTIATE_TEST_SUITE_P(Orders, StreamVsMemory,
                         ::testing::Values(Case{"blocks", 1}, Case{"blocks", 2}, Case{"blocks", 3}, Case{"true", 1},
                                           Case{"true", 2}, Case{"true", 3}, Case{"false", 2}));

TEST(Stream, DropLastEndsTheEpochBeforeTheShortBatch) {
  Split s(300, 2);
  OrderSpec o = order_of(300, 64, "blocks");
  ShardSet mem = ShardSet::open(s.path());
  ShardSet set = ShardSet::open(s.path(), OpenOptions{false, 1, 2});
  StreamOptions so;
  so.order = o;
  so.rank = 1;
  so.world = 2;
  so.drop_last = true;
  so.end_epoch = 2;
  StreamReader reader(set, so);
  std::vector<uint8_t> px(32 * 1024), want(32 * 1024);
  std::vector<int64_t> idx(32);
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t k = 0; k < 4; ++k) {  // 4 full batches; the 44 samples left over are dropped
      ASSERT_EQ(reader.fetch(e, k, px.data(), idx.data()), 32);
      const std::vector<int64_t> order = epoch_order(o, e);
      ASSERT_TRUE(std::equal(idx.begin(), idx.end(), order.begin() + k * 64 + 32));
      mem.gather(idx, want.data());
      ASSERT_EQ(px, want);
    }
}

TEST(Stream, RestartsMidEpochAsIfUninterrupted) {
  Split s(700, 2);
  const OrderSpec o = order_of(700, 40, "blocks");
  ShardSet set = ShardSet::open(s.path(), OpenOptions{false, 0, 1});
  StreamOptions so;
  so.order = o;
  so.end_epoch = 3;
  std::vector<uint8_t> a(40 * 1024), b(40 * 1024);
  std::vector<int64_t> ia(40), ib(40);
  StreamReader whole(set, so), resumed(set, so);
  for (int64_t e = 0; e < 3; ++e)
    for (int64_t k = 0; k < batches_per_epoch(700, 40, false); ++k) {
      const int64_t rows = whole.fetch(e, k, a.data(), ia.data());
      if (e * 100 + k < 107) continue;  // the resumed reader starts at epoch 1, batch 7
      ASSERT_EQ(resumed.fetch(e, k, b.data(), ib.data()), rows);
      ASSERT_EQ(a, b) << e << " " << k;
      ASSERT_EQ(ia, ib);
    }
}

TEST(Stream, TwoRanksReadAboutHalfTheSplitWithinTheCache) {
  Split s(3072, 4);  // 3 MiB of pixels, 48 blocks of 64 samples
  const OrderSpec o = order_of(3072, 64, "blocks");
  const uint64_t split = 3072 * 1024, cap = 2 << 20;  // > 6 streams x 5 blocks of 64 KiB
  for (int r = 0; r < 2; ++r) {
    ShardSet set = ShardSet::open(s.path(), OpenOptions{false, r, 2});
    StreamOptions so;
    so.order = o;
    so.rank = r;
    so.world = 2;
    so.end_epoch = 2;
    so.cache_bytes = cap;
    StreamReader reader(set, so);
    std::vector<uint8_t> px(32 * 1024);
    std::vector<int64_t> idx(32);
    for (int64_t e = 0; e < 2; ++e)
      for (int64_t k = 0; k < 48; ++k) reader.fetch(e, k, px.data(), idx.data());
    const StreamStats st = reader.stats();
    EXPECT_LE(static_cast<double>(st.bytes_read) / 2, 0.6 * split) << "rank " << r << " per epoch";
    EXPECT_GE(static_cast<double>(st.bytes_read) / 2, 0.4 * split) << "rank " << r;
    EXPECT_LE(st.cache_peak_bytes, cap);
    EXPECT_GT(st.cache_peak_bytes, 0u);
    EXPECT_LE(st.reads, 2u * 30) << "whole blocks, not single samples";
  }
}

TEST(Stream, ACacheSmallerThanABlockStillServesExactRows) {
  Split s(500, 2);
  const OrderSpec o = order_of(500, 50, "blocks");
  ShardSet mem = ShardSet::open(s.path());
  ShardSet set = ShardSet::open(s.path(), OpenOptions{false, 0, 1});
  StreamOptions so;
  so.order = o;
  so.cache_bytes = 10 * 1024;  // less than one 64 KiB block
  StreamReader reader(set, so);
  std::vector<uint8_t> px(50 * 1024), want(50 * 1024);
  std::vector<int64_t> idx(50);
  for (int64_t k = 0; k < 10; ++k) {
    ASSERT_EQ(reader.fetch(0, k, px.data(), idx.data()), 50);
    mem.gather(idx, want.data());
    ASSERT_EQ(px, want);
  }
  EXPECT_EQ(reader.stats().cache_peak_bytes, 0u);
}

TEST(Stream, ResolveLoader) {
  EXPECT_EQ(resolve_loader(Loader::Auto, 1.0, 1 << 20), Loader::Memory);
  EXPECT_EQ(resolve_loader(Loader::Auto, 1.0, (1 << 20) + 1), Loader::Stream);
  EXPECT_EQ(resolve_loader(Loader::Memory, 1.0, int64_t{1} << 40), Loader::Memory);
  EXPECT_EQ(resolve_loader(Loader::Stream, 1e6, 10), Loader::Stream);
}

TEST(Stream, SpecKeysParseValidateAndDump) {
  const std::string base = "data: {train: d, ";
  ExperimentSpec s = parse_spec(base + "shuffle: blocks, loader: stream, cache_mb: 64}\n", "t.yaml");
  EXPECT_EQ(s.data.shuffle, Shuffle::Blocks);
  EXPECT_EQ(s.data.loader, Loader::Stream);
  EXPECT_EQ(s.data.cache_mb, 64.0);
  const std::string dumped = dump_spec(s);
  EXPECT_NE(dumped.find("shuffle: blocks"), std::string::npos) << dumped;
  ExperimentSpec again = parse_spec(dumped, "dump");
  EXPECT_EQ(again.data.shuffle, Shuffle::Blocks);
  EXPECT_EQ(again.data.loader, Loader::Stream);
  EXPECT_EQ(again.data.cache_mb, 64.0);
  ExperimentSpec d = parse_spec(base + "}\n", "t.yaml");
  EXPECT_EQ(d.data.loader, Loader::Auto);
  EXPECT_EQ(d.data.shuffle, Shuffle::Global);
  EXPECT_EQ(parse_spec(base + "shuffle: false}\n", "t.yaml").data.shuffle, Shuffle::Off);
  const auto error_of = [&](const std::string& yaml) {
    try {
      parse_spec(yaml, "t.yaml");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string e = error_of(base + "loader: disk}\n");
  EXPECT_NE(e.find("data.loader"), std::string::npos) << e;
  EXPECT_NE(e.find("auto, memory, stream"), std::string::npos) << e;
  e = error_of(base + "cache_mb: 0}\n");
  EXPECT_NE(e.find("data.cache_mb"), std::string::npos) << e;
  e = error_of(base + "shuffle: sometimes}\n");
  EXPECT_NE(e.find("data.shuffle: must be true (a global permutation), false or blocks"), std::string::npos) << e;
  EXPECT_NE(e.find("got 'sometimes'"), std::string::npos) << e;
  EXPECT_EQ(parse_spec(base + "shuffle: no}\n", "t.yaml").data.shuffle, Shuffle::Off);
}

}  // namespace
}  // namespace elbo::data
