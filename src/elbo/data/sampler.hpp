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

// data.shuffle: blocks, the locality-aware order a streaming reader can serve reading
// about 1/N of the split per rank with a bounded cache (in the spirit of MosaicML
// StreamingDataset's canonical nodes and shuffle blocks):
//   1. the split is cut into blocks of `block` consecutive samples, whose order is
//      permuted per (seed, epoch);
//   2. the samples, in that block order, are cut into kCanonicalStreams contiguous runs,
//      one per canonical stream, sized by the stream's share of a batch; inside each
//      run, samples are shuffled within windows of kShuffleWindow blocks' worth;
//   3. position p of a global batch of g rows draws the next sample of stream
//      floor(p * kCanonicalStreams / g) (an exhausted stream hands over to the next,
//      which happens only in the epoch's last batch or two).
// So the contiguous slice of rank r of N (N dividing kCanonicalStreams) draws only from
// its own streams, hence from its own blocks (plus at most the few blocks cut between
// two streams). A rank's working set is its streams' current windows: about
// (kCanonicalStreams / N) x (kShuffleWindow + 1) blocks. The order depends on
// (seed, epoch, n, batch_size, block) alone: never on the world size or the loader.
constexpr int kCanonicalStreams = 12;  // serves N = 1, 2, 3, 4, 6, 12 with disjoint blocks
constexpr int kShuffleWindow = 4;
// Samples per block: about 64 KiB of pixels (a fixed function of the sample shape, so
// that a resumed run computes the same blocks).
int64_t shuffle_block_samples(int64_t sample_bytes);
std::vector<int64_t> epoch_order_blocks(int64_t n, int64_t batch_size, int64_t block, uint64_t seed, int64_t epoch);

// How an epoch's order is made, from the spec and the split: global permutation,
// identity, or blocks.
struct OrderSpec {
  int64_t n = 0;
  int64_t batch_size = 1;
  uint64_t seed = 0;
  bool shuffle = true;
  bool blocks = false;  // data.shuffle: blocks
  int64_t block = 1;    // samples per block (blocks only)
};
std::vector<int64_t> epoch_order(const OrderSpec& o, int64_t epoch);

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
