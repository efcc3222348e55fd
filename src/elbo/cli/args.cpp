// Command-line parsing for the elbo subcommands.
#include "elbo/cli/args.hpp"

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "elbo/util/error.hpp"

namespace elbo::cli {

ArgParser::ArgParser(std::string program, std::string summary)
    : m_program(std::move(program)), m_summary(std::move(summary)) {}

void ArgParser::flag(const std::string& name, bool* target, const std::string& help) {
  m_options.push_back({name, "", help, Kind::Flag, target});
}
void ArgParser::string(const std::string& name, std::string* target, const std::string& metavar,
                       const std::string& help, bool required) {
  m_options.push_back({name, metavar, help, Kind::String, target, required});
}
void ArgParser::integer(const std::string& name, int64_t* target, const std::string& metavar,
                        const std::string& help, int64_t min_value) {
  m_options.push_back({name, metavar, help, Kind::Integer, target, false, min_value});
}
void ArgParser::number(const std::string& name, double* target, const std::string& metavar, const std::string& help,
                       double min_value) {
  Option o{name, metavar, help, Kind::Number, target};
  o.min_number = min_value;
  m_options.push_back(o);
}
void ArgParser::repeated(const std::string& name, std::vector<std::string>* target, const std::string& metavar,
                         const std::string& help) {
  m_options.push_back({name, metavar, help, Kind::Repeated, target});
}
void ArgParser::positional(const std::string& name, std::string* target, const std::string& help) {
  m_positionals.push_back({name, help, target});
}

ArgParser::Option* ArgParser::find(const std::string& name) {
  for (auto& o : m_options)
    if (o.name == name) return &o;
  return nullptr;
}

bool ArgParser::parse(const std::vector<std::string>& args) {
  size_t next_positional = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(help().c_str(), stdout);
      return false;
    }
    // Long options (--name, --name=value) and one-letter short ones (-n 64).
    const bool is_short = a.size() == 2 && a[0] == '-' && std::isalpha(static_cast<unsigned char>(a[1]));
    if (a.rfind("--", 0) == 0 || is_short) {
      std::string value;
      bool has_value = false;
      if (size_t eq = a.find('='); eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
        has_value = true;
      }
      Option* o = find(a);
      if (o == nullptr) throw usage_error(m_program + ": unknown option '" + a + "' (see --help)");
      o->seen = true;
      if (o->kind == Kind::Flag) {
        if (has_value) throw usage_error(m_program + ": option " + a + " takes no value");
        *static_cast<bool*>(o->target) = true;
        continue;
      }
      if (!has_value) {
        if (i + 1 >= args.size()) throw usage_error(m_program + ": option " + a + " needs a value (" + o->metavar + ")");
        value = args[++i];
      }
      switch (o->kind) {
        case Kind::String: *static_cast<std::string*>(o->target) = value; break;
        case Kind::Repeated: static_cast<std::vector<std::string>*>(o->target)->push_back(value); break;
        case Kind::Integer: {
          size_t used = 0;
          long long v = 0;
          try {
            v = std::stoll(value, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          if (used != value.size() || value.empty())
            throw usage_error(m_program + ": option " + a + " expects an integer, got '" + value + "'");
          if (v < o->min_value)
            throw usage_error(m_program + ": option " + a + " must be >= " + std::to_string(o->min_value) + " (got " +
                              value + ")");
          *static_cast<int64_t*>(o->target) = v;
          break;
        }
        case Kind::Number: {
          size_t used = 0;
          double v = 0;
          try {
            v = std::stod(value, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          if (used != value.size() || value.empty() || !std::isfinite(v))
            throw usage_error(m_program + ": option " + a + " expects a number, got '" + value + "'");
          if (v < o->min_number)
            throw usage_error(m_program + ": option " + a + " must be >= " + std::to_string(o->min_number) +
                              " (got " + value + ")");
          *static_cast<double*>(o->target) = v;
          break;
        }
        case Kind::Flag: break;
      }
      continue;
    }
    if (next_positional >= m_positionals.size())
      throw usage_error(m_program + ": unexpected argument '" + a + "' (see --help)");
    *m_positionals[next_positional++].target = a;
  }
  if (next_positional < m_positionals.size())
    throw usage_error(m_program + ": missing " + m_positionals[next_positional].name + " (see --help)");
  for (const auto& o : m_options)
    if (o.required && !o.seen) throw usage_error(m_program + ": option " + o.name + " is required (see --help)");
  return true;
}

void check_output_file(const std::string& path, const std::string& option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw usage_error(option + " " + path + ": is a directory; give a file name");
  const fs::path parent = fs::path(path).parent_path();
  const std::string dir = parent.empty() ? "." : parent.string();
  if (!fs::exists(dir, ec))
    throw usage_error(option + " " + path + ": directory '" + dir + "' does not exist (create it first)");
  if (!fs::is_directory(dir, ec)) throw usage_error(option + " " + path + ": '" + dir + "' is not a directory");
  // The file is written to a temporary name in the directory, then renamed.
  if (access(dir.c_str(), W_OK | X_OK) != 0)
    throw usage_error(option + " " + path + ": directory '" + dir + "' is not writable: " + std::strerror(errno));
}

std::string ArgParser::help() const {
  std::ostringstream os;
  os << "usage: " << m_program;
  for (const auto& p : m_positionals) os << " " << p.name;
  os << " [options]\n\n" << m_summary << "\n";
  if (!m_positionals.empty()) os << "\narguments:\n";
  for (const auto& p : m_positionals) {
    std::string head = "  " + p.name;
    os << head << std::string(head.size() < 28 ? 28 - head.size() : 1, ' ') << p.help << "\n";
  }
  os << "\noptions:\n";
  for (const auto& o : m_options) {
    std::string head = "  " + o.name + (o.metavar.empty() ? "" : " " + o.metavar);
    os << head << std::string(head.size() < 28 ? 28 - head.size() : 1, ' ') << o.help
       << (o.required ? " (required)" : "") << "\n";
  }
  os << "  -h, --help                this text\n";
  return os.str();
}

}  // namespace elbo::cli
