// Epoch order, batch slicing and pixel conversion.
#include "elbo/data/sampler.hpp"

#include <algorithm>
#include <numeric>
#include <utility>

#include "elbo/util/philox.hpp"

namespace elbo::data {

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (!shuffle) return order;
  for (int64_t i = n - 1; i > 0; --i) {
    auto j = static_cast<int64_t>(philox_below(seed, RngStream::Shuffle, static_cast<uint32_t>(epoch),
                                               static_cast<uint32_t>(i), static_cast<uint64_t>(i + 1)));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

int64_t shuffle_block_samples(int64_t sample_bytes) {
  return std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(1, sample_bytes));
}

std::vector<int64_t> epoch_order_blocks(int64_t n, int64_t batch_size, int64_t block, uint64_t seed, int64_t epoch) {
  const int64_t nb = (n + block - 1) / block;
  const auto e = static_cast<uint32_t>(epoch);
  // Draw counters: [0, nb) permute the blocks, nb + position shuffles inside windows.
  std::vector<int64_t> blocks(static_cast<size_t>(nb));
  std::iota(blocks.begin(), blocks.end(), int64_t{0});
  for (int64_t i = nb - 1; i > 0; --i) {
    auto j = static_cast<int64_t>(philox_below(seed, RngStream::Shuffle, e, static_cast<uint32_t>(i),
                                               static_cast<uint64_t>(i + 1)));
    std::swap(blocks[static_cast<size_t>(i)], blocks[static_cast<size_t>(j)]);
  }
  // The samples in permuted block order, cut into one run per canonical stream. Stream c
  // supplies the positions p of a full batch with floor(p * C / B) == c, so its run is
  // sized in proportion: every stream lasts the whole epoch, and rank r of N (N dividing
  // C) reads the run of samples [about n r / N, n (r + 1) / N) of this sequence.
  std::vector<int64_t> seq;
  seq.reserve(static_cast<size_t>(n));
  for (int64_t k : blocks)
    for (int64_t i = k * block; i < std::min(n, (k + 1) * block); ++i) seq.push_back(i);
  const int C = kCanonicalStreams;
  const auto first_position = [&](int c) { return (static_cast<int64_t>(c) * batch_size + C - 1) / C; };
  std::vector<std::vector<int64_t>> streams(C);
  const int64_t window = kShuffleWindow * block;
  for (int c = 0; c < C; ++c) {
    const int64_t s0 = n * first_position(c) / batch_size, s1 = n * first_position(c + 1) / batch_size;
    std::vector<int64_t>& s = streams[c];
    s.assign(seq.begin() + s0, seq.begin() + s1);
    // Shuffled inside windows; the draws' counters follow the position in seq.
    for (int64_t w = 0; w < static_cast<int64_t>(s.size()); w += window) {
      const int64_t len = std::min(window, static_cast<int64_t>(s.size()) - w);
      for (int64_t i = len - 1; i > 0; --i) {
        auto j = static_cast<int64_t>(philox_below(seed, RngStream::Shuffle, e,
                                                   static_cast<uint32_t>(nb + s0 + w + i), static_cast<uint64_t>(i + 1)));
        std::swap(s[static_cast<size_t>(w + i)], s[static_cast<size_t>(w + j)]);
      }
    }
  }
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(n));
  std::vector<size_t> next(C, 0);
  for (int64_t g0 = 0; g0 < n; g0 += batch_size) {
    const int64_t g = std::min(batch_size, n - g0);
    for (int64_t p = 0; p < g; ++p) {
      int c = static_cast<int>(p * C / g);
      while (next[c] == streams[c].size()) c = (c + 1) % C;  // some stream has samples left: n - order.size() > 0
      order.push_back(streams[c][next[c]++]);
    }
  }
  return order;
}

std::vector<int64_t> epoch_order(const OrderSpec& o, int64_t epoch) {
  if (o.shuffle && o.blocks) return epoch_order_blocks(o.n, o.batch_size, o.block, o.seed, epoch);
  return epoch_order(o.n, o.seed, epoch, o.shuffle);
}

int64_t batches_per_epoch(int64_t n, int64_t batch_size, bool drop_last) {
  return drop_last ? n / batch_size : (n + batch_size - 1) / batch_size;
}

Slice rank_slice(int64_t rows, int rank, int world) {
  int64_t base = rows / world, extra = rows % world;
  Slice s;
  s.count = base + (rank < extra ? 1 : 0);
  s.begin = rank * base + std::min<int64_t>(rank, extra);
  return s;
}

template <class T>
void pixels_to_input(const uint8_t* pixels, const int64_t* dataset_index, int64_t rows, int64_t dim,
                     bool binarize, uint64_t seed, uint32_t epoch, T* out) {
  const T scale = T(1) / T(255);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = pixels + r * dim;
    T* o = out + r * dim;
    if (!binarize) {
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(p[d]) * scale;
      continue;
    }
    auto item = static_cast<uint32_t>(dataset_index[r]);
    for (int64_t d = 0; d < dim; d += 4) {
      Philox4 blk = philox_block(seed, RngStream::Binarize, epoch, item, static_cast<uint32_t>(d / 4));
      for (int64_t k = 0; k < 4 && d + k < dim; ++k) {
        double u = static_cast<double>(blk.v[k]) * (1.0 / 4294967296.0);
        o[d + k] = u < static_cast<double>(p[d + k]) / 255.0 ? T(1) : T(0);
      }
    }
  }
}

template void pixels_to_input<float>(const uint8_t*, const int64_t*, int64_t, int64_t, bool, uint64_t, uint32_t,
                                     float*);
template void pixels_to_input<double>(const uint8_t*, const int64_t*, int64_t, int64_t, bool, uint64_t,
                                      uint32_t, double*);

}  // namespace elbo::data
