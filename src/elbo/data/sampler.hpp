// The deterministic epoch order and the per-rank slicing of global batches. The
// order depends only on (seed, epoch); rank r of N takes a fixed contiguous slice
// of every global batch, so N ranks see exactly the samples one rank would.
#pragma once

#include <cstdint>
#include <vector>

namespace elbo::data {

// A permutation of [0, n) for `epoch` (identity when shuffle is off): Fisher-Yates
// driven by Philox keyed by (seed, epoch, position).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

int64_t batches_per_epoch(int64_t n, int64_t batch_size, bool drop_last);

// Rows [begin, begin + count) of a global batch of `rows` owned by `rank` of `world`.
// A short last batch is split as evenly as possible (the first rows % world ranks
// take one more row); some ranks may get zero rows.
struct Slice {
  int64_t begin = 0;
  int64_t count = 0;
};
Slice rank_slice(int64_t rows, int rank, int world);

// Pixels (uint8, 0..255) -> floats in [0, 1], or, with binarize, a Bernoulli draw
// per pixel keyed by (seed, epoch, dataset index, pixel) so it too is rank-independent.
template <class T>
void pixels_to_input(const uint8_t* pixels, const int64_t* dataset_index, int64_t rows, int64_t dim,
                     bool binarize, uint64_t seed, uint32_t epoch, T* out);

}  // namespace elbo::data
