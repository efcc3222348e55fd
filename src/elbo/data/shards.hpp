// The shard format written by elbo-shard and read by training and evaluation:
//   DIR/manifest.yaml                    split, sample count and shape, shard list
//   DIR/shard-00000-of-00004.h5 ...      images uint8 (n, C, H, W) [+ labels uint8 (n)]
// Shard i holds the contiguous global range [global_offset, global_offset + n).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "elbo/data/idx.hpp"

namespace elbo::data {

struct ShardInfo {
  std::string file;  // name relative to the split directory
  int64_t offset = 0;
  int64_t num_samples = 0;
};

class ShardSet {
 public:
  // Opens a split directory (or its manifest.yaml), validates every shard against
  // the manifest and loads the pixels. Errors are Data errors naming the file.
  static ShardSet open(const std::string& dir_or_manifest);

  int64_t size() const { return m_size; }
  int channels() const { return m_shape[0]; }
  int height() const { return m_shape[1]; }
  int width() const { return m_shape[2]; }
  int64_t sample_dim() const { return int64_t(m_shape[0]) * m_shape[1] * m_shape[2]; }
  const std::string& split() const { return m_split; }
  const std::string& path() const { return m_dir; }
  const std::vector<ShardInfo>& shards() const { return m_shards; }
  bool has_labels() const { return !m_labels.empty(); }
  const uint8_t* labels() const { return m_labels.data(); }

  // Copies the pixels of the given global indices, sample_dim() bytes each, in order.
  // The sets elbo targets (MNIST-like) are held in memory; this is the seam where a
  // streaming reader would go.
  void gather(std::span<const int64_t> global_indices, uint8_t* out) const;

 private:
  std::string m_dir, m_split;
  int64_t m_size = 0;
  int m_shape[3] = {0, 0, 0};
  std::vector<ShardInfo> m_shards;
  std::vector<uint8_t> m_pixels;  // (size, C, H, W)
  std::vector<uint8_t> m_labels;
};

// Writes `images` (n, H, W) or (n, C, H, W) [and labels (n)] as `num_shards` shards
// plus manifest.yaml into `dir`. Each file is written under a temporary name and
// renamed; the manifest goes last, so a crash never leaves a readable partial split.
// Defined in shard_writer.cpp, which has the general writer (any SampleSource).
void write_split(const std::string& dir, const std::string& split, const IdxArray& images, const IdxArray* labels,
                 int num_shards, const std::string& source, bool overwrite);

}  // namespace elbo::data
