// Parses one spec file and prints the resolved spec; non-zero exit on any error.
#include <cstdio>

#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_spec_file SPEC.yaml\n");
    return 2;
  }
  try {
    std::fputs(elbo::dump_spec(elbo::load_spec(argv[1])).c_str(), stdout);
  } catch (const elbo::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
