// Checkpoint directory rules without a training run: which checkpoint --resume auto
// picks when `latest` and the files on disk disagree.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "elbo/ckpt/checkpoint.hpp"

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

}  // namespace
}  // namespace elbo
