// Shard writer: sources -> in-memory HDF5 shards written durably, manifest last; and
// the verifier that recomputes the manifest's per-shard checksums.
#include "elbo/data/shard_writer.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include "elbo/data/shards.hpp"
#include "elbo/util/checksum.hpp"
#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"
#include "elbo/util/progress.hpp"

namespace elbo::data {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormatVersion = 1;
constexpr const char* kChecksumPrefix = "fnv1a64:";

std::string shard_name(int i, int n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05d-of-%05d.h5", i, n);
  return buf;
}

// The names write_split produces (and their temporaries): the only files it removes.
// shard-NNNNN-of-NNNNN.h5 or .h5.tmp, at least five digits each (a hand matcher:
// std::regex draws GCC 12 maybe-uninitialized warnings in sanitizer builds).
bool is_shard_file_name(const std::string& name) {
  size_t p = 0;
  auto literal = [&](const char* s) {
    const size_t n = std::strlen(s);
    if (name.compare(p, n, s) != 0) return false;
    p += n;
    return true;
  };
  auto digits = [&] {
    const size_t start = p;
    while (p < name.size() && name[p] >= '0' && name[p] <= '9') ++p;
    return p - start >= 5;
  };
  if (!literal("shard-") || !digits() || !literal("-of-") || !digits() || !literal(".h5")) return false;
  return p == name.size() || (literal(".tmp") && p == name.size());
}

// A uint8 dataset of `shape`, chunked by `chunk_rows` whole rows, optionally deflated.
h5::Id create_u8_dataset(hid_t loc, const char* name, const std::vector<hsize_t>& shape, hsize_t chunk_rows,
                         int deflate_level) {
  h5::Id space(ELBO_CHECK_H5(H5Screate_simple(static_cast<int>(shape.size()), shape.data(), nullptr)), H5Sclose);
  h5::Id dcpl(ELBO_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE)), H5Pclose);
  std::vector<hsize_t> chunk = shape;
  chunk[0] = std::max<hsize_t>(1, std::min(chunk_rows, shape[0]));
  ELBO_CHECK_H5(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()));
  if (deflate_level >= 0) ELBO_CHECK_H5(H5Pset_deflate(dcpl, static_cast<unsigned>(deflate_level)));
  return h5::Id(ELBO_CHECK_H5(H5Dcreate2(loc, name, H5T_STD_U8LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT)), H5Dclose);
}

void write_rows_u8(hid_t ds, const std::vector<hsize_t>& shape, hsize_t row0, hsize_t nrows, const uint8_t* data) {
  h5::Id fspace(ELBO_CHECK_H5(H5Dget_space(ds)), H5Sclose);
  std::vector<hsize_t> start(shape.size(), 0), count = shape;
  start[0] = row0;
  count[0] = nrows;
  ELBO_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr));
  h5::Id mspace(ELBO_CHECK_H5(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr)), H5Sclose);
  ELBO_CHECK_H5(H5Dwrite(ds, H5T_NATIVE_UINT8, mspace, fspace, H5P_DEFAULT, data));
}

// Rows per read from the source: bounded in bytes so that a shard is never held twice.
int64_t block_rows(int64_t sample_bytes) { return std::max<int64_t>(1, (int64_t{16} << 20) / sample_bytes); }

}  // namespace

// --- sources ---

ArraySource::ArraySource(std::array<uint32_t, 3> shape, std::vector<uint8_t> pixels, std::vector<uint8_t> labels,
                         bool has_labels, std::string description, std::vector<std::string> class_names)
    : m_shape(shape),
      m_pixels(std::move(pixels)),
      m_labels(std::move(labels)),
      m_has_labels(has_labels),
      m_description(std::move(description)),
      m_classes(std::move(class_names)) {
  const size_t dim = size_t(shape[0]) * shape[1] * shape[2];
  ELBO_ASSERT(dim > 0 && m_pixels.size() % dim == 0, "ArraySource: pixels are not whole samples");
  m_size = static_cast<int64_t>(m_pixels.size() / dim);
  ELBO_ASSERT(!has_labels || m_labels.size() == static_cast<size_t>(m_size), "ArraySource: one label per sample");
}

