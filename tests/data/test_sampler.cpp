// The epoch order and rank slicing: world-size independence is the invariant that
// makes N ranks equal to one rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "elbo/data/sampler.hpp"

namespace elbo::data {
namespace {

TEST(Sampler, EpochOrderIsASeededPermutation) {
  auto a = epoch_order(1000, 1, 0, true), b = epoch_order(1000, 1, 0, true);
  auto c = epoch_order(1000, 1, 1, true), d = epoch_order(1000, 2, 0, true);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> iota(1000);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);
  EXPECT_NE(a, iota);
  EXPECT_EQ(epoch_order(10, 1, 3, false), std::vector<int64_t>(iota.begin(), iota.begin() + 10));
}

TEST(Sampler, ShuffleIsRoughlyUniform) {
  // Position of element 0 over many epochs: each of 4 slots about 1/4 of the time.
  int counts[4] = {0, 0, 0, 0};
  for (int e = 0; e < 4000; ++e) {
    auto o = epoch_order(4, 9, e, true);
    counts[std::find(o.begin(), o.end(), 0) - o.begin()]++;
  }
  for (int c : counts) EXPECT_NEAR(c, 1000, 120);
}

TEST(Sampler, RankSlicesPartitionEveryBatchForAnyWorldSize) {
  for (int64_t rows : {1, 5, 12, 96, 128})
    for (int world : {1, 2, 3, 4, 7}) {
      int64_t next = 0;
      for (int r = 0; r < world; ++r) {
        Slice s = rank_slice(rows, r, world);
        EXPECT_EQ(s.begin, next) << rows << " rows, rank " << r << " of " << world;
        EXPECT_GE(s.count, rows / world);
        EXPECT_LE(s.count, rows / world + 1);
        next += s.count;
      }
      EXPECT_EQ(next, rows);
    }
}

TEST(Sampler, BatchesPerEpoch) {
  EXPECT_EQ(batches_per_epoch(60000, 128, false), 469);
  EXPECT_EQ(batches_per_epoch(60000, 128, true), 468);
  EXPECT_EQ(batches_per_epoch(256, 128, false), 2);
}

TEST(Sampler, BinarizationIsKeyedBySampleNotPosition) {
  std::vector<uint8_t> px = {0, 255, 128, 64, 200, 30};
  std::vector<int64_t> idx = {7, 8};
  std::vector<float> a(6), b(3), scaled(6);
  pixels_to_input<float>(px.data(), idx.data(), 2, 3, true, 1, 0, a.data());
  pixels_to_input<float>(px.data() + 3, idx.data() + 1, 1, 3, true, 1, 0, b.data());
  EXPECT_EQ(a[0], 0.0f);  // p = 0 never fires
  EXPECT_EQ(a[1], 1.0f);  // p = 1 always fires
  for (int i = 0; i < 3; ++i) EXPECT_EQ(a[3 + i], b[i]);
  for (float v : a) EXPECT_TRUE(v == 0.0f || v == 1.0f);
  pixels_to_input<float>(px.data(), idx.data(), 2, 3, false, 1, 0, scaled.data());
  EXPECT_FLOAT_EQ(scaled[2], 128.0f / 255.0f);
  // Mean of binarized draws approaches the pixel intensity.
  std::vector<uint8_t> grey(10000, 77);
  std::vector<int64_t> one = {3};
  std::vector<float> draws(10000);
  pixels_to_input<float>(grey.data(), one.data(), 1, 10000, true, 4, 2, draws.data());
  double m = 0;
  for (float v : draws) m += v;
  EXPECT_NEAR(m / 10000, 77.0 / 255.0, 0.015);
}

}  // namespace
}  // namespace elbo::data
