// What the golden tests (test_golden.cpp, test_golden_hvae.cpp) share: reading the
// reference file's integer-array attributes, and the two error measures they compare
// elbo's values with PyTorch's by.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "elbo/util/h5.hpp"

namespace elbo::golden {

inline std::vector<int> int_array_attr(hid_t obj, const std::string& name) {
  h5::Id attr(ELBO_CHECK_H5(H5Aopen(obj, name.c_str(), H5P_DEFAULT)), H5Aclose);
  h5::Id space(ELBO_CHECK_H5(H5Aget_space(attr)), H5Sclose);
  hssize_t n = H5Sget_simple_extent_npoints(space);
  std::vector<int> out(static_cast<size_t>(n));
  if (n > 0) ELBO_CHECK_H5(H5Aread(attr, H5T_NATIVE_INT, out.data()));
  return out;
}

// max over elements of |a - b| / (|b| + tiny), tiny scaled to the tensor so that
// entries that are zero up to round-off do not dominate.
template <class T>
double max_rel_err(const T* a, const std::vector<double>& b) {
  double scale = 0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  double tiny = 1e-8 * scale + 1e-12, worst = 0;
  for (size_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - b[i]) / (std::abs(b[i]) + tiny));
  return worst;
}

// ||a - b|| / ||b|| over the whole tensor (the float path's measure).
template <class T>
double norm_err(const T* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

}  // namespace elbo::golden
