// ZeRO stage 1's partition of the flat buffer (plan_shards): every element of every
// bucket has exactly one owner, parts are contiguous, in rank order and differ by at
// most one element; a rank's owned ranges are increasing and merged; one rank owns
// everything as a single range; packing and unpacking a slice are inverse.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "elbo/dist/grad_sync.hpp"

namespace elbo {
namespace {

TEST(ShardPlan, EveryElementHasExactlyOneOwnerAndPartsAreBalancedPerBucket) {
  for (size_t n : {size_t{1}, size_t{2}, size_t{10}, size_t{1009}, size_t{102816}}) {
    for (size_t b : {size_t{0}, size_t{1}, size_t{3}, size_t{250}, size_t{1000}, size_t{250000}}) {
      for (int N : {1, 2, 3, 4, 7}) {
        const ShardPlan plan = plan_shards(n, b, N);
        ASSERT_EQ(plan.buckets, plan_buckets(n, b)) << "the reduce-scatter follows the all-reduce's buckets";
        std::vector<int> owner(n, -1);
        size_t total = 0;
        for (size_t k = 0; k < plan.buckets.size(); ++k) {
          const BucketRange& bucket = plan.buckets[k];
          size_t at = bucket.begin, smallest = bucket.size(), largest = 0;
          for (int r = 0; r < N; ++r) {
            const BucketRange p = plan.part(k, r);
            EXPECT_EQ(p.begin, at) << "parts tile the bucket in rank order (n " << n << ", bucket " << k << ")";
            at = p.end;
            smallest = std::min(smallest, p.size());
            largest = std::max(largest, p.size());
            for (size_t i = p.begin; i < p.end; ++i) {
              ASSERT_EQ(owner[i], -1) << "element " << i << " has two owners";
              owner[i] = r;
            }
          }
          EXPECT_EQ(at, bucket.end);
          EXPECT_LE(largest - smallest, 1u) << "parts of a bucket differ by at most one element";
        }
        for (size_t i = 0; i < n; ++i) ASSERT_NE(owner[i], -1) << "element " << i << " has no owner";
        for (int r = 0; r < N; ++r) {
          const std::vector<BucketRange> mine = plan.owned(r);
          size_t elems = 0;
          for (size_t j = 0; j < mine.size(); ++j) {
            EXPECT_GT(mine[j].size(), 0u);
            if (j > 0) EXPECT_LT(mine[j - 1].end, mine[j].begin) << "increasing, adjacent ranges merged";
            for (size_t i = mine[j].begin; i < mine[j].end; ++i) ASSERT_EQ(owner[i], r);
            elems += mine[j].size();
          }
          EXPECT_EQ(elems, plan.owned_elems(r));
          total += elems;
        }
        EXPECT_EQ(total, n);
        if (N == 1) {
          ASSERT_EQ(plan.owned(0).size(), 1u);
          EXPECT_EQ(plan.owned(0)[0], (BucketRange{0, n})) << "one rank: the slice is the whole buffer";
        }
        // The optimizer's share: within one element per bucket of n / N.
        for (int r = 0; r < N; ++r)
          EXPECT_LE(plan.owned_elems(r), n / static_cast<size_t>(N) + plan.buckets.size());
      }
    }
  }
}

TEST(ShardPlan, SmallBucketsLeaveSomeRanksWithoutAPart) {
  const ShardPlan plan = plan_shards(5, 2, 3);  // buckets [3,5), [1,3), [0,1)
  ASSERT_EQ(plan.buckets.size(), 3u);
  EXPECT_EQ(plan.part(0, 0), (BucketRange{3, 4}));
  EXPECT_EQ(plan.part(0, 1), (BucketRange{4, 5}));
  EXPECT_EQ(plan.part(0, 2).size(), 0u);
  EXPECT_EQ(plan.owned(0), (std::vector<BucketRange>{{0, 2}, {3, 4}}));  // [0,1) and [1,2) merge
  EXPECT_EQ(plan.owned(1), (std::vector<BucketRange>{{2, 3}, {4, 5}}));
  EXPECT_TRUE(plan.owned(2).empty());
  EXPECT_THROW(plan_shards(5, 2, 0), Error);
}

TEST(ShardPlan, PackAndUnpackAreInverse) {
  const size_t n = 1009;
  const ShardPlan plan = plan_shards(n, 100, 3);
  std::vector<float> flat(n), back(n, -1.0f);
  std::iota(flat.begin(), flat.end(), 0.0f);
  for (int r = 0; r < 3; ++r) {
    std::vector<float> packed(plan.owned_elems(r));
    pack_ranges(plan.owned(r), flat.data(), packed.data());
    EXPECT_EQ(packed.front(), static_cast<float>(plan.owned(r).front().begin));
    unpack_ranges(plan.owned(r), packed.data(), back.data());
  }
  EXPECT_EQ(back, flat);
}

}  // namespace
}  // namespace elbo
