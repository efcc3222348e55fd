// The reader's integrity checks: pixels stored as another type than uint8 are refused
// (HDF5 would convert them silently), and shard checksums from the manifest are
// verified, in memory and in on-demand (stream) mode, each file by some rank.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <numeric>

#include "elbo/util/error.hpp"
#include "shard_test_util.hpp"

namespace elbo::data {
namespace {

namespace fs = std::filesystem;
using namespace elbo::data::testing;

struct Tmp {
  fs::path dir;
  Tmp() {
    static int counter = 0;
    dir = fs::temp_directory_path() / ("elbo_test_checks_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Tmp() { fs::remove_all(dir); }
  std::string operator/(const std::string& n) const { return (dir / n).string(); }
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Data) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

// Rewrites shard `name` of `dir` with its images stored as HDF5 type `type`
// (values converted by HDF5 from the uint8 pixels, scaled to [0, 1] for floats).
void rewrite_images_as(const std::string& file, hid_t type, bool scale01) {
  std::vector<hsize_t> shape;
  std::vector<uint8_t> px;
  int64_t offset;
  {
    h5::Id f = h5::open_file(file);
    px = h5::read_dataset<uint8_t>(f, "images", &shape);
    offset = h5::read_attr_int(f, "global_offset");
  }
  h5::Id f = h5::create_file(file);
  h5::Id space(H5Screate_simple(4, shape.data(), nullptr), H5Sclose);
  h5::Id ds(H5Dcreate2(f, "images", type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (scale01) {
    std::vector<float> v(px.size());
    for (size_t i = 0; i < px.size(); ++i) v[i] = px[i] / 255.0f;
    H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  } else {
    H5Dwrite(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, px.data());
  }
  h5::write_attr_int(f, "global_offset", offset);
}

TEST(ShardChecks, ImagesStoredAsAnotherTypeAreRefusedNamingTheFile) {
  struct Case {
    const char* name;
    hid_t type;
    bool scale;
  };
  for (const Case& c : {Case{"float32", H5T_IEEE_F32LE, true}, Case{"uint16", H5T_STD_U16LE, false},
                        Case{"int8", H5T_STD_I8LE, false}, Case{"float64", H5T_IEEE_F64LE, true}}) {
    Tmp t;
    IdxArray img = random_images(40, 1, 4, 4, 1);
    write_split(t / "s", "train", img, nullptr, 2, "synthetic", false);
    rewrite_images_as(t / "s/shard-00001-of-00002.h5", c.type, c.scale);
    for (bool load : {true, false}) {
      const std::string e = error_of([&] { ShardSet::open(t / "s", OpenOptions{load, 0, 1}); });
      EXPECT_NE(e.find("shard-00001-of-00002.h5: images is stored as " + std::string(c.name) + ", not uint8"),
                std::string::npos)
          << e;
    }
  }
}

TEST(ShardChecks, ChecksumsVerifyAndUnverifiedSplitsSaySo) {
  Tmp t;
  IdxArray img = random_images(300, 1, 32, 32, 2);
  IdxArray lab;
  lab.dims = {300};
  lab.data.resize(300);
  std::iota(lab.data.begin(), lab.data.end(), 0);
  write_split(t / "s", "train", img, &lab, 3, "synthetic", false);
  // The writer's checksums are the reader's definition (images, then labels).
  const std::vector<std::string> written = remove_checksums(t / "s");
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(written[i], shard_checksum(t / ("s/shard-0000" + std::to_string(i) + "-of-00003.h5")))
        << "shard " << i;
  {
    ShardSet s = ShardSet::open(t / "s");
    EXPECT_NE(s.verification_note().find("unverified: 3 of 3 shard(s)"), std::string::npos) << s.verification_note();
  }
  add_checksums(t / "s");
  for (bool load : {true, false}) {
    ShardSet s = ShardSet::open(t / "s", OpenOptions{load, 0, 1});
    EXPECT_EQ(s.verification_note(), "");
    EXPECT_EQ(s.shards()[1].checksum.substr(0, 8), "fnv1a64:");
    std::vector<int64_t> all(300);
    std::iota(all.begin(), all.end(), 0);
    std::vector<uint8_t> out(img.data.size());
    s.gather(all, out.data());
    EXPECT_EQ(out, img.data) << "load " << load;
  }
  // A checksum over the images alone (labels left out) does not match.
  fs::copy(t / "s", t / "nolab", fs::copy_options::recursive);
  {
    YAML::Node m = YAML::LoadFile(t / "nolab/manifest.yaml");
    h5::Id f = h5::open_file(t / "nolab/shard-00000-of-00003.h5");
    std::vector<uint8_t> px = h5::read_dataset<uint8_t>(f, "images");
    Fnv1a64 h;
    h.update(px.data(), px.size());
    m["shards"][0]["checksum"] = "fnv1a64:" + h.hex();
    YAML::Emitter out;
    out << m;
    std::ofstream(t / "nolab/manifest.yaml") << out.c_str() << "\n";
  }
  EXPECT_NE(error_of([&] { ShardSet::open(t / "nolab"); }).find("shard-00000-of-00003.h5: checksum mismatch"),
            std::string::npos);
  // A malformed checksum value.
  fs::copy(t / "s", t / "bad", fs::copy_options::recursive);
  {
    YAML::Node m = YAML::LoadFile(t / "bad/manifest.yaml");
    m["shards"][2]["checksum"] = "md5:1234";
    YAML::Emitter out;
    out << m;
    std::ofstream(t / "bad/manifest.yaml") << out.c_str() << "\n";
  }
  EXPECT_NE(error_of([&] { ShardSet::open(t / "bad"); }).find("shard-00002-of-00003.h5: checksum 'md5:1234' is not"),
            std::string::npos);
}

TEST(ShardChecks, GarbageInTheImagesIsFoundInEveryMode) {
  Tmp t;
  IdxArray img = random_images(300, 1, 32, 32, 3);
  write_split(t / "s", "train", img, nullptr, 3, "synthetic", false);
  add_checksums(t / "s");
  damage_images(t / "s/shard-00001-of-00003.h5", 10, 64 * 1024);
  for (bool load : {true, false}) {
    const std::string e = error_of([&] { ShardSet::open(t / "s", OpenOptions{load, 0, 1}); });
    EXPECT_NE(e.find("shard-00001-of-00003.h5: checksum mismatch"), std::string::npos) << e;
  }
  // On demand with 2 ranks, shard 1 is rank 1's to verify: rank 1 finds it, rank 0 does
  // not read it (the job fails because opening is agreed collectively).
  EXPECT_NE(error_of([&] { ShardSet::open(t / "s", OpenOptions{false, 1, 2}); }).find("checksum mismatch"),
            std::string::npos);
  EXPECT_NO_THROW(ShardSet::open(t / "s", OpenOptions{false, 0, 2}));
}

TEST(ShardChecks, OnDemandReadsCountBytesAndRuns) {
  Tmp t;
  IdxArray img = random_images(100, 1, 4, 4, 4);
  write_split(t / "s", "train", img, nullptr, 3, "synthetic", false);
  ShardSet s = ShardSet::open(t / "s", OpenOptions{false, 0, 1});
  EXPECT_FALSE(s.loaded());
  std::vector<int64_t> idx = {5, 6, 7, 32, 33, 34, 99, 0};  // 33 and 34 straddle shards 0|1
  std::vector<uint8_t> out(idx.size() * 16);
  s.gather(idx, out.data());
  for (size_t i = 0; i < idx.size(); ++i)
    EXPECT_TRUE(std::equal(out.begin() + i * 16, out.begin() + (i + 1) * 16, img.data.begin() + idx[i] * 16)) << i;
  EXPECT_EQ(s.bytes_read(), idx.size() * 16);
  EXPECT_EQ(s.reads(), 5u);  // [5,8), [32,33) + [33,35) (two shards), [99], [0]
}

TEST(ShardChecks, OnDemandReadsReopenFilesPastTheOpenFileCap) {
  Tmp t;
  IdxArray img = random_images(300, 1, 2, 2, 5);
  write_split(t / "s", "train", img, nullptr, 150, "synthetic", false);  // more shards than files kept open
  ShardSet s = ShardSet::open(t / "s", OpenOptions{false, 0, 1});
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<int64_t> idx(300);
    std::iota(idx.rbegin(), idx.rend(), 0);  // backwards: every file closed and opened again
    std::vector<uint8_t> out(300 * 4);
    s.gather(idx, out.data());
    for (size_t i = 0; i < idx.size(); ++i)
      ASSERT_TRUE(std::equal(out.begin() + i * 4, out.begin() + (i + 1) * 4, img.data.begin() + idx[i] * 4)) << i;
  }
}

}  // namespace
}  // namespace elbo::data
