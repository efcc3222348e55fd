// Epoch order, batch slicing and pixel conversion.
#include "elbo/data/sampler.hpp"

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