ArraySource ArraySource::from_idx(const IdxArray& images, const IdxArray* labels, std::string description) {
  if (images.dims.size() != 3 && images.dims.size() != 4)
    throw data_error(description + ": images must be (n, H, W) or (n, C, H, W); got " +
                     std::to_string(images.dims.size()) + " dimensions");
  const uint32_t C = images.dims.size() == 4 ? images.dims[1] : 1;
  const uint32_t H = images.dims[images.dims.size() - 2], W = images.dims.back();
  if (C == 0 || H == 0 || W == 0) throw data_error(description + ": images have an empty dimension");
  if (labels != nullptr && labels->rows() != images.rows())
    throw data_error(description + ": " + std::to_string(images.rows()) + " images but " +
                     std::to_string(labels->rows()) + " labels");
  return ArraySource({C, H, W}, images.data, labels != nullptr ? labels->data : std::vector<uint8_t>{},
                     labels != nullptr, std::move(description));
}

void ArraySource::read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) {
  const size_t dim = size_t(m_shape[0]) * m_shape[1] * m_shape[2];
  for (size_t k = 0; k < indices.size(); ++k) {
    const int64_t i = indices[k];
    ELBO_ASSERT(i >= 0 && i < m_size, "ArraySource: index out of range");
    std::memcpy(pixels + k * dim, m_pixels.data() + size_t(i) * dim, dim);
    if (m_has_labels && labels != nullptr) labels[k] = m_labels[size_t(i)];
  }
}

void SubsetSource::read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) {
  std::vector<int64_t> mapped(indices.size());
  for (size_t k = 0; k < indices.size(); ++k) {
    ELBO_ASSERT(indices[k] >= 0 && indices[k] < size(), "SubsetSource: index out of range");
    mapped[k] = m_indices[size_t(indices[k])];
  }
  m_base.read(mapped, pixels, labels);
}

std::array<std::vector<int64_t>, 2> split_indices(int64_t n, double test_fraction, uint64_t seed) {
  if (!(test_fraction > 0.0 && test_fraction < 1.0))
    throw usage_error("--test-fraction must be strictly between 0 and 1, got " + std::to_string(test_fraction));
  const int64_t n_test = std::llround(static_cast<double>(n) * test_fraction);
  if (n_test < 1 || n_test >= n)
    throw data_error("--test-fraction " + std::to_string(test_fraction) + " of " + std::to_string(n) +
                     " samples leaves an empty train or test split");
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[size_t(i)] = i;
  // Fisher-Yates with an explicit draw (std::shuffle and the std distributions differ
  // between standard libraries; mt19937_64's sequence does not). The modulo bias is
  // below 2^-40 for any real dataset size.
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(perm[size_t(i)], perm[size_t(rng() % uint64_t(i + 1))]);
  std::vector<int64_t> test(perm.begin(), perm.begin() + n_test), train(perm.begin() + n_test, perm.end());
  std::sort(test.begin(), test.end());
  std::sort(train.begin(), train.end());
  return {std::move(train), std::move(test)};
}

int64_t chunk_samples(int64_t sample_bytes, int64_t n) {
  const int64_t by_bytes = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, sample_bytes));
  return std::max<int64_t>(1, std::min({int64_t{256}, by_bytes, n}));
}

std::string shard_checksum(const uint8_t* images, size_t image_bytes, const uint8_t* labels, size_t label_bytes) {
  Fnv1a64 h;
  h.update(images, image_bytes);
  if (labels != nullptr) h.update(labels, label_bytes);
  return kChecksumPrefix + h.hex();
}

// --- writer ---

