// Shard reader (HDF5 + a YAML manifest); the writer is in shard_writer.cpp.
#include "elbo/data/shards.hpp"

#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"
#include "elbo/util/progress.hpp"

namespace elbo::data {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormatVersion = 1;

}  // namespace

ShardSet ShardSet::open(const std::string& dir_or_manifest) {
  fs::path p(dir_or_manifest);
  fs::path manifest = fs::is_directory(p) ? p / "manifest.yaml" : p;
  if (!fs::exists(manifest)) {
    if (!fs::exists(p)) throw data_error(dir_or_manifest + ": data directory does not exist");
    throw data_error(manifest.string() + ": missing manifest (is this a directory written by elbo-shard?)");
  }
  ShardSet s;
  s.m_dir = manifest.parent_path().string();
  const std::string mpath = manifest.string();
  YAML::Node root;
  try {
    root = YAML::LoadFile(mpath);
    if (root["format_version"].as<int64_t>() != kFormatVersion)
      throw data_error(mpath + ": unsupported format_version " + root["format_version"].as<std::string>());
    s.m_split = root["split"].as<std::string>();
    s.m_size = root["num_samples"].as<int64_t>();
    auto shape = root["shape"].as<std::vector<int>>();
    if (shape.size() != 3 || shape[0] < 1 || shape[1] < 1 || shape[2] < 1)
      throw data_error(mpath + ": shape must be [C, H, W] with positive entries");
    std::copy(shape.begin(), shape.end(), s.m_shape);
    for (const auto& e : root["shards"])
      s.m_shards.push_back({e["file"].as<std::string>(), e["offset"].as<int64_t>(), e["num_samples"].as<int64_t>()});
  } catch (const YAML::Exception& e) {
    throw data_error(mpath + ": malformed manifest: " + e.what());
  }
  if (s.m_shards.empty() || s.m_size < 1) throw data_error(mpath + ": the manifest lists no samples");

  const size_t dim = static_cast<size_t>(s.sample_dim());
  s.m_pixels.resize(static_cast<size_t>(s.m_size) * dim);
  bool labels = true;
  int64_t expect_offset = 0;
  for (size_t i = 0; i < s.m_shards.size(); ++i) {
    const ShardInfo& sh = s.m_shards[i];
    const std::string file = (fs::path(s.m_dir) / sh.file).string();
    if (sh.offset != expect_offset)
      throw data_error(mpath + ": shard " + sh.file + " starts at sample " + std::to_string(sh.offset) + ", expected " +
                       std::to_string(expect_offset));
    if (!fs::exists(file)) throw data_error(file + ": shard file listed in the manifest is missing");
    try {
      h5::Id f = h5::open_file(file);
      std::vector<hsize_t> shp = h5::dataset_shape(f, "images");
      std::vector<hsize_t> want = {hsize_t(sh.num_samples), hsize_t(s.m_shape[0]), hsize_t(s.m_shape[1]),
                                   hsize_t(s.m_shape[2])};
      if (shp != want)
        throw data_error(file + ": images has shape " + shape_string(shp) + " but the manifest says " + shape_string(want));
      if (h5::read_attr_int(f, "global_offset") != sh.offset)
        throw data_error(file + ": global_offset attribute " + std::to_string(h5::read_attr_int(f, "global_offset")) +
                         " disagrees with the manifest (" + std::to_string(sh.offset) + ")");
      if (sh.num_samples > 0)
        h5::read_rows<uint8_t>(f, "images", 0, hsize_t(sh.num_samples), s.m_pixels.data() + size_t(sh.offset) * dim);
      if (labels && h5::exists(f, "labels")) {
        s.m_labels.resize(static_cast<size_t>(s.m_size));
        h5::read_rows<uint8_t>(f, "labels", 0, hsize_t(sh.num_samples), s.m_labels.data() + sh.offset);
      } else {
        labels = false;
      }
    } catch (const Error& e) {
      if (std::string(e.what()).find(file) != std::string::npos) throw;
      throw data_error(file + ": " + e.what());
    }
    expect_offset += sh.num_samples;
  }
  if (expect_offset != s.m_size)
    throw data_error(mpath + ": shards cover " + std::to_string(expect_offset) + " samples but num_samples is " +
                     std::to_string(s.m_size));
  if (!labels) s.m_labels.clear();
  return s;
}

void ShardSet::gather(std::span<const int64_t> idx, uint8_t* out) const {
  const size_t dim = static_cast<size_t>(sample_dim());
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i] < 0 || idx[i] >= m_size)
      throw data_error(m_dir + ": sample index " + std::to_string(idx[i]) + " out of range [0, " +
                       std::to_string(m_size) + ")");
    std::memcpy(out + i * dim, m_pixels.data() + static_cast<size_t>(idx[i]) * dim, dim);
  }
}

}  // namespace elbo::data
