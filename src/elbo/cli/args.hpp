// A typed command-line parser: each option is declared once with its type, target
// and help, so parsing, validation and --help come from the same table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace elbo::cli {

class ArgParser {
 public:
  ArgParser(std::string program, std::string summary);

  void flag(const std::string& name, bool* target, const std::string& help);
  void string(const std::string& name, std::string* target, const std::string& metavar, const std::string& help,
              bool required = false);
  void integer(const std::string& name, int64_t* target, const std::string& metavar, const std::string& help,
               int64_t min_value = INT64_MIN);
  void number(const std::string& name, double* target, const std::string& metavar, const std::string& help,
              double min_value = 0.0);
  // An option that may repeat, e.g. --set a=1 --set b=2.
  void repeated(const std::string& name, std::vector<std::string>* target, const std::string& metavar,
                const std::string& help);
  void positional(const std::string& name, std::string* target, const std::string& help);

  // Throws a Usage error naming the offending argument. Returns false when --help
  // was given (the help text has been printed).
  bool parse(const std::vector<std::string>& args);
  std::string help() const;

 private:
  enum class Kind { Flag, String, Integer, Number, Repeated };
  struct Option {
    std::string name, metavar, help;
    Kind kind;
    void* target;
    bool required = false;
    int64_t min_value = INT64_MIN;
    double min_number = 0.0;
    bool seen = false;
  };
  struct Positional {
    std::string name, help;
    std::string* target;
  };
  Option* find(const std::string& name);

  std::string m_program, m_summary;
  std::vector<Option> m_options;
  std::vector<Positional> m_positionals;
};

// Refuses an output file that could not be written at the end of a long command: its
// directory must exist and be writable, and the path must not be a directory. Throws a
// Usage error naming `option` (e.g. "elbo eval --output").
void check_output_file(const std::string& path, const std::string& option);

}  // namespace elbo::cli
