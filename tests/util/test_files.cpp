// Safe file replacement: what a failed rename reports and leaves behind.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"

namespace elbo {
namespace {

namespace fs = std::filesystem;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::Not;

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("elbo-test-files-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

TEST(RenameIntoPlace, KeepsTheRenameErrorNotTheCleanupResult) {
  TempDir d;
  const std::string tmp = (d.path / "out.tmp").string();
  std::ofstream(tmp) << "new";
  // A non-empty directory where the file should go: rename(2) fails (EISDIR), while
  // removing the temporary file afterwards succeeds; the message must carry the former.
  fs::create_directories(d.path / "out" / "inside");
  const std::string target = (d.path / "out").string();
  try {
    rename_into_place(tmp, target);
    FAIL() << "rename onto a non-empty directory succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    const std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr(tmp));
    EXPECT_THAT(msg, HasSubstr(target));
    EXPECT_THAT(msg, Not(EndsWith("Success"))) << msg;
    EXPECT_THAT(msg, HasSubstr(std::error_code(EISDIR, std::generic_category()).message())) << msg;
  }
  EXPECT_FALSE(fs::exists(tmp)) << "the temporary file is removed";
  EXPECT_TRUE(fs::is_directory(d.path / "out" / "inside")) << "what was there is untouched";
}

}  // namespace
}  // namespace elbo