PreparedSplit prepare_split(const std::string& dir, SampleSource& source, const WriteOptions& opt) {
  const std::array<uint32_t, 3> shape = source.shape();
  const auto [C, H, W] = shape;
  const int64_t n = source.size();
  const std::string& split = opt.split;
  if (n < 1) throw data_error(source.description() + ": the " + split + " split has no samples");
  const int64_t dim = int64_t(C) * H * W;
  int num_shards = opt.num_shards;
  if (num_shards == 0) {
    if (!(opt.shard_mb > 0)) throw usage_error("--shard-mb must be positive");
    const double mb = static_cast<double>(n) * static_cast<double>(dim) / 1e6;
    num_shards = static_cast<int>(std::clamp<double>(std::ceil(mb / opt.shard_mb), 1.0, static_cast<double>(n)));
  }
  if (num_shards < 1 || num_shards > n)
    throw data_error("--num-shards " + std::to_string(num_shards) + " must be between 1 and the " + std::to_string(n) +
                     " samples of the " + split + " split");
  if (opt.deflate_level > 9) throw usage_error("--compress deflate level must be 0..9");
  const std::vector<std::string> classes = source.class_names();
  if (classes.size() > 256) throw data_error(source.description() + ": more than 256 classes do not fit uint8 labels");
  fs::path d(dir);
  if (fs::exists(d / "manifest.yaml") && !opt.overwrite)
    throw data_error(dir + ": already holds a split (manifest.yaml); pass --overwrite to replace it");
  std::error_code ec;
  fs::create_directories(d, ec);
  if (ec) throw io_error("cannot create '" + dir + "': " + ec.message());

  const bool labels = source.has_labels();
  const int64_t chunk = chunk_samples(dim, n / num_shards);
  YAML::Emitter m;
  m << YAML::BeginMap << YAML::Key << "format_version" << YAML::Value << kFormatVersion;
  m << YAML::Key << "split" << YAML::Value << split;
  m << YAML::Key << "num_samples" << YAML::Value << n;
  m << YAML::Key << "shape" << YAML::Value << YAML::Flow << YAML::BeginSeq << C << H << W << YAML::EndSeq;
  m << YAML::Key << "dtype" << YAML::Value << "uint8";
  m << YAML::Key << "has_labels" << YAML::Value << labels;
  if (!classes.empty()) m << YAML::Key << "classes" << YAML::Value << YAML::Flow << classes;
  m << YAML::Key << "num_shards" << YAML::Value << num_shards;
  m << YAML::Key << "chunk_samples" << YAML::Value << chunk;
  m << YAML::Key << "compression" << YAML::Value
    << (opt.deflate_level >= 0 ? "deflate=" + std::to_string(opt.deflate_level) : std::string("none"));
  m << YAML::Key << "source" << YAML::Value << source.description();
  m << YAML::Key << "shards" << YAML::Value << YAML::BeginSeq;

  // Phase 1: every shard to its temporary name. A failure removes them all.
  std::vector<std::string> names, written;
  Progress progress("elbo-shard " + split, n);
  try {
    std::vector<uint8_t> pixels, label_buf;
    std::vector<int64_t> idx;
    for (int i = 0; i < num_shards; ++i) {
      const int64_t begin = n * i / num_shards, end = n * (i + 1) / num_shards, rows = end - begin;
      const std::string name = shard_name(i, num_shards);
      const std::string tmp = (d / (name + ".tmp")).string();
      Fnv1a64 image_hash;
      std::vector<uint8_t> shard_labels(labels ? size_t(rows) : 0);
      h5::Id f = h5::create_memory_file();
      {
        const std::vector<hsize_t> ishape = {hsize_t(rows), C, H, W}, lshape = {hsize_t(rows)};
        h5::Id images_ds = create_u8_dataset(f, "images", ishape, hsize_t(chunk), opt.deflate_level);
        const int64_t block = block_rows(dim);
        for (int64_t r0 = 0; r0 < rows; r0 += block) {
          const int64_t k = std::min(block, rows - r0);
          idx.resize(size_t(k));
          for (int64_t j = 0; j < k; ++j) idx[size_t(j)] = begin + r0 + j;
          pixels.resize(size_t(k * dim));
          source.read(idx, pixels.data(), labels ? shard_labels.data() + r0 : nullptr);
          write_rows_u8(images_ds, ishape, hsize_t(r0), hsize_t(k), pixels.data());
          image_hash.update(pixels.data(), pixels.size());
          progress.update(begin + r0 + k);
        }
        if (labels) {
          h5::Id labels_ds = create_u8_dataset(f, "labels", lshape, hsize_t(std::max<int64_t>(chunk, 4096)),
                                               opt.deflate_level);
          write_rows_u8(labels_ds, lshape, 0, hsize_t(rows), shard_labels.data());
          image_hash.update(shard_labels.data(), shard_labels.size());
        }
      }
      h5::write_attr_int(f, "format_version", kFormatVersion);
      h5::write_attr_string(f, "split", split);
      h5::write_attr_int(f, "shard_index", i);
      h5::write_attr_int(f, "num_shards", num_shards);
      h5::write_attr_int(f, "global_offset", begin);
      h5::write_attr_int(f, "num_samples_total", n);
      h5::write_attr_string(f, "description",
                            "elbo shard: images[k] (uint8, C x H x W, 0..255) is sample global_offset + k of the " +
                                split + " split" + (labels ? "; labels[k] is its class" : ""));
      written.push_back(tmp);
      h5::save_memory_file(std::move(f), tmp);
      names.push_back(name);
      m << YAML::BeginMap << YAML::Key << "file" << YAML::Value << name << YAML::Key << "offset" << YAML::Value
        << begin << YAML::Key << "num_samples" << YAML::Value << rows << YAML::Key << "checksum" << YAML::Value
        << kChecksumPrefix + image_hash.hex() << YAML::EndMap;
    }
  } catch (...) {
    for (const std::string& t : written) fs::remove(t, ec);
    throw;
  }
  progress.finish();
  m << YAML::EndSeq << YAML::EndMap;
  PreparedSplit out;
  out.m_dir = dir;
  out.m_manifest = std::string(m.c_str()) + "\n";
  out.m_names = std::move(names);
  return out;
}

