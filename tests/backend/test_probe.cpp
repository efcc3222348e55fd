// The backend seam: the CPU backend always exists; the CUDA probe answers with a
// device list or the reason there is none, and GPU-only checks skip visibly.
#include <gtest/gtest.h>

#include "elbo/backend/backend.hpp"
#include "elbo/util/error.hpp"

namespace elbo {
namespace {

TEST(Backend, CpuIsAlwaysAvailable) {
  auto be = make_backend<float>(DeviceKind::Cpu, 1);
  ASSERT_NE(be, nullptr);
  EXPECT_EQ(be->name(), "cpu");
  Buffer<float> b(*be, 5);
  be->fill(b.data(), 2.5f, 5);
  float host[5];
  be->download(host, b.data(), 5);
  EXPECT_EQ(host[4], 2.5f);
}

TEST(Backend, CudaProbeExplainsItself) {
  BackendReport r = probe_backends();
#ifdef ELBO_HAVE_CUDA
  EXPECT_TRUE(r.cuda_compiled);
#else
  EXPECT_FALSE(r.cuda_compiled);
#endif
  EXPECT_GE(r.cuda_devices, 0);
  EXPECT_FALSE(r.cuda_detail.empty()) << "the probe must name the devices or say why there are none";
  if (r.cuda_devices == 0) GTEST_SKIP() << "no GPU: " << r.cuda_detail;
  EXPECT_NE(r.cuda_detail.find("sm_"), std::string::npos) << r.cuda_detail;
}

TEST(Backend, CudaIsRefusedWithAReasonWhereItCannotRun) {
  BackendReport r = probe_backends();
  if (r.cuda_devices > 0) {
    EXPECT_NE(make_backend<float>(DeviceKind::Cuda, 1), nullptr);
  } else {
    try {
      make_backend<float>(DeviceKind::Cuda, 1);
      FAIL() << "make_backend(Cuda) returned a backend on a machine without a GPU";
    } catch (const Error& e) {
      std::string what = e.what();
      EXPECT_TRUE(what.find("not available") != std::string::npos || what.find("no CUDA backend") != std::string::npos)
          << what;
    }
  }
  // Double precision is the CPU reference's job.
  EXPECT_THROW(make_backend<double>(DeviceKind::Cuda, 1), Error);
}

}  // namespace
}  // namespace elbo
