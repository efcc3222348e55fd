// Test helpers for shard splits: synthetic splits, manifests with checksums (as the
// elbo-shard of issue "Datasets of any size" writes them), damage in place.
#pragma once

#include <hdf5.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "elbo/data/idx.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/util/checksum.hpp"
#include "elbo/util/h5.hpp"

namespace elbo::data::testing {

inline IdxArray random_images(uint32_t n, uint32_t c, uint32_t h, uint32_t w, unsigned seed) {
  std::mt19937 rng(seed);
  IdxArray a;
  a.dims = {n, c, h, w};
  a.data.resize(size_t(n) * c * h * w);
  for (auto& v : a.data) v = static_cast<uint8_t>(rng());
  return a;
}

// FNV-1a 64 over a shard's images bytes then its labels bytes, as "fnv1a64:<hex>".
inline std::string shard_checksum(const std::string& file) {
  h5::Id f = h5::open_file(file);
  Fnv1a64 h;
  std::vector<uint8_t> img = h5::read_dataset<uint8_t>(f, "images");
  h.update(img.data(), img.size());
  if (h5::exists(f, "labels")) {
    std::vector<uint8_t> lab = h5::read_dataset<uint8_t>(f, "labels");
    h.update(lab.data(), lab.size());
  }
  return "fnv1a64:" + h.hex();
}

// Adds `checksum:` to every shard entry of DIR/manifest.yaml (computed from the files
// as they are now).
inline void add_checksums(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string path = (fs::path(dir) / "manifest.yaml").string();
  YAML::Node m = YAML::LoadFile(path);
  for (auto e : m["shards"]) e["checksum"] = shard_checksum((fs::path(dir) / e["file"].as<std::string>()).string());
  YAML::Emitter out;
  out << m;
  std::ofstream(path) << out.c_str() << "\n";
}

// Drops every shard's checksum from a manifest (a split as elbo-shard wrote it before
// checksums), returning them in shard order.
inline std::vector<std::string> remove_checksums(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string path = (fs::path(dir) / "manifest.yaml").string();
  YAML::Node m = YAML::LoadFile(path);
  std::vector<std::string> removed;
  for (auto e : m["shards"]) {
    removed.push_back(e["checksum"] ? e["checksum"].as<std::string>() : "");
    e.remove("checksum");
  }
  YAML::Emitter out;
  out << m;
  std::ofstream(path) << out.c_str() << "\n";
  return removed;
}

// Overwrites `bytes` bytes of a shard's images, from row `row` on, with random bytes
// (the file stays valid HDF5; only the pixel values change).
inline void damage_images(const std::string& file, hsize_t row, size_t bytes, unsigned seed = 7) {
  h5::Id f = h5::open_file(file, true);
  std::vector<hsize_t> shape = h5::dataset_shape(f, "images");
  const size_t dim = size_t(shape[1]) * shape[2] * shape[3];
  const hsize_t rows = (bytes + dim - 1) / dim;
  std::vector<uint8_t> junk(rows * dim);
  std::mt19937 rng(seed);
  for (auto& v : junk) v = static_cast<uint8_t>(rng());
  h5::Id ds(H5Dopen2(f, "images", H5P_DEFAULT), H5Dclose);
  h5::Id fs(H5Dget_space(ds), H5Sclose);
  std::vector<hsize_t> start = {row, 0, 0, 0}, count = {rows, shape[1], shape[2], shape[3]};
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr);
  h5::Id ms(H5Screate_simple(4, count.data(), nullptr), H5Sclose);
  if (H5Dwrite(ds, H5T_NATIVE_UINT8, ms, fs, H5P_DEFAULT, junk.data()) < 0) throw std::runtime_error("damage failed");
}

}  // namespace elbo::data::testing
