// The discretized logistic mixture op against an independent NumPy transcription of
// PixelCNN++'s loss (dlm_reference.py writes cases with edge bins, floored log-scales
// and far-tail bins): per-sample -log P in double and in float.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"

namespace elbo {
namespace {

std::string g_path;

template <class T>
std::vector<T> read_values(std::ifstream& in, size_t n) {
  std::vector<T> v(n);
  for (auto& x : v) {
    double d = 0;
    in >> d;
    x = static_cast<T>(d);
  }
  return v;
}

TEST(DlmReference, NegativeLogLikelihoodMatchesNumpy) {
  std::ifstream in(g_path);
  ASSERT_TRUE(in) << "cannot open " << g_path;
  int cases = 0;
  in >> cases;
  ASSERT_GT(cases, 0);
  CpuBackend<double> bd;
  CpuBackend<float> bf;
  for (int i = 0; i < cases; ++i) {
    int C = 0, K = 0, n = 0, hw = 0;
    in >> C >> K >> n >> hw;
    const DlmShape s{C, hw, K};
    const size_t nout = static_cast<size_t>(n) * s.out_width(), nx = static_cast<size_t>(n) * s.dim();
    const std::vector<double> out = read_values<double>(in, nout), x = read_values<double>(in, nx),
                              ref = read_values<double>(in, n);
    ASSERT_TRUE(in) << "case " << i << " is truncated";
    std::vector<double> nll(n);
    bd.dlm_forward(s, n, out.data(), x.data(), nll.data());
    std::vector<float> outf(out.begin(), out.end()), xf(x.begin(), x.end()), nllf(n);
    bf.dlm_forward(s, n, outf.data(), xf.data(), nllf.data());
    for (int r = 0; r < n; ++r) {
      EXPECT_NEAR(nll[r], ref[r], 1e-9 * std::max(1.0, std::abs(ref[r])))
          << "C " << C << " K " << K << " sample " << r;
      EXPECT_NEAR(nllf[r], ref[r], 2e-4 * std::max(1.0, std::abs(ref[r])))
          << "float, C " << C << " K " << K << " sample " << r;
    }
  }
}

}  // namespace
}  // namespace elbo

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: test_dlm_reference REFERENCE.txt (written by dlm_reference.py)\n");
    return 2;
  }
  elbo::g_path = argv[1];
  return RUN_ALL_TESTS();
}
