// Reader for IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace elbo::data {

struct IdxArray {
  std::vector<uint32_t> dims;  // e.g. (60000, 28, 28) for images, (60000) for labels
  std::vector<uint8_t> data;   // row-major
  size_t rows() const { return dims.empty() ? 0 : dims[0]; }
};

// Reads an unsigned-byte IDX file; any malformation is a Data error naming the file.
IdxArray read_idx(const std::string& path);

}  // namespace elbo::data
