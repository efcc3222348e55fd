// The config tests' error checks: parse a spec that must be refused and look for the
// pieces its message must name (file:line, key, allowed values, the --set argument).
#pragma once

#include <gtest/gtest.h>

#include <source_location>
#include <string>
#include <vector>

#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"

namespace elbo::spec_test {

// The message of the config error that parsing `yaml` (as file exp.yaml) with these
// --set overrides raises; a test failure, and "", when it parses.
inline std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_spec(yaml, "exp.yaml", overrides);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a config error for:\n" << yaml;
  return "";
}

// That error's message contains every one of `parts`; a failure names the caller's line.
inline void expect_error(const std::string& yaml, const std::vector<std::string>& overrides,
                         const std::vector<std::string>& parts,
                         std::source_location at = std::source_location::current()) {
  const ::testing::ScopedTrace trace(at.file_name(), static_cast<int>(at.line()), "expect_error");
  const std::string e = error_of(yaml, overrides);
  for (const std::string& part : parts)
    EXPECT_NE(e.find(part), std::string::npos) << "expected \"" << part << "\" in:\n" << e;
}

inline void expect_error(const std::string& yaml, const std::vector<std::string>& parts,
                         std::source_location at = std::source_location::current()) {
  expect_error(yaml, {}, parts, at);
}

}  // namespace elbo::spec_test
