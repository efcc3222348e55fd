// Shard reader (HDF5 + a YAML manifest): validation, checksums, whole-split loading or
// on-demand hyperslab reads; the writer is in shard_writer.cpp.
#include "elbo/data/shards.hpp"

#include <new>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <mutex>
#include <cstring>
#include <deque>
#include <filesystem>

#include "elbo/util/checksum.hpp"
#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"
#include "elbo/util/progress.hpp"

namespace elbo::data {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormatVersion = 1;

}  // namespace

struct ShardSet::Io {
  std::mutex mutex;           // held for each read (the HDF5 library serializes its calls anyway)
  std::vector<h5::Id> files;  // opened on first use, per shard
  std::deque<size_t> open;    // shards with an open file, oldest first: at most kMaxOpenFiles
  std::atomic<uint64_t> bytes{0}, reads{0};
};

uint64_t ShardSet::bytes_read() const { return m_io->bytes.load(); }
uint64_t ShardSet::reads() const { return m_io->reads.load(); }

namespace {

// "uint8", "float32", "int16", ... for messages.
std::string type_name(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    case H5T_FLOAT:
      return "float" + std::to_string(bits);
    default:
      return "a non-numeric type";
  }
}

// HDF5 converts whatever is stored to the type read: floats in [0, 1] would become
// 0 or 1 and uint16 would be clipped without a word. Only uint8 is what we read.
void require_uint8(hid_t file, const std::string& name, const std::string& path) {
  h5::Id ds(ELBO_CHECK_H5(H5Dopen2(file, name.c_str(), H5P_DEFAULT)), H5Dclose);
  h5::Id type(ELBO_CHECK_H5(H5Dget_type(ds)), H5Tclose);
  const bool ok = H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == 1 && H5Tget_sign(type) == H5T_SGN_NONE;
  if (!ok)
    throw data_error(path + ": " + name + " is stored as " + type_name(type) + ", not uint8" +
                     (name == "images" ? " (pixels 0..255); HDF5 would convert it silently (floats in [0, 1] "
                                         "become 0 or 1): write uint8 pixels, as elbo-shard does"
                                       : ""));
}

// Hashes a shard's images (rows read in pieces of about 8 MiB) then its labels.
std::string shard_checksum(hid_t file, int64_t rows, int64_t dim, bool labels, uint8_t* loaded_pixels) {
  Fnv1a64 h;
  if (loaded_pixels != nullptr) {
    h.update(loaded_pixels, static_cast<size_t>(rows * dim));
  } else {
    const int64_t step = std::max<int64_t>(1, (8 << 20) / dim);
    std::vector<uint8_t> buf(static_cast<size_t>(std::min(rows, step) * dim));
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t k = std::min(step, rows - r);
      h5::read_rows<uint8_t>(file, "images", hsize_t(r), hsize_t(k), buf.data());
      h.update(buf.data(), static_cast<size_t>(k * dim));
    }
  }
  if (labels && rows > 0) {
    std::vector<uint8_t> lab(static_cast<size_t>(rows));
    h5::read_rows<uint8_t>(file, "labels", 0, hsize_t(rows), lab.data());
    h.update(lab.data(), lab.size());
  }
  return "fnv1a64:" + h.hex();
}

bool valid_checksum(const std::string& c) {
  if (c.size() != 8 + 16 || c.compare(0, 8, "fnv1a64:") != 0) return false;
  return std::all_of(c.begin() + 8, c.end(), [](char ch) { return std::isxdigit(static_cast<unsigned char>(ch)); });
}

}  // namespace

int64_t split_bytes(const std::string& dir_or_manifest) {
  try {
    fs::path p(dir_or_manifest);
    YAML::Node root = YAML::LoadFile((fs::is_directory(p) ? p / "manifest.yaml" : p).string());
    int64_t bytes = root["num_samples"].as<int64_t>();
    for (int v : root["shape"].as<std::vector<int>>()) bytes *= v;
    return bytes;
  } catch (const std::exception&) {
    return -1;
  }
}

