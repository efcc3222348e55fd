// elbo's command lines on CLI11: typed options that convert and check their text in
// elbo's words, and one parse that turns every mistake into a usage error (exit 2)
// naming the command and the argument.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace elbo::cli {

// A command line (`elbo`, with its subcommands, or `elbo-shard`) with elbo's rules,
// which its subcommands inherit: a single-value option given twice keeps the last
// value (job scripts append to a command line: `--resume auto "$@"`), at most one
// subcommand, and arguments that nothing takes are kept so that parse_args can name them.
class CommandLine : public CLI::App {
 public:
  CommandLine(const std::string& name, const std::string& description);

  // Parses `args` (argv without the program name). Returns the text to print instead
  // of running (for --help of the command line or of a subcommand, and --version).
  // Throws a Usage error, prefixed with the subcommand ("elbo eval: "), for an unknown
  // option, command or argument, a missing one, or a value its option refuses.
  std::optional<std::string> parse_args(const std::vector<std::string>& args);

  // The chosen subcommand (nullptr when none was given).
  const CLI::App* chosen() const;
};

// A decimal integer in [lo, hi]. Anything else is refused as "option -n expects an
// integer, got 'ten'" or "option -n must be >= 1 (got 0)".
CLI::Option* add_integer(CLI::App& app, const std::string& name, int64_t* target, const std::string& metavar,
                         const std::string& help, int64_t lo = INT64_MIN, int64_t hi = INT64_MAX);
// A finite number >= lo.
CLI::Option* add_number(CLI::App& app, const std::string& name, double* target, const std::string& metavar,
                        const std::string& help, double lo);
// One of `choices`, which the help shows as the value (auto|cpu|cuda).
CLI::Option* add_choice(CLI::App& app, const std::string& name, std::string* target,
                        const std::vector<std::string>& choices, const std::string& help);
// A text option.
CLI::Option* add_text(CLI::App& app, const std::string& name, std::string* target, const std::string& metavar,
                      const std::string& help);
// A text option that may repeat, one value each time: --set a=1 --set b=2.
CLI::Option* add_repeated(CLI::App& app, const std::string& name, std::vector<std::string>* target,
                          const std::string& metavar, const std::string& help);
// A positional argument that must be given ("missing MODEL" otherwise).
CLI::Option* add_positional(CLI::App& app, const std::string& name, std::string* target, const std::string& help);

// Refuses an output file that could not be written at the end of a long command: its
// directory must exist and be writable, and the path must not be a directory. Throws a
// Usage error naming `option` (e.g. "elbo eval --output").
void check_output_file(const std::string& path, const std::string& option);

}  // namespace elbo::cli
