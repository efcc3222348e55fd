// The writer half of the shard format (see shards.hpp for the layout and the reader):
// any SampleSource -> HDF5 shards + manifest.yaml, a seeded train/test split, and the
// verification of a written split against the checksums its manifest records.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "elbo/data/idx.hpp"

namespace elbo::data {

// Samples to shard, uint8 (C, H, W) each, addressed by index in a fixed order.
class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;
  virtual std::array<uint32_t, 3> shape() const = 0;  // (C, H, W)
  virtual bool has_labels() const = 0;
  // Names of the label values 0..K-1 (class folders), empty when the labels are bare numbers.
  virtual std::vector<std::string> class_names() const { return {}; }
  virtual std::string description() const = 0;  // the input, for the manifest's `source`
  // Fills pixels (k, C, H, W) and, when has_labels(), labels (k) for `indices`, in order.
  // Errors name the input file (and the sample index where it applies).
  virtual void read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) = 0;
};

// Samples held in memory: (n, C, H, W) pixels and optional labels.
class ArraySource : public SampleSource {
 public:
  ArraySource(std::array<uint32_t, 3> shape, std::vector<uint8_t> pixels, std::vector<uint8_t> labels, bool has_labels,
              std::string description, std::vector<std::string> class_names = {});
  // IDX images (n, H, W) or (n, C, H, W) [+ labels (n)], checked against each other.
  static ArraySource from_idx(const IdxArray& images, const IdxArray* labels, std::string description);

  int64_t size() const override { return m_size; }
  std::array<uint32_t, 3> shape() const override { return m_shape; }
  bool has_labels() const override { return m_has_labels; }
  std::vector<std::string> class_names() const override { return m_classes; }
  std::string description() const override { return m_description; }
  void read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) override;

 private:
  std::array<uint32_t, 3> m_shape;
  int64_t m_size = 0;
  std::vector<uint8_t> m_pixels, m_labels;
  bool m_has_labels = false;
  std::string m_description;
  std::vector<std::string> m_classes;
};

// The samples `indices` of another source, in that order (a train or test part).
class SubsetSource : public SampleSource {
 public:
  SubsetSource(SampleSource& base, std::vector<int64_t> indices) : m_base(base), m_indices(std::move(indices)) {}
  int64_t size() const override { return static_cast<int64_t>(m_indices.size()); }
  std::array<uint32_t, 3> shape() const override { return m_base.shape(); }
  bool has_labels() const override { return m_base.has_labels(); }
  std::vector<std::string> class_names() const override { return m_base.class_names(); }
  std::string description() const override { return m_base.description(); }
  void read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) override;

 private:
  SampleSource& m_base;
  std::vector<int64_t> m_indices;
};

// Splits 0..n-1 into (train, test), each ascending: the test part is round(n * fraction)
// indices drawn by a Fisher-Yates shuffle driven by mt19937_64(seed), so a seed gives
// the same split on every platform. Both parts must be non-empty.
std::array<std::vector<int64_t>, 2> split_indices(int64_t n, double test_fraction, uint64_t seed);

struct WriteOptions {
  std::string split = "train";
  int num_shards = 0;       // 0: from shard_mb
  double shard_mb = 256.0;  // target size of one shard (pixels), when num_shards is 0
  int deflate_level = -1;   // -1: no compression, else gzip level 0..9
  bool overwrite = false;
};

// Samples per HDF5 chunk for a sample of `sample_bytes`: a few hundred whole samples
// (so a reader taking runs of samples touches few chunks), at most ~4 MiB, at most n.
int64_t chunk_samples(int64_t sample_bytes, int64_t n);

// Writes the source as shards + manifest.yaml into `dir`. Every shard is built in
// memory and written durably to a temporary name first; only when all are written is
// an existing split's manifest removed (with --overwrite), the shards renamed into
// place and the new manifest written; shard files of the old split that the new one
// does not use are removed last. So `dir` never holds a readable mix, and a failure
// while reading the input leaves an existing split untouched.
// The manifest's shard entries carry `checksum: fnv1a64:<16 hex>`, FNV-1a over the
// shard's `images` bytes ((n, C, H, W) uint8, row-major) followed by its `labels` bytes.
void write_split(const std::string& dir, SampleSource& source, const WriteOptions& options);

// write_split in two steps, for several splits that must change together (train and
// test): prepare_split reads the source and writes every shard to its temporary name;
// commit() puts them in place. Prepare all, then commit all: a failing input leaves
// every existing split untouched. A PreparedSplit dropped uncommitted removes its
// temporaries.
class PreparedSplit {
 public:
  PreparedSplit(PreparedSplit&& o) noexcept;
  PreparedSplit& operator=(PreparedSplit&&) = delete;
  PreparedSplit(const PreparedSplit&) = delete;
  ~PreparedSplit();
  void commit();

 private:
  PreparedSplit() = default;
  friend PreparedSplit prepare_split(const std::string&, SampleSource&, const WriteOptions&);
  std::string m_dir, m_manifest;
  std::vector<std::string> m_names;  // shard files waiting as NAME.tmp
};
PreparedSplit prepare_split(const std::string& dir, SampleSource& source, const WriteOptions& options);

// The checksum of one shard's contents, as recorded in the manifest.
std::string shard_checksum(const uint8_t* images, size_t image_bytes, const uint8_t* labels, size_t label_bytes);

struct VerifyResult {
  int64_t shards = 0, samples = 0;
  int64_t without_checksum = 0;       // entries of older splits, checked for shape only
  std::vector<std::string> problems;  // each names the shard file (or the manifest)
};

// Re-reads every shard of a split: shapes, offsets and counts against the manifest,
// and the checksum where the manifest has one. Damage is reported, not thrown; an
// unreadable manifest is a Data error.
VerifyResult verify_split(const std::string& dir);

}  // namespace elbo::data