ShardSet ShardSet::open(const std::string& dir_or_manifest, const OpenOptions& options) {
  fs::path p(dir_or_manifest);
  fs::path manifest = fs::is_directory(p) ? p / "manifest.yaml" : p;
  if (!fs::exists(manifest)) {
    if (!fs::exists(p)) throw data_error(dir_or_manifest + ": data directory does not exist");
    throw data_error(manifest.string() + ": missing manifest (is this a directory written by elbo-shard?)");
  }
  ShardSet s;
  s.m_io = std::make_shared<Io>();
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
    if (!is_sample_shape(shape))
      throw data_error(mpath + ": shape must be [C, H, W] with positive entries");
    std::copy(shape.begin(), shape.end(), s.m_shape);
    for (const auto& e : root["shards"]) {
      ShardInfo info{e["file"].as<std::string>(), e["offset"].as<int64_t>(), e["num_samples"].as<int64_t>(), ""};
      if (e["checksum"]) {
        info.checksum = e["checksum"].as<std::string>();
        if (!valid_checksum(info.checksum))
          throw data_error(mpath + ": shard " + info.file + ": checksum '" + info.checksum +
                           "' is not of the form fnv1a64:<16 hex digits>");
        std::transform(info.checksum.begin(), info.checksum.end(), info.checksum.begin(),
                       [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      }
      s.m_shards.push_back(info);
    }
  } catch (const YAML::Exception& e) {
    throw data_error(mpath + ": malformed manifest: " + e.what());
  }
  if (s.m_shards.empty() || s.m_size < 1) throw data_error(mpath + ": the manifest lists no samples");

  const size_t dim = static_cast<size_t>(s.sample_dim());
  if (options.load) {
    const size_t bytes = static_cast<size_t>(s.m_size) * dim;
    try {
      s.m_pixels.resize(bytes);
    } catch (const std::bad_alloc&) {
      throw data_error(mpath + ": cannot hold the split's " + std::to_string(bytes >> 20) +
                       " MiB in this rank's memory; read it on demand instead (data.loader: stream, or auto)");
    }
  }
  bool labels = true;
  int64_t expect_offset = 0, unverified = 0;
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
      require_uint8(f, "images", file);
      const bool has_labels = h5::exists(f, "labels");
      if (has_labels) require_uint8(f, "labels", file);
      if (h5::read_attr_int(f, "global_offset") != sh.offset)
        throw data_error(file + ": global_offset attribute " + std::to_string(h5::read_attr_int(f, "global_offset")) +
                         " disagrees with the manifest (" + std::to_string(sh.offset) + ")");
      uint8_t* dst = options.load ? s.m_pixels.data() + size_t(sh.offset) * dim : nullptr;
      if (options.load && sh.num_samples > 0) h5::read_rows<uint8_t>(f, "images", 0, hsize_t(sh.num_samples), dst);
      if (options.load && labels && has_labels) {
        s.m_labels.resize(static_cast<size_t>(s.m_size));
        h5::read_rows<uint8_t>(f, "labels", 0, hsize_t(sh.num_samples), s.m_labels.data() + sh.offset);
      } else {
        labels = false;
      }
      if (sh.checksum.empty()) {
        ++unverified;
      } else if (options.load || static_cast<int>(i % static_cast<size_t>(options.world)) == options.rank) {
        const std::string got = shard_checksum(f, sh.num_samples, static_cast<int64_t>(dim), has_labels, dst);
        if (got != sh.checksum)
          throw data_error(file + ": checksum mismatch: the manifest says " + sh.checksum + ", the images" +
                           (has_labels ? " and labels" : "") + " hash to " + got +
                           "; the shard is damaged (or was changed after elbo-shard wrote it)");
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
  if (unverified > 0)
    s.m_note = s.m_dir + ": unverified: " + std::to_string(unverified) + " of " + std::to_string(s.m_shards.size()) +
               " shard(s) have no checksum in the manifest (written by an older elbo-shard); damage in them goes "
               "unnoticed";
  return s;
}

void ShardSet::read_range(int64_t begin, int64_t count, uint8_t* out) const {
  if (begin < 0 || count < 0 || begin + count > m_size)
    throw data_error(m_dir + ": samples [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                     ") out of range [0, " + std::to_string(m_size) + ")");
  const int64_t dim = sample_dim();
  // The shard holding `begin`: shards are contiguous and sorted by offset.
  auto it = std::upper_bound(m_shards.begin(), m_shards.end(), begin,
                             [](int64_t v, const ShardInfo& s) { return v < s.offset; });
  size_t k = static_cast<size_t>(it - m_shards.begin()) - 1;
  while (count > 0) {
    const ShardInfo& sh = m_shards[k];
    const int64_t row = begin - sh.offset, rows = std::min(count, sh.num_samples - row);
    if (rows > 0) {
      const std::string file = (fs::path(m_dir) / sh.file).string();
      try {
        std::lock_guard<std::mutex> lock(m_io->mutex);
        if (m_io->files.empty()) m_io->files.resize(m_shards.size());
        if (!m_io->files[k].valid()) {
          // A split of thousands of shards must not run into the descriptor limit.
          constexpr size_t kMaxOpenFiles = 64;
          if (m_io->open.size() >= kMaxOpenFiles) {
            m_io->files[m_io->open.front()] = h5::Id();
            m_io->open.pop_front();
          }
          m_io->files[k] = h5::open_file(file);
          m_io->open.push_back(k);
        }
        h5::read_rows<uint8_t>(m_io->files[k].get(), "images", hsize_t(row), hsize_t(rows), out);
      } catch (const Error& e) {
        if (std::string(e.what()).find(file) != std::string::npos) throw;
        throw data_error(file + ": reading samples " + std::to_string(begin) + ".." + std::to_string(begin + rows - 1) +
                         ": " + e.what());
      }
      m_io->bytes += static_cast<uint64_t>(rows * dim);
      m_io->reads += 1;
      out += rows * dim;
      begin += rows;
      count -= rows;
    }
    ++k;
  }
}

void ShardSet::gather(std::span<const int64_t> idx, uint8_t* out) const {
  const size_t dim = static_cast<size_t>(sample_dim());
  for (size_t i = 0; i < idx.size(); ++i)
    if (idx[i] < 0 || idx[i] >= m_size)
      throw data_error(m_dir + ": sample index " + std::to_string(idx[i]) + " out of range [0, " +
                       std::to_string(m_size) + ")");
  if (loaded()) {
    for (size_t i = 0; i < idx.size(); ++i)
      std::memcpy(out + i * dim, m_pixels.data() + static_cast<size_t>(idx[i]) * dim, dim);
    return;
  }
  // Runs of consecutive indices (evaluation asks for contiguous slices) are one read each.
  for (size_t i = 0; i < idx.size();) {
    size_t j = i + 1;
    while (j < idx.size() && idx[j] == idx[j - 1] + 1) ++j;
    read_range(idx[i], static_cast<int64_t>(j - i), out + i * dim);
    i = j;
  }
}

}  // namespace elbo::data