PreparedSplit::PreparedSplit(PreparedSplit&& o) noexcept
    : m_dir(std::move(o.m_dir)), m_manifest(std::move(o.m_manifest)), m_names(std::move(o.m_names)) {
  o.m_names.clear();
}

PreparedSplit::~PreparedSplit() {
  std::error_code ec;  // destructors only clean up
  for (const std::string& name : m_names) fs::remove(fs::path(m_dir) / (name + ".tmp"), ec);
}

void PreparedSplit::commit() {
  ELBO_ASSERT(!m_names.empty(), "PreparedSplit::commit: nothing prepared, or committed already");
  const fs::path d(m_dir);
  const std::string& dir = m_dir;
  const std::vector<std::string> names = std::move(m_names);
  m_names.clear();
  std::error_code ec;
  // Phase 2: from here the old split stops being readable until the new one is.
  if (fs::exists(d / "manifest.yaml")) {
    if (!fs::remove(d / "manifest.yaml", ec) || ec)
      throw io_error((d / "manifest.yaml").string() + ": cannot remove the old manifest: " + ec.message());
    fsync_directory(dir);
  }
  for (const std::string& name : names) rename_into_place((d / (name + ".tmp")).string(), (d / name).string());
  write_text_file_atomic((d / "manifest.yaml").string(), m_manifest);
  fsync_directory(dir);

  // Phase 3: shard files the new manifest does not list (an older split with another
  // shard count, temporaries of a crashed run). Only names of the shard pattern.
  const std::set<std::string> keep(names.begin(), names.end());
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(d, ec)) {
    const std::string name = e.path().filename().string();
    if (is_shard_file_name(name) && keep.count(name) == 0 && !e.is_directory()) stale.push_back(e.path());
  }
  if (ec) throw io_error(dir + ": cannot list the directory: " + ec.message());
  for (const fs::path& p : stale)
    if (!fs::remove(p, ec) && ec) throw io_error(p.string() + ": cannot remove a stale shard file: " + ec.message());
  if (!stale.empty()) fsync_directory(dir);
}

void write_split(const std::string& dir, SampleSource& source, const WriteOptions& opt) {
  prepare_split(dir, source, opt).commit();
}

// The interface the IDX path has always used: in-memory arrays, a fixed shard count.
void write_split(const std::string& dir, const std::string& split, const IdxArray& images, const IdxArray* labels,
                 int num_shards, const std::string& source, bool overwrite) {
  if (labels != nullptr && labels->rows() != images.rows())
    throw data_error("the " + split + " split has " + std::to_string(images.rows()) + " images but " +
                     std::to_string(labels->rows()) + " labels");
  ArraySource src = ArraySource::from_idx(images, labels, source);
  WriteOptions opt;
  opt.split = split;
  opt.num_shards = num_shards;
  opt.overwrite = overwrite;
  if (num_shards < 1 || num_shards > src.size())
    throw data_error("--num-shards " + std::to_string(num_shards) + " must be between 1 and the " +
                     std::to_string(src.size()) + " samples of the " + split + " split");
  write_split(dir, src, opt);
}

// --- verifier ---

