// Checkpoint and model files without a training run: which checkpoint --resume auto
// picks when `latest` and the files on disk disagree, the checkpoint checksum's
// stability, and model files' checksums (corruption caught, older files still read).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/util/h5.hpp"

namespace elbo {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("elbo-test-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

const char* kSpec = R"(
data: {train: /nonexistent}
model: {encoder: [6], decoder: [5], latent: 3}
)";

// A tiny model: its spec, input shape and parameters derived from `step`.
struct Tiny {
  ExperimentSpec spec = parse_spec(kSpec, "test spec");
  std::vector<int> shape = {1, 2, 4};
  VaeLayout layout{spec.model, shape};
  std::vector<float> params;
  explicit Tiny(int64_t step) : params(layout.num_params()) {
    for (size_t i = 0; i < params.size(); ++i) params[i] = static_cast<float>(step) + 0.001f * static_cast<float>(i);
  }
};

// A tiny model's checkpoint at `step`; every array holds values derived from the step.
void write_at(const fs::path& dir, int64_t step) {
  const ExperimentSpec spec = parse_spec(kSpec, "test spec");
  const std::vector<int> shape = {1, 2, 4};
  const VaeLayout layout(spec.model, shape);
  std::vector<float> p(layout.num_params()), m(p.size()), v(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] = static_cast<float>(step) + 0.001f * static_cast<float>(i);
    m[i] = -p[i];
    v[i] = 2 * p[i];
  }
  TrainState st;
  st.step = step;
  st.adam_steps = step;
  st.world_size = 1;
  write_checkpoint((dir / checkpoint_file_name(step)).string(), spec, shape, layout, p.data(), m.data(), v.data(), st);
}

TEST(FindResumeCheckpoint, NewestVerifiedWinsOverAnOlderLatest) {
  TempDir d("resume-latest");
  for (int64_t s : {10, 20, 30}) write_at(d.path, s);
  std::ofstream(d.path / "latest") << checkpoint_file_name(10) << "\n";  // stale pointer
  Checkpoint c;
  std::vector<std::string> skipped;
  ASSERT_TRUE(find_resume_checkpoint(d.path.string(), &c, &skipped));
  EXPECT_EQ(c.state.step, 30);
  EXPECT_EQ(fs::path(c.path).filename(), checkpoint_file_name(30));
  EXPECT_TRUE(skipped.empty());
}

TEST(FindResumeCheckpoint, FallsBackPastADamagedNewestNotToLatest) {
  TempDir d("resume-damaged");
  for (int64_t s : {10, 20, 30}) write_at(d.path, s);
  std::ofstream(d.path / "latest") << checkpoint_file_name(10) << "\n";
  fs::resize_file(d.path / checkpoint_file_name(30), 100);  // truncated
  Checkpoint c;
  std::vector<std::string> skipped;
  ASSERT_TRUE(find_resume_checkpoint(d.path.string(), &c, &skipped));
  EXPECT_EQ(c.state.step, 20);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_THAT(skipped[0], HasSubstr(checkpoint_file_name(30)));
}

// The checkpoint checksum's value for a fixed checkpoint, as elbo computed it before
// the model file shared the code: checkpoints on disk must keep verifying.
TEST(CheckpointFormat, ChecksumIsUnchanged) {
  TempDir d("ckpt-checksum");
  write_at(d.path, 10);
  h5::Id f = h5::open_file((d.path / checkpoint_file_name(10)).string());
  EXPECT_EQ(h5::read_attr_string(f, "checksum_fnv1a64"), "64057f011964c061");
}

// The named views agree (the alignment gaps between them are not stored).
void expect_same_views(const std::vector<float>& got, const Tiny& want) {
  for (const auto& v : want.layout.views())
    for (size_t i = 0; i < v.numel(); ++i)
      ASSERT_EQ(got[v.offset + i], want.params[v.offset + i]) << v.name << "[" << i << "]";
}

std::string write_model(const fs::path& dir) {
  const Tiny t(7);
  const std::string path = (dir / "model.h5").string();
  write_model_file(path, t.spec, t.shape, t.layout, t.params.data(), 7, 1);
  return path;
}

TEST(ModelFile, VerifiesOnLoad) {
  TempDir d("model-ok");
  const ModelFile mf = read_model_file(write_model(d.path));
  EXPECT_TRUE(mf.verified);
  expect_same_views(mf.params, Tiny(7));
}

// One flipped bit in the data of one array, found through HDF5's own offset of it.
TEST(ModelFile, FlippedByteInParameterDataIsAnErrorNamingFileAndArray) {
  TempDir d("model-flip");
  const std::string path = write_model(d.path);
  const std::string array = "params/encoder.mu.weight";
  haddr_t offset = HADDR_UNDEF;
  {
    h5::Id f = h5::open_file(path);
    h5::Id ds(H5Dopen2(f, array.c_str(), H5P_DEFAULT), H5Dclose);
    ASSERT_TRUE(ds.valid());
    offset = H5Dget_offset(ds);
  }
  ASSERT_NE(offset, HADDR_UNDEF);
  {
    std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(static_cast<std::streamoff>(offset) + 5);
    char c = 0;
    io.read(&c, 1);
    c = static_cast<char>(c ^ 0x10);
    io.seekp(static_cast<std::streamoff>(offset) + 5);
    io.write(&c, 1);
  }
  try {
    read_model_file(path);
    FAIL() << "a model file with a flipped byte loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_THAT(e.what(), HasSubstr(path));
    EXPECT_THAT(e.what(), HasSubstr("'" + array + "': checksum mismatch"));
  }
}

// A file as elbo wrote it before model checksums: it loads, marked unverified.
TEST(ModelFile, FileWithoutChecksumsLoadsUnverified) {
  TempDir d("model-legacy");
  const std::string path = write_model(d.path);
  {
    h5::Id f = h5::open_file(path, true);
    ASSERT_GE(H5Adelete(f, "checksum_fnv1a64"), 0);
    const Tiny t(7);
    for (const auto& v : t.layout.views())
      ASSERT_GE(H5Adelete_by_name(f, ("params/" + v.name).c_str(), "checksum_fnv1a64", H5P_DEFAULT), 0);
  }
  const ModelFile mf = read_model_file(path);
  EXPECT_FALSE(mf.verified);
  expect_same_views(mf.params, Tiny(7));
}

}  // namespace
}  // namespace elbo
