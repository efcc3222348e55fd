// The shard format written by elbo-shard and read by training and evaluation:
//   DIR/manifest.yaml                    split, sample count and shape, shard list
//   DIR/shard-00000-of-00004.h5 ...      images uint8 (n, C, H, W) [+ labels uint8 (n)]
// Shard i holds the contiguous global range [global_offset, global_offset + n).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "elbo/data/idx.hpp"

namespace elbo::data {

struct ShardInfo {
  std::string file;  // name relative to the split directory
  int64_t offset = 0;
  int64_t num_samples = 0;
  std::string checksum;  // "fnv1a64:<16 hex>" over images then labels bytes; "" when the manifest has none
};

struct OpenOptions {
  // true: every rank holds the whole split in memory (data.loader: memory) and verifies
  // every shard's checksum while loading it. false: only the metadata is held; pixels
  // are read from the files on demand, and this rank verifies the shards i with
  // i % world == rank, so that the ranks together check every file once per run.
  bool load = true;
  int rank = 0, world = 1;
};

// The pixel bytes of a split (num_samples x C x H x W from its manifest), or -1 when the
// manifest cannot be read (ShardSet::open then says why).
int64_t split_bytes(const std::string& dir_or_manifest);

class ShardSet {
 public:
  // Opens a split directory (or its manifest.yaml), validates every shard against
  // the manifest (shape, stored type uint8, offset, checksum) and loads the pixels
  // unless options.load is false. Errors are Data errors naming the file.
  static ShardSet open(const std::string& dir_or_manifest, const OpenOptions& options = {});

  int64_t size() const { return m_size; }
  int channels() const { return m_shape[0]; }
  int height() const { return m_shape[1]; }
  int width() const { return m_shape[2]; }
  std::vector<int> shape() const { return {m_shape[0], m_shape[1], m_shape[2]}; }  // [C, H, W]
  int64_t sample_dim() const { return int64_t(m_shape[0]) * m_shape[1] * m_shape[2]; }
  int64_t bytes() const { return m_size * sample_dim(); }
  const std::string& split() const { return m_split; }
  const std::string& path() const { return m_dir; }
  const std::vector<ShardInfo>& shards() const { return m_shards; }
  bool loaded() const { return !m_pixels.empty(); }
  // Labels are held only by a loaded set.
  bool has_labels() const { return !m_labels.empty(); }
  const uint8_t* labels() const { return m_labels.data(); }
  // "" when every shard carries a checksum (and those this rank read verified), else a
  // note for the log that the split is not verified.
  const std::string& verification_note() const { return m_note; }

  // Copies the pixels of the given global indices, sample_dim() bytes each, in order.
  // A set that is not loaded reads them from the files, consecutive indices as one
  // hyperslab.
  void gather(std::span<const int64_t> global_indices, uint8_t* out) const;
  // Reads samples [begin, begin + count) from the files (one hyperslab per shard
  // touched) into out. Thread-safe (the HDF5 library serializes).
  void read_range(int64_t begin, int64_t count, uint8_t* out) const;

  // Pixel bytes read from the files by read_range/gather on a set that is not loaded
  // (checksum verification not included), and the number of hyperslab reads.
  uint64_t bytes_read() const;
  uint64_t reads() const;

 private:
  struct Io;
  std::string m_dir, m_split, m_note;
  int64_t m_size = 0;
  int m_shape[3] = {0, 0, 0};
  std::vector<ShardInfo> m_shards;
  std::vector<uint8_t> m_pixels;  // (size, C, H, W) when loaded
  std::vector<uint8_t> m_labels;
  std::shared_ptr<Io> m_io;       // open files and counters of on-demand reads
};

// Writes `images` (n, H, W) or (n, C, H, W) [and labels (n)] as `num_shards` shards
// plus manifest.yaml into `dir`. Each file is written under a temporary name and
// renamed; the manifest goes last, so a crash never leaves a readable partial split.
// Defined in shard_writer.cpp, which has the general writer (any SampleSource).
void write_split(const std::string& dir, const std::string& split, const IdxArray& images, const IdxArray* labels,
                 int num_shards, const std::string& source, bool overwrite);

}  // namespace elbo::data
