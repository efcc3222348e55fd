// Arrays as SampleSources for elbo-shard: NumPy .npy / .npz files (--npy) and HDF5
// datasets (--hdf5 FILE:/path). Pixels are uint8 0..255 or floats in [0, 1] (stored as
// floor(v * 255 + 0.5)), laid out (N, H, W), (N, H, W, C) or (N, C, H, W), and read in
// blocks of samples, so an array larger than memory can be sharded.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "elbo/data/shard_writer.hpp"

namespace elbo::data {

enum class Layout { Auto, NHWC, NCHW };

// "auto" | "nhwc" | "nchw"; a Usage error otherwise.
Layout parse_layout(const std::string& s);

// The sample geometry of an array shape: rank 3 is (N, H, W); rank 4 is NHWC or NCHW
// as given, or inferred when exactly one of shape[1] and shape[3] is 1 or 3 (the
// channel counts elbo draws). `what` names the array in errors.
struct ArrayGeometry {
  int64_t n = 0;
  uint32_t c = 1, h = 0, w = 0;
  bool nhwc = false;
};
ArrayGeometry array_geometry(const std::vector<int64_t>& shape, Layout layout, const std::string& what);

// Where the element bytes of a source array come from; implemented per file kind.
class ArrayReader;

class ArraySampleSource : public SampleSource {
 public:
  // --npy FILE (.npy, or .npz with `npz_key`); labels from --npy-labels FILE or
  // --npz-labels-key KEY (a 1-D integer array, values 0..255), both optional.
  static std::unique_ptr<ArraySampleSource> numpy(const std::string& path, const std::string& npz_key,
                                                  const std::string& labels_path, const std::string& labels_key,
                                                  Layout layout);
  // --hdf5 FILE:/path/to/dataset [--hdf5-labels /path/to/labels in the same file].
  static std::unique_ptr<ArraySampleSource> hdf5(const std::string& spec, const std::string& labels_path,
                                                 Layout layout);
  ~ArraySampleSource() override;

  int64_t size() const override { return m_geo.n; }
  std::array<uint32_t, 3> shape() const override { return {m_geo.c, m_geo.h, m_geo.w}; }
  bool has_labels() const override { return !m_labels.empty(); }
  std::string description() const override { return m_description; }
  void read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) override;

 private:
  ArraySampleSource() = default;
  std::unique_ptr<ArrayReader> m_reader;
  ArrayGeometry m_geo;
  std::vector<uint8_t> m_labels;
  std::string m_description;
};

}  // namespace elbo::data