VerifyResult verify_split(const std::string& dir) {
  fs::path p(dir);
  if (!fs::exists(p)) throw data_error(dir + ": data directory does not exist");
  const fs::path manifest = fs::is_directory(p) ? p / "manifest.yaml" : p;
  const fs::path base = manifest.parent_path();
  const std::string mpath = manifest.string();
  if (!fs::exists(manifest)) throw data_error(mpath + ": missing manifest (is this a directory written by elbo-shard?)");
  struct Entry {
    std::string file, checksum;
    int64_t offset, rows;
  };
  std::vector<Entry> entries;
  int64_t total = 0;
  std::vector<int64_t> shp;
  bool has_labels = false;
  try {
    YAML::Node root = YAML::LoadFile(mpath);
    total = root["num_samples"].as<int64_t>();
    shp = root["shape"].as<std::vector<int64_t>>();
    has_labels = root["has_labels"] ? root["has_labels"].as<bool>() : false;
    for (const auto& e : root["shards"])
      entries.push_back({e["file"].as<std::string>(), e["checksum"] ? e["checksum"].as<std::string>() : "",
                         e["offset"].as<int64_t>(), e["num_samples"].as<int64_t>()});
  } catch (const YAML::Exception& e) {
    throw data_error(mpath + ": malformed manifest: " + e.what());
  }
  if (!is_sample_shape(shp))
    throw data_error(mpath + ": shape must be [C, H, W] with positive entries");
  const int64_t dim = shp[0] * shp[1] * shp[2];

  VerifyResult out;
  int64_t expect_offset = 0;
  Progress progress("elbo-shard --verify", total > 0 ? total : 1);
  for (const Entry& e : entries) {
    const std::string file = (base / e.file).string();
    ++out.shards;
    if (e.offset != expect_offset)
      out.problems.push_back(file + ": starts at sample " + std::to_string(e.offset) + " in the manifest, expected " +
                             std::to_string(expect_offset));
    expect_offset = e.offset + e.rows;
    if (!fs::exists(file)) {
      out.problems.push_back(file + ": shard file listed in the manifest is missing");
      continue;
    }
    try {
      h5::Id f = h5::open_file(file);
      const std::vector<hsize_t> want = {hsize_t(e.rows), hsize_t(shp[0]), hsize_t(shp[1]), hsize_t(shp[2])};
      const std::vector<hsize_t> got = h5::dataset_shape(f, "images");
      if (got != want) {
        out.problems.push_back(file + ": images has shape " + shape_string(got) + " but the manifest says " +
                               shape_string(want));
        continue;
      }
      if (h5::read_attr_int(f, "global_offset") != e.offset)
        out.problems.push_back(file + ": global_offset attribute " +
                               std::to_string(h5::read_attr_int(f, "global_offset")) + " disagrees with the manifest (" +
                               std::to_string(e.offset) + ")");
      Fnv1a64 h;
      std::vector<uint8_t> buf;
      const int64_t block = block_rows(dim);
      for (int64_t r0 = 0; r0 < e.rows; r0 += block) {
        const int64_t k = std::min(block, e.rows - r0);
        buf.resize(size_t(k * dim));
        h5::read_rows<uint8_t>(f, "images", hsize_t(r0), hsize_t(k), buf.data());
        h.update(buf.data(), buf.size());
        progress.update(e.offset + r0 + k);
      }
      if (has_labels) {
        const std::vector<hsize_t> lshape = h5::dataset_shape(f, "labels");
        if (lshape != std::vector<hsize_t>{hsize_t(e.rows)}) {
          out.problems.push_back(file + ": labels has shape " + shape_string(lshape) + ", expected (" +
                                 std::to_string(e.rows) + ")");
          continue;
        }
        buf.resize(size_t(e.rows));
        if (e.rows > 0) h5::read_rows<uint8_t>(f, "labels", 0, hsize_t(e.rows), buf.data());
        h.update(buf.data(), buf.size());
      }
      if (e.checksum.empty()) {
        ++out.without_checksum;
      } else if (e.checksum != kChecksumPrefix + h.hex()) {
        out.problems.push_back(file + ": checksum mismatch (manifest " + e.checksum + ", data " + kChecksumPrefix +
                               h.hex() + "): the shard is damaged");
      }
      out.samples += e.rows;
    } catch (const Error& err) {
      const std::string what = err.what();
      out.problems.push_back(what.find(file) != std::string::npos ? what : file + ": " + what);
    }
  }
  progress.finish();
  if (expect_offset != total)
    out.problems.push_back(mpath + ": shards cover " + std::to_string(expect_offset) + " samples but num_samples is " +
                           std::to_string(total));
  return out;
}

}  // namespace elbo::data
