// Progress output in its three modes, as a terminal, a SLURM log and a quiet run see it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "elbo/util/progress.hpp"

namespace elbo {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string run(const char* mode, bool enabled, bool lines, int total, int step) {
  setenv("ELBO_PROGRESS", mode, 1);
  ::testing::internal::CaptureStderr();
  {
    Progress p("work", total, enabled, lines);
    for (int i = step; i <= total; i += step) p.update(i);
  }
  unsetenv("ELBO_PROGRESS");
  return ::testing::internal::GetCapturedStderr();
}

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

TEST(Progress, LinesModePrintsEveryTenPercentAndTheEnd) {
  const std::string out = run("lines", true, true, 1000, 7);
  EXPECT_EQ(count(out, "\n"), 10) << out;  // 10% .. 90%, then the final line at 100%
  EXPECT_THAT(out, HasSubstr("work:  50% "));
  EXPECT_THAT(out, HasSubstr("work:  99% 994/1000 [00:00, "));  // the final line: where it stopped, no eta
  EXPECT_THAT(out.substr(out.rfind("work:")), Not(HasSubstr("eta")));
  EXPECT_THAT(out, Not(HasSubstr("\r")));
}

TEST(Progress, BarModeRedrawsInPlaceAndEndsWithANewline) {
  setenv("ELBO_PROGRESS", "bar", 1);
  ::testing::internal::CaptureStderr();
  {
    Progress p("eval", 10);
    p.update(3);  // throttled: at most ten draws a second, the first may be skipped
    p.clear();
    p.update(10);
    p.finish();
  }
  unsetenv("ELBO_PROGRESS");
  const std::string out = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(out, HasSubstr("\reval |##############################| 100% 10/10"));
  EXPECT_EQ(out.back(), '\n');
  EXPECT_EQ(count(out, "\n"), 1);
}

TEST(Progress, OffDisabledAndBarOnlyModesPrintNothing) {
  EXPECT_EQ(run("off", true, true, 100, 10), "");
  EXPECT_EQ(run("lines", false, true, 100, 10), "");  // ranks other than 0
  EXPECT_EQ(run("lines", true, false, 100, 10), "");  // training epochs outside a terminal
}

TEST(Progress, DurationsReadAsClockTimes) {
  EXPECT_EQ(format_duration(0), "00:00");
  EXPECT_EQ(format_duration(125.4), "02:05");
  EXPECT_EQ(format_duration(3 * 3600 + 61), "3:01:01");
}

}  // namespace
}  // namespace elbo
