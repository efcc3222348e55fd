// elbo's rules and messages on top of CLI11 (see args.hpp).
#include "elbo/cli/args.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "elbo/util/error.hpp"

namespace elbo::cli {
namespace {

// A value elbo refuses, in its own words. Thrown from a transform inside CLI11's
// parse: CLI11 passes a ConversionError through untouched (it catches only
// ValidationError, to prefix it with the option's name).
[[noreturn]] void refuse(const std::string& message) { throw CLI::ConversionError(message); }

std::string join(const std::vector<std::string>& words, const char* sep) {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : sep) + w;
  return out;
}

// "elbo eval: " for a subcommand, "" for the command itself: its own name is in
// front of every message already ("elbo: usage error: ...", "elbo-shard: ...").
std::string prefix(const CLI::App* command) {
  if (command == nullptr || command->get_parent() == nullptr) return "";
  return command->get_parent()->get_name() + " " + command->get_name() + ": ";
}

// "--sett=1" -> "--sett": an unknown option is named without its value.
std::string option_name(const std::string& arg) { return arg.substr(0, arg.find('=')); }

}  // namespace

CommandLine::CommandLine(const std::string& name, const std::string& description) : CLI::App(description, name) {
  option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  get_formatter()->column_width(32);  // "--loader auto|memory|stream" and its help apart
  allow_extras(true);
  require_subcommand(0, 1);
}

const CLI::App* CommandLine::chosen() const {
  const auto chosen = get_subcommands();
  return chosen.empty() ? nullptr : chosen.front();
}

std::optional<std::string> CommandLine::parse_args(const std::vector<std::string>& args) {
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them last first
  try {
    parse(reversed);
  } catch (const CLI::CallForHelp&) {
    return help();  // the chosen subcommand's, when there is one
  } catch (const CLI::CallForVersion& e) {
    return std::string(e.what()) + "\n";
  } catch (const CLI::RequiredError& e) {
    // Name what is missing in elbo's words: the first required argument not given.
    const CLI::App* command = chosen() != nullptr ? chosen() : this;
    for (const CLI::Option* o : command->get_options()) {
      if (!o->get_required() || o->count() > 0) continue;
      throw usage_error(prefix(command) +
                        (o->nonpositional() ? "option " + o->get_name() + " is required" : "missing " + o->get_name()) +
                        " (see --help)");
    }
    throw usage_error(prefix(command) + e.what());
  } catch (const CLI::ParseError& e) {
    throw usage_error(prefix(chosen()) + e.what());
  }

  // What no option, positional or subcommand took.
  std::vector<std::string> subcommands;
  for (const CLI::App* s : get_subcommands([](const CLI::App*) { return true; })) subcommands.push_back(s->get_name());
  const std::vector<std::string> left = remaining();
  if (!left.empty() && left.front().rfind('-', 0) != 0 && !subcommands.empty())
    throw usage_error("unknown command '" + left.front() + "'; valid commands: " + join(subcommands, ", ") + " (see " +
                      get_name() + " --help)");
  for (const CLI::App* command : {static_cast<const CLI::App*>(this), chosen()}) {
    if (command == nullptr || command->remaining().empty()) continue;
    const std::string a = command->remaining().front();
    throw usage_error(
        prefix(command) +
        (a.rfind('-', 0) == 0 ? "unknown option '" + option_name(a) + "'" : "unexpected argument '" + a + "'") +
        " (see --help)");
  }
  if (!subcommands.empty() && chosen() == nullptr)
    throw usage_error("no command given; valid commands: " + join(subcommands, ", ") + " (see " + get_name() +
                      " --help)");
  return std::nullopt;
}

CLI::Option* add_integer(CLI::App& app, const std::string& name, int64_t* target, const std::string& metavar,
                         const std::string& help, int64_t lo, int64_t hi) {
  // Converted here, in decimal, and handed on in canonical form: CLI11's own
  // conversion would read "010" as octal.
  auto convert = [name, lo, hi](std::string& text) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (text.empty() || used != text.size()) refuse("option " + name + " expects an integer, got '" + text + "'");
    if (v < lo) refuse("option " + name + " must be >= " + std::to_string(lo) + " (got " + text + ")");
    if (v > hi) refuse("option " + name + " must be <= " + std::to_string(hi) + " (got " + text + ")");
    text = std::to_string(v);
    return std::string();
  };
  return app.add_option(name, *target, help)->type_name(metavar)->transform(CLI::Validator(convert, ""));
}

CLI::Option* add_number(CLI::App& app, const std::string& name, double* target, const std::string& metavar,
                        const std::string& help, double lo) {
  // Handed on as a hexadecimal float, which CLI11's strtold reads back exactly (a
  // decimal read as long double, then rounded to double, may differ in the last bit).
  auto convert = [name, lo](std::string& text) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (text.empty() || used != text.size() || !std::isfinite(v))
      refuse("option " + name + " expects a number, got '" + text + "'");
    if (v < lo) {
      char bound[32];
      std::snprintf(bound, sizeof bound, "%g", lo);
      refuse("option " + name + " must be >= " + bound + " (got " + text + ")");
    }
    char exact[64];
    std::snprintf(exact, sizeof exact, "%a", v);
    text = exact;
    return std::string();
  };
  return app.add_option(name, *target, help)->type_name(metavar)->transform(CLI::Validator(convert, ""));
}

CLI::Option* add_choice(CLI::App& app, const std::string& name, std::string* target,
                        const std::vector<std::string>& choices, const std::string& help) {
  auto check = [name, choices](std::string& text) {
    if (std::find(choices.begin(), choices.end(), text) == choices.end())
      refuse("option " + name + " must be one of " + join(choices, ", ") + " (got '" + text + "')");
    return std::string();
  };
  return app.add_option(name, *target, help)->type_name(join(choices, "|"))->check(CLI::Validator(check, ""));
}

CLI::Option* add_text(CLI::App& app, const std::string& name, std::string* target, const std::string& metavar,
                      const std::string& help) {
  return app.add_option(name, *target, help)->type_name(metavar);
}

CLI::Option* add_repeated(CLI::App& app, const std::string& name, std::vector<std::string>* target,
                          const std::string& metavar, const std::string& help) {
  // One value per occurrence: a vector option would otherwise also take the words
  // after it ("--set a=1 SPEC.yaml" would swallow the spec).
  return app.add_option(name, *target, help)->type_name(metavar)->allow_extra_args(false);
}

CLI::Option* add_positional(CLI::App& app, const std::string& name, std::string* target, const std::string& help) {
  return app.add_option(name, *target, help)->type_name("")->required();
}

void check_output_file(const std::string& path, const std::string& option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw usage_error(option + " " + path + ": is a directory; give a file name");
  const fs::path parent = fs::path(path).parent_path();
  const std::string dir = parent.empty() ? "." : parent.string();
  if (!fs::exists(dir, ec))
    throw usage_error(option + " " + path + ": directory '" + dir + "' does not exist (create it first)");
  if (!fs::is_directory(dir, ec)) throw usage_error(option + " " + path + ": '" + dir + "' is not a directory");
  // The file is written to a temporary name in the directory, then renamed.
  if (access(dir.c_str(), W_OK | X_OK) != 0)
    throw usage_error(option + " " + path + ": directory '" + dir + "' is not writable: " + std::strerror(errno));
}

}  // namespace elbo::cli
