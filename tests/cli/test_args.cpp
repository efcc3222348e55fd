// The command line on CLI11 (cli/args.hpp): values arrive exactly as written, in
// decimal, one per --set, the last of a repeated option; every mistake is a usage
// error naming the command and the argument.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "elbo/cli/args.hpp"
#include "elbo/util/error.hpp"

namespace elbo::cli {
namespace {

using ::testing::HasSubstr;

// `tool run SPEC [--set K=V ...] [-n N] [--rate R] [--device auto|cpu|cuda] [--out FILE]`,
// a miniature of `elbo` with one subcommand.
struct Tool {
  CommandLine line{"tool", "a test command line"};
  CLI::App* run = line.add_subcommand("run", "run something");
  std::string spec, out, device = "auto";
  std::vector<std::string> sets;
  int64_t n = 5;
  double rate = 0.5;
  Tool() {
    add_positional(*run, "SPEC", &spec, "the spec");
    add_repeated(*run, "--set", &sets, "KEY=VALUE", "override");
    add_integer(*run, "-n", &n, "N", "how many", 1, 1000);
    add_number(*run, "--rate", &rate, "R", "a rate", 0);
    add_choice(*run, "--device", &device, {"auto", "cpu", "cuda"}, "where");
    add_text(*run, "--out", &out, "FILE", "where to write")->required();
  }
  std::optional<std::string> parse(const std::vector<std::string>& args) { return line.parse_args(args); }
};

// The usage error `args` raise (fails the test when they raise none or another kind).
std::string usage_message(const std::vector<std::string>& args) {
  Tool t;
  try {
    t.parse(args);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error for the arguments";
  return "";
}

TEST(CommandLine, ValuesArriveAsWritten) {
  Tool t;
  EXPECT_FALSE(t.parse({"run", "--set", "a=1", "s.yaml", "--set", "model.encoder=[32, 16]", "--set", "data.test=", "-n",
                        "010", "--device", "cpu", "--out", "o.png"}));
  EXPECT_EQ(t.line.chosen(), t.run);
  EXPECT_EQ(t.spec, "s.yaml");  // --set takes one value, never the spec after it
  EXPECT_EQ(t.sets, (std::vector<std::string>{"a=1", "model.encoder=[32, 16]", "data.test="}));
  EXPECT_EQ(t.n, 10);  // decimal: CLI11 alone would read "010" as octal 8
  EXPECT_EQ(t.device, "cpu");
  EXPECT_EQ(t.out, "o.png");
}

TEST(CommandLine, ARepeatedOptionKeepsItsLastValue) {
  Tool t;
  t.parse({"run", "s.yaml", "-n", "3", "--out", "a", "-n", "7", "--out=b"});
  EXPECT_EQ(t.n, 7);
  EXPECT_EQ(t.out, "b");
}

TEST(CommandLine, NumbersArriveBitForBit) {
  // Each text must give exactly what std::stod gives. CLI11's own conversion reads a
  // long double and rounds it again, which differs in the last bit for the last three
  // (found by a search over random decimals).
  for (const char* text : {"0.1", "0.30000000000000004", "1e-300", "2.2250738585072014e-308", "1.7976931348623157e308",
                           "7", "917502988.83973962233e-18", "96824351.60294988900e-29", "631242184.97335027902e-1"}) {
    Tool t;
    t.parse({"run", "s.yaml", "--out", "o", "--rate", text});
    const double want = std::stod(text);
    EXPECT_EQ(std::memcmp(&t.rate, &want, sizeof want), 0) << text << ": got " << t.rate;
  }
}

TEST(CommandLine, RefusedValuesNameTheCommandAndTheOption) {
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "-n", "ten"}),
            "tool run: option -n expects an integer, got 'ten'");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "-n", "0x10"}),
            "tool run: option -n expects an integer, got '0x10'");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "-n", "0"}), "tool run: option -n must be >= 1 (got 0)");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "-n", "1001"}), "tool run: option -n must be <= 1000 (got 1001)");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "--rate", "inf"}),
            "tool run: option --rate expects a number, got 'inf'");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "--rate", "-0.5"}),
            "tool run: option --rate must be >= 0 (got -0.5)");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "--device", "gpu"}),
            "tool run: option --device must be one of auto, cpu, cuda (got 'gpu')");
}

TEST(CommandLine, MissingAndUnknownArgumentsAreNamed) {
  EXPECT_EQ(usage_message({"run", "--out", "o"}), "tool run: missing SPEC (see --help)");
  EXPECT_EQ(usage_message({"run", "s"}), "tool run: option --out is required (see --help)");
  EXPECT_THAT(usage_message({"run", "s", "--out"}), HasSubstr("tool run: --out"));
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "--sett=1"}), "tool run: unknown option '--sett' (see --help)");
  EXPECT_EQ(usage_message({"run", "s", "--out", "o", "t"}), "tool run: unexpected argument 't' (see --help)");
  EXPECT_EQ(usage_message({"--bogus", "run", "s", "--out", "o"}), "unknown option '--bogus' (see --help)");
  EXPECT_EQ(usage_message({"rnu"}), "unknown command 'rnu'; valid commands: run (see tool --help)");
  EXPECT_EQ(usage_message({}), "no command given; valid commands: run (see tool --help)");
}

TEST(CommandLine, HelpAndVersionAreReturnedNotRun) {
  Tool t;
  t.line.set_version_flag("--version", "tool 1.2");
  const auto help = t.parse({"run", "--help"});  // before the required arguments: still help
  ASSERT_TRUE(help);
  EXPECT_THAT(*help, HasSubstr("Usage: tool run"));
  for (const char* o : {"SPEC", "--set KEY=VALUE", "-n N", "--rate R", "--device auto|cpu|cuda", "--out FILE"})
    EXPECT_THAT(*help, HasSubstr(o));
  Tool v;
  v.line.set_version_flag("--version", "tool 1.2");
  EXPECT_EQ(v.parse({"--version"}), std::optional<std::string>("tool 1.2\n"));
}

}  // namespace
}  // namespace elbo::cli
