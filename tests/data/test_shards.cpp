// IDX reading and the shard format: exact round trips for any shard count, and a
// clear error naming the file for each kind of damaged or mismatched input.
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <regex>
#include <set>

#include "elbo/data/idx.hpp"
#include "elbo/data/shard_writer.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/util/error.hpp"
#include "elbo/util/h5.hpp"

namespace elbo::data {
namespace {

namespace fs = std::filesystem;

class Tmp {
 public:
  Tmp() {
    static int counter = 0;
    m_dir = fs::temp_directory_path() / ("elbo_test_shards_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(m_dir);
    fs::create_directories(m_dir);
  }
  ~Tmp() { fs::remove_all(m_dir); }
  std::string operator/(const std::string& n) const { return (m_dir / n).string(); }

 private:
  fs::path m_dir;
};

std::vector<uint8_t> idx_bytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data, uint8_t type = 8) {
  std::vector<uint8_t> b = {0, 0, type, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(d >> s));
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes, bool gzip = false) {
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
}

IdxArray synthetic(uint32_t n, uint32_t h, uint32_t w, unsigned seed) {
  std::mt19937 rng(seed);
  IdxArray a;
  a.dims = {n, h, w};
  a.data.resize(size_t(n) * h * w);
  for (auto& v : a.data) v = static_cast<uint8_t>(rng());
  return a;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

TEST(Idx, ReadsPlainAndGzipIdentically) {
  Tmp t;
  IdxArray a = synthetic(9, 5, 4, 1);
  write_file(t / "x.idx", idx_bytes(a.dims, a.data));
  write_file(t / "x.idx.gz", idx_bytes(a.dims, a.data), true);
  for (const char* f : {"x.idx", "x.idx.gz"}) {
    IdxArray b = read_idx(t / f);
    EXPECT_EQ(b.dims, a.dims) << f;
    EXPECT_EQ(b.data, a.data) << f;
  }
}

TEST(Idx, MalformedFilesNameTheFile) {
  Tmp t;
  IdxArray a = synthetic(4, 3, 3, 2);
  auto bytes = idx_bytes(a.dims, a.data);
  write_file(t / "magic.idx", std::vector<uint8_t>{1, 2, 8, 3, 0, 0, 0, 1});
  EXPECT_NE(error_of([&] { read_idx(t / "magic.idx"); }).find("magic.idx: not an IDX file"), std::string::npos);
  write_file(t / "short.idx", std::vector<uint8_t>(bytes.begin(), bytes.end() - 5));
  EXPECT_NE(error_of([&] { read_idx(t / "short.idx"); }).find("short.idx: truncated"), std::string::npos);
  write_file(t / "float.idx", idx_bytes(a.dims, a.data, 0x0D));
  EXPECT_NE(error_of([&] { read_idx(t / "float.idx"); }).find("not supported"), std::string::npos);
  EXPECT_NE(error_of([&] { read_idx(t / "none.idx"); }).find("none.idx: file does not exist"), std::string::npos);
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// A gzip file whose trailer (CRC-32, then the length) does not match its data: the
// inflated bytes are all there, only zlib's final check can tell. Regression: it was
// accepted because gzread's -1 at the trailer and gzclose's result went unchecked.
TEST(Idx, GzipTrailerDamageIsAnErrorNamingTheFile) {
  Tmp t;
  IdxArray a = synthetic(6, 4, 4, 7);
  write_file(t / "ok.idx.gz", idx_bytes(a.dims, a.data), true);
  const std::vector<uint8_t> good = read_bytes(t / "ok.idx.gz");
  ASSERT_GT(good.size(), 8u);
  for (size_t from_end : {8u, 5u, 4u, 1u}) {  // CRC bytes, then length bytes
    std::vector<uint8_t> bad = good;
    bad[bad.size() - from_end] ^= 0x01;
    const std::string name = "crc" + std::to_string(from_end) + ".idx.gz";
    write_file(t / name, bad);
    const std::string e = error_of([&] { read_idx(t / name); });
    EXPECT_NE(e.find(name + ": corrupt gzip data"), std::string::npos) << e;
  }
  // A gzip stream cut inside its trailer.
  write_file(t / "cut.idx.gz", std::vector<uint8_t>(good.begin(), good.end() - 3));
  EXPECT_NE(error_of([&] { read_idx(t / "cut.idx.gz"); }).find("cut.idx.gz: "), std::string::npos);
  EXPECT_EQ(read_idx(t / "ok.idx.gz").data, a.data);
}

class RoundTrip : public ::testing::TestWithParam<int> {};

TEST_P(RoundTrip, GatherReturnsExactlyTheInputForAnyShardCount) {
  Tmp t;
  IdxArray img = synthetic(103, 5, 4, 3);
  IdxArray lab;
  lab.dims = {103};
  lab.data.resize(103);
  std::iota(lab.data.begin(), lab.data.end(), 0);
  write_split(t / "train", "train", img, &lab, GetParam(), "synthetic", false);
  ShardSet s = ShardSet::open(t / "train");
  ASSERT_EQ(s.size(), 103);
  EXPECT_EQ(s.channels(), 1);
  EXPECT_EQ(s.height(), 5);
  EXPECT_EQ(s.width(), 4);
  EXPECT_EQ(s.shards().size(), size_t(GetParam()));
  std::vector<int64_t> all(103);
  std::iota(all.begin(), all.end(), 0);
  std::vector<uint8_t> out(103 * 20);
  s.gather(all, out.data());
  EXPECT_EQ(out, img.data);
  ASSERT_TRUE(s.has_labels());
  EXPECT_TRUE(std::equal(lab.data.begin(), lab.data.end(), s.labels()));
  std::vector<int64_t> perm = {102, 0, 57, 57, 31};
  std::vector<uint8_t> some(perm.size() * 20);
  s.gather(perm, some.data());
  for (size_t i = 0; i < perm.size(); ++i)
    EXPECT_TRUE(std::equal(some.begin() + i * 20, some.begin() + (i + 1) * 20, img.data.begin() + perm[i] * 20));
  std::vector<int64_t> bad = {103};
  EXPECT_THROW(s.gather(bad, some.data()), Error);
}

INSTANTIATE_TEST_SUITE_P(ShardCounts, RoundTrip, ::testing::Values(1, 3, 7, 103));

TEST(Shards, DamagedSplitsNameTheFile) {
  Tmp t;
  IdxArray img = synthetic(30, 4, 4, 4);
  write_split(t / "s", "train", img, nullptr, 3, "synthetic", false);
  // Refuses to overwrite a split.
  EXPECT_NE(error_of([&] { write_split(t / "s", "train", img, nullptr, 3, "synthetic", false); }).find("already holds"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ShardSet::open(t / "nothing"); }).find("nothing: data directory does not exist"),
            std::string::npos);
  fs::create_directories(t / "empty");
  EXPECT_NE(error_of([&] { ShardSet::open(t / "empty"); }).find("missing manifest"), std::string::npos);

  // A shard whose images disagree with the manifest.
  fs::copy(t / "s", t / "shape", fs::copy_options::recursive);
  {
    h5::Id f = h5::create_file(t / "shape/shard-00001-of-00003.h5");
    std::vector<uint8_t> few(7 * 16);
    h5::write_dataset<uint8_t>(f, "images", {7, 1, 4, 4}, few.data());
    h5::write_attr_int(f, "global_offset", 10);
  }
  std::string e = error_of([&] { ShardSet::open(t / "shape"); });
  EXPECT_NE(e.find("shard-00001-of-00003.h5: images has shape (7, 1, 4, 4) but the manifest says (10, 1, 4, 4)"),
            std::string::npos)
      << e;

  // A missing shard, and a shard that is not HDF5 at all.
  fs::copy(t / "s", t / "missing", fs::copy_options::recursive);
  fs::remove(t / "missing/shard-00002-of-00003.h5");
  EXPECT_NE(error_of([&] { ShardSet::open(t / "missing"); }).find("shard-00002-of-00003.h5: shard file listed"),
            std::string::npos);
  fs::copy(t / "s", t / "junk", fs::copy_options::recursive);
  write_file(t / "junk/shard-00000-of-00003.h5", std::vector<uint8_t>(100, 'x'));
  EXPECT_NE(error_of([&] { ShardSet::open(t / "junk"); }).find("shard-00000-of-00003.h5"), std::string::npos);

  // A malformed manifest.
  fs::copy(t / "s", t / "manifest", fs::copy_options::recursive);
  std::ofstream(t / "manifest/manifest.yaml") << "format_version: 1\nsplit: [\n";
  EXPECT_NE(error_of([&] { ShardSet::open(t / "manifest"); }).find("manifest.yaml: malformed manifest"),
            std::string::npos);
}

TEST(Shards, BadWriteRequests) {
  Tmp t;
  IdxArray img = synthetic(5, 2, 2, 5);
  EXPECT_NE(error_of([&] { write_split(t / "a", "train", img, nullptr, 6, "s", false); }).find("--num-shards 6"),
            std::string::npos);
  IdxArray lab;
  lab.dims = {4};
  lab.data.resize(4);
  EXPECT_NE(error_of([&] { write_split(t / "b", "train", img, &lab, 1, "s", false); }).find("5 images but 4 labels"),
            std::string::npos);
}

std::set<std::string> listing(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

// Regression: --overwrite with fewer shards left the old split's extra shard files.
TEST(Shards, OverwriteWithFewerShardsRemovesOnlyStaleShardFiles) {
  Tmp t;
  IdxArray a = synthetic(40, 3, 3, 8), b = synthetic(40, 3, 3, 9);
  write_split(t / "s", "train", a, nullptr, 5, "a", false);
  std::ofstream(t / "s/notes.txt") << "mine";
  std::ofstream(t / "s/shard-old.h5") << "not of the pattern";
  write_split(t / "s", "train", b, nullptr, 2, "b", true);
  EXPECT_EQ(listing(t / "s"), (std::set<std::string>{"manifest.yaml", "notes.txt", "shard-old.h5",
                                                     "shard-00000-of-00002.h5", "shard-00001-of-00002.h5"}));
  ShardSet s = ShardSet::open(t / "s");
  std::vector<int64_t> all(40);
  std::iota(all.begin(), all.end(), 0);
  std::vector<uint8_t> got(40 * 9);
  s.gather(all, got.data());
  EXPECT_EQ(got, b.data);
  // The same shard count: every file replaced, the manifest describes the new data.
  write_split(t / "s", "train", a, nullptr, 2, "a", true);
  ShardSet s2 = ShardSet::open(t / "s");
  s2.gather(all, got.data());
  EXPECT_EQ(got, a.data);
  EXPECT_TRUE(verify_split(t / "s").problems.empty());
}

// A source that fails part way, like a corrupt image in the middle of a folder.
class FailingSource : public ArraySource {
 public:
  FailingSource(const IdxArray& a, int64_t fail_at) : ArraySource(ArraySource::from_idx(a, nullptr, "failing")),
                                                     m_fail_at(fail_at) {}
  void read(std::span<const int64_t> idx, uint8_t* pixels, uint8_t* labels) override {
    for (int64_t i : idx)
      if (i == m_fail_at) throw data_error("failing: sample " + std::to_string(i) + " is corrupt");
    ArraySource::read(idx, pixels, labels);
  }

 private:
  int64_t m_fail_at;
};

TEST(Shards, InputFailureLeavesTheExistingSplitUntouched) {
  Tmp t;
  IdxArray a = synthetic(30, 2, 2, 10), b = synthetic(30, 2, 2, 11);
  write_split(t / "s", "train", a, nullptr, 3, "a", false);
  const std::set<std::string> before = listing(t / "s");
  const std::string manifest_before = [&] {
    std::ifstream in(t / "s/manifest.yaml");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  FailingSource bad(b, 25);
  WriteOptions opt;
  opt.num_shards = 3;
  opt.overwrite = true;
  EXPECT_NE(error_of([&] { write_split(t / "s", bad, opt); }).find("sample 25 is corrupt"), std::string::npos);
  EXPECT_EQ(listing(t / "s"), before);  // no temporaries left, nothing replaced
  std::ifstream in(t / "s/manifest.yaml");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), manifest_before);
  EXPECT_TRUE(verify_split(t / "s").problems.empty());
}

// Train and test change together: a test part that fails to read leaves the old train
// split in place too, and no temporaries anywhere.
TEST(Shards, PreparedPairsCommitTogetherOrNotAtAll) {
  Tmp t;
  IdxArray a = synthetic(20, 2, 2, 15), b = synthetic(20, 2, 2, 16);
  write_split(t / "train", "train", a, nullptr, 2, "a", false);
  write_split(t / "test", "test", a, nullptr, 2, "a", false);
  const std::set<std::string> train_before = listing(t / "train"), test_before = listing(t / "test");
  ArraySource good = ArraySource::from_idx(b, nullptr, "b");
  FailingSource bad(b, 3);
  WriteOptions opt;
  opt.num_shards = 1;
  opt.overwrite = true;
  EXPECT_THROW(
      {
        PreparedSplit p = prepare_split(t / "train", good, opt);
        PreparedSplit q = prepare_split(t / "test", bad, opt);
        p.commit();
        q.commit();
      },
      Error);
  EXPECT_EQ(listing(t / "train"), train_before);
  EXPECT_EQ(listing(t / "test"), test_before);
  {
    PreparedSplit p = prepare_split(t / "train", good, opt);
    EXPECT_EQ(listing(t / "train").count("shard-00000-of-00001.h5.tmp"), 1u);
    p.commit();
  }
  EXPECT_EQ(listing(t / "train"), (std::set<std::string>{"manifest.yaml", "shard-00000-of-00001.h5"}));
  EXPECT_EQ(ShardSet::open(t / "train").size(), 20);
}

std::vector<std::string> manifest_checksums(const std::string& dir) {
  std::ifstream in(dir + "/manifest.yaml");
  std::string text(std::istreambuf_iterator<char>(in), {});
  std::vector<std::string> out;
  std::regex re("checksum: (\\S+)");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1]);
  return out;
}

TEST(Shards, ManifestChecksumIsFnv1aOfImagesThenLabels) {
  Tmp t;
  IdxArray img = synthetic(21, 3, 2, 12);
  IdxArray lab;
  lab.dims = {21};
  lab.data.resize(21);
  std::iota(lab.data.begin(), lab.data.end(), 100);
  write_split(t / "s", "train", img, &lab, 2, "x", false);
  const std::vector<std::string> sums = manifest_checksums(t / "s");
  ASSERT_EQ(sums.size(), 2u);
  // Shard 0 holds samples [0, 10), shard 1 [10, 21).
  EXPECT_EQ(sums[0], shard_checksum(img.data.data(), 10 * 6, lab.data.data(), 10));
  EXPECT_EQ(sums[1], shard_checksum(img.data.data() + 60, 11 * 6, lab.data.data() + 10, 11));
  EXPECT_TRUE(std::regex_match(sums[0], std::regex("fnv1a64:[0-9a-f]{16}")));
  // The checksum of nothing is the offset basis of util/checksum.hpp, 1469598103934665603
  // (the published FNV basis is 14695981039346656037; model files and checkpoints use
  // this one, and readers of the manifest must too): pinned so that it cannot drift.
  EXPECT_EQ(shard_checksum(nullptr, 0, nullptr, 0), "fnv1a64:14650fb0739d0383");
}

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

TEST(Shards, VerifyFindsAFlippedByteAndNamesTheShard) {
  Tmp t;
  IdxArray img = synthetic(30, 4, 4, 13);  // random bytes: a 16-byte sample is unique in the file
  write_split(t / "s", "train", img, nullptr, 3, "x", false);
  VerifyResult ok = verify_split(t / "s");
  EXPECT_TRUE(ok.problems.empty());
  EXPECT_EQ(ok.shards, 3);
  EXPECT_EQ(ok.samples, 30);
  EXPECT_EQ(ok.without_checksum, 0);
  const std::string shard = t / "s/shard-00001-of-00003.h5";
  std::vector<uint8_t> bytes = file_bytes(shard);
  const uint8_t* sample13 = img.data.data() + 13 * 16;
  auto at = std::search(bytes.begin(), bytes.end(), sample13, sample13 + 16);
  ASSERT_NE(at, bytes.end());
  at[5] ^= 0x10;
  write_file(shard, bytes);
  VerifyResult bad = verify_split(t / "s");
  ASSERT_EQ(bad.problems.size(), 1u);
  EXPECT_NE(bad.problems[0].find("shard-00001-of-00003.h5: checksum mismatch"), std::string::npos) << bad.problems[0];
  // A missing shard and a shard of another shape are named too.
  fs::remove(t / "s/shard-00002-of-00003.h5");
  bad = verify_split(t / "s");
  ASSERT_EQ(bad.problems.size(), 2u);
  EXPECT_NE(bad.problems[1].find("shard-00002-of-00003.h5: shard file listed in the manifest is missing"),
            std::string::npos);
}

TEST(Shards, ManifestsWithoutChecksumsStillReadAndVerifyByShape) {
  Tmp t;
  IdxArray img = synthetic(12, 2, 3, 14);
  write_split(t / "s", "train", img, nullptr, 2, "x", false);
  std::ifstream in(t / "s/manifest.yaml");
  std::string text(std::istreambuf_iterator<char>(in), {});
  in.close();
  text = std::regex_replace(text, std::regex("\\n *checksum: [^\\n]*"), "");
  ASSERT_EQ(text.find("checksum"), std::string::npos);
  std::ofstream(t / "s/manifest.yaml") << text;
  EXPECT_EQ(ShardSet::open(t / "s").size(), 12);
  VerifyResult r = verify_split(t / "s");
  EXPECT_TRUE(r.problems.empty());
  EXPECT_EQ(r.without_checksum, 2);
}

TEST(Shards, SeededTestSplitIsDisjointCompleteAndReproducible) {
  auto a = split_indices(100, 0.2, 7), b = split_indices(100, 0.2, 7), c = split_indices(100, 0.2, 8);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_EQ(a[1], b[1]);
  EXPECT_NE(a[1], c[1]);
  EXPECT_EQ(a[1].size(), 20u);
  std::vector<int64_t> all = a[0];
  all.insert(all.end(), a[1].begin(), a[1].end());
  std::sort(all.begin(), all.end());
  for (int64_t i = 0; i < 100; ++i) EXPECT_EQ(all[size_t(i)], i);
  EXPECT_TRUE(std::is_sorted(a[1].begin(), a[1].end()));
  EXPECT_THROW(split_indices(3, 0.1, 1), Error);  // no test sample
  EXPECT_THROW(split_indices(3, 1.0, 1), Error);
}

TEST(Shards, ChunksHoldAFewHundredWholeSamples) {
  EXPECT_EQ(chunk_samples(784, 60000), 256);
  EXPECT_EQ(chunk_samples(3 * 64 * 64, 100000), 256);
  EXPECT_EQ(chunk_samples(3 * 1024 * 1024, 1000), 1);  // big samples: one per chunk (~4 MiB cap)
  EXPECT_EQ(chunk_samples(784, 10), 10);
}

}  // namespace
}  // namespace elbo::data
