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
#include "elbo/model/vae.hpp"
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
  write_checkpoint((dir / checkpoint_file_name(step)).string(), spec, shape, layout, p.data(), m.data(), v.data(),
                   nullptr, st);
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

// A checkpoint with the moving average (optim.ema) and the best-so-far: both read back
// as written, the average is under the checksum, and one without them reads as before.
TEST(CheckpointFormat, MovingAverageAndBestSoFarRoundTrip) {
  TempDir d("ckpt-ema");
  const Tiny t(12);
  std::vector<float> m(t.params.size(), 0.5f), v(t.params.size(), 0.25f), ema(t.params.size());
  for (size_t i = 0; i < ema.size(); ++i) ema[i] = 0.9f * t.params[i];
  TrainState st;
  st.step = 12;
  st.adam_steps = 12;
  st.best_bound = 123.456789;
  st.best_step = 10;
  st.evals_since_best = 2;
  const std::string path = (d.path / checkpoint_file_name(12)).string();
  write_checkpoint(path, t.spec, t.shape, t.layout, t.params.data(), m.data(), v.data(), ema.data(), st);
  const Checkpoint c = read_checkpoint(path);
  ASSERT_EQ(c.ema.size(), ema.size());
  for (const auto& view : t.layout.views())
    for (size_t i = 0; i < view.numel(); ++i) ASSERT_EQ(c.ema[view.offset + i], ema[view.offset + i]) << view.name;
  EXPECT_EQ(c.state.best_bound, 123.456789);
  EXPECT_EQ(c.state.best_step, 10);
  EXPECT_EQ(c.state.evals_since_best, 2);
  {
    h5::Id f = h5::open_file(path);
    EXPECT_TRUE(h5::exists(f, "optim/ema/encoder.mu.weight"));
  }
  // Without them: no /optim/ema, no best (-1), and the checksum of a checkpoint as before.
  write_at(d.path, 10);
  const Checkpoint plain = read_checkpoint((d.path / checkpoint_file_name(10)).string());
  EXPECT_TRUE(plain.ema.empty());
  EXPECT_EQ(plain.state.best_step, -1);

  // One value of the average changed in place: the checksum catches it.
  {
    h5::Id f = h5::open_file(path, true);
    h5::Id ds(H5Dopen2(f, "optim/ema/encoder.mu.bias", H5P_DEFAULT), H5Dclose);
    ASSERT_TRUE(ds.valid());
    std::vector<float> bias(t.layout.latent());
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, bias.data()), 0);
    bias[0] += 1.0f;
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, bias.data()), 0);
  }
  try {
    read_checkpoint(path);
    FAIL() << "a changed moving average passed the checksum";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("checksum mismatch"));
  }
}

// With optim.ema the model file's /params is the average (what every reader loads) and
// /params_raw the parameters, each array with its checksum; best.h5's bound attribute.
TEST(ModelFile, RawParametersBesideTheAverage) {
  TempDir d("model-ema");
  const Tiny avg(7), raw(9);
  const std::string path = (d.path / "model.h5").string();
  ModelFileExtras extras;
  extras.raw_params = raw.params.data();
  extras.ema = 0.999;
  extras.has_bound = true;
  extras.bound = 98.5;
  extras.eval_samples = 200;
  write_model_file(path, avg.spec, avg.shape, avg.layout, avg.params.data(), 7, 1, extras);
  const ModelFile mf = read_model_file(path);
  EXPECT_TRUE(mf.verified);
  expect_same_views(mf.params, avg);
  {
    h5::Id f = h5::open_file(path);
    EXPECT_EQ(h5::read_attr_double(f, "ema"), 0.999);
    EXPECT_EQ(h5::read_attr_double(f, "test_neg_elbo"), 98.5);
    EXPECT_EQ(h5::read_attr_int(f, "eval_samples"), 200);
    std::vector<float> back;
    detail::read_param_views(f, "params_raw", raw.layout, path, &back);
    expect_same_views(back, raw);
    for (const auto& v : raw.layout.views()) {
      h5::Id ds(H5Dopen2(f, ("params_raw/" + v.name).c_str(), H5P_DEFAULT), H5Dclose);
      EXPECT_TRUE(h5::has_attr(ds, "checksum_fnv1a64")) << v.name;
    }
  }
  // Without extras: neither the attributes nor /params_raw.
  write_model(d.path);
  h5::Id g = h5::open_file((d.path / "model.h5").string());
  EXPECT_FALSE(h5::has_attr(g, "ema"));
  EXPECT_FALSE(h5::exists(g, "params_raw"));
}

}  // namespace
}  // namespace elbo
