// NCCL all-reduce of the flat gradient buffer, overlapped with backward, with a
// host-side watchdog: NCCL's own calls can block forever on a dead peer, so the
// communicator is non-blocking and every wait polls ncclCommGetAsyncError and a
// deadline (dist.timeout_s); past it the rank aborts the NCCL communicator and the
// MPI job with a message naming the rank and the operation.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "elbo/backend/cuda/cuda_backend.hpp"
#include "elbo/backend/cuda/cuda_check.hpp"
#include "elbo/dist/nccl_sync.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

namespace {

using Clock = std::chrono::steady_clock;

class NcclGradientSync final : public BucketedSync {
 public:
  NcclGradientSync(Communicator& comm, CudaBackend& be, float* grads, size_t n, size_t bucket_elems)
      : BucketedSync(n, bucket_elems), m_comm(comm), m_be(be), m_grads(grads) {
    m_compute = static_cast<cudaStream_t>(be.stream_handle());
    ncclUniqueId id{};
    if (comm.is_root()) check(ncclGetUniqueId(&id), "ncclGetUniqueId(&id)", __FILE__, __LINE__);
    comm.broadcast(&id, sizeof(id), 0);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // so that a peer that never arrives cannot hang us inside init
    ncclResult_t rc = ncclCommInitRankConfig(&m_nccl, comm.size(), id, comm.rank(), &config);
    settle(rc, "ncclCommInitRankConfig", "NCCL communicator initialisation", __LINE__);
    CHECK_CUDA(cudaStreamCreateWithFlags(&m_stream, cudaStreamNonBlocking));
    m_ready.resize(m_buckets.size());
    for (auto& e : m_ready) CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CHECK_CUDA(cudaEventCreateWithFlags(&m_done, cudaEventDisableTiming));
  }

  ~NcclGradientSync() override {
    // Release only; a failed communicator was aborted where it failed.
    if (m_nccl != nullptr) {
      if (m_aborted) {
        ncclCommAbort(m_nccl);
      } else {
        ncclCommFinalize(m_nccl);
        ncclResult_t st = ncclInProgress;
        const auto t0 = Clock::now();
        while (ncclCommGetAsyncError(m_nccl, &st) == ncclSuccess && st == ncclInProgress &&
               Clock::now() - t0 < std::chrono::seconds(10))
          std::this_thread::yield();
        if (st == ncclSuccess) ncclCommDestroy(m_nccl); else ncclCommAbort(m_nccl);
      }
    }
    for (auto e : m_ready) if (e != nullptr) cudaEventDestroy(e);
    if (m_done != nullptr) cudaEventDestroy(m_done);
    if (m_stream != nullptr) cudaStreamDestroy(m_stream);
  }

  std::string describe() const override {
    int version = 0;
    ncclGetVersion(&version);
    return "nccl " + std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100) + " on GPU " + std::to_string(m_be.device_ordinal()) + ", " +
           bucket_summary();
  }

 protected:
  void launch(const BucketRange& b) override {
    const size_t k = m_next - 1;  // BucketedSync advanced m_next before calling us
    CHECK_CUDA(cudaEventRecord(m_ready[k], m_compute));
    CHECK_CUDA(cudaStreamWaitEvent(m_stream, m_ready[k], 0));
    float* p = m_grads + b.begin;
    settle(ncclAllReduce(p, p, b.size(), ncclFloat, ncclSum, m_nccl, m_stream), "ncclAllReduce", operation(),
           __LINE__);
  }

  void complete() override {
    CHECK_CUDA(cudaEventRecord(m_done, m_stream));
    // The optimizer (and the next step's zeroing of grads) runs after the reduction.
    CHECK_CUDA(cudaStreamWaitEvent(m_compute, m_done, 0));
    watch(m_done, operation());
  }

 private:
  void check(ncclResult_t rc, const char* call, const char* file, int line) {
    if (rc != ncclSuccess && rc != ncclInProgress)
      ::elbo::detail::throw_call_failed(ErrorKind::Dist, call, file, line,
                                        std::string(ncclGetErrorString(rc)) + " (rank " +
                                            std::to_string(m_comm.rank()) + ")");
  }

  // A non-blocking communicator may answer ncclInProgress: poll until it settles.
  void settle(ncclResult_t rc, const char* call, const std::string& what, int line) {
    check(rc, call, __FILE__, line);
    if (rc == ncclSuccess) return;
    const auto t0 = Clock::now();
    for (;;) {
      ncclResult_t st = ncclSuccess;
      check(ncclCommGetAsyncError(m_nccl, &st), "ncclCommGetAsyncError", __FILE__, line);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) fail(what, std::string(ncclGetErrorString(st)) + ": " + ncclGetLastError(m_nccl));
      if (timed_out(t0)) timeout(what);
      std::this_thread::yield();
    }
  }

  // Waits for `ev` while checking NCCL's asynchronous errors and the deadline.
  void watch(cudaEvent_t ev, const std::string& what) {
    const auto t0 = Clock::now();
    for (long polls = 0;; ++polls) {
      cudaError_t q = cudaEventQuery(ev);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) CHECK_CUDA(q);
      ncclResult_t st = ncclSuccess;
      check(ncclCommGetAsyncError(m_nccl, &st), "ncclCommGetAsyncError", __FILE__, __LINE__);
      if (st != ncclSuccess && st != ncclInProgress)
        fail(what, std::string(ncclGetErrorString(st)) + ": " + ncclGetLastError(m_nccl));
      if ((polls & 63) == 63) {
        // Peers waiting in MPI may be taking a roll call or probing the links: answer.
        m_comm.service(std::chrono::duration<double>(Clock::now() - t0).count());
        if (timed_out(t0)) timeout(what);
      }
    }
  }

  bool timed_out(Clock::time_point t0) const {
    return m_comm.timeout() > 0 && std::chrono::duration<double>(Clock::now() - t0).count() > m_comm.timeout();
  }

  [[noreturn]] void timeout(const std::string& what) {
    m_aborted = true;
    ncclCommAbort(m_nccl);  // unblocks the kernels that wait for the missing peer
    m_nccl = nullptr;
    abort_on_timeout(m_comm, what);
  }

  [[noreturn]] void fail(const std::string& what, const std::string& why) {
    m_aborted = true;
    ncclCommAbort(m_nccl);
    m_nccl = nullptr;
    std::fprintf(stderr, "elbo: rank %d (%s): NCCL failed during %s: %s; aborting the job\n", m_comm.rank(),
                 m_comm.world().host.c_str(), what.c_str(), why.c_str());
    std::fflush(stderr);
    m_comm.abort(kExitPeerFailure);
    std::_Exit(kExitPeerFailure);  // abort() does not return; this tells the compiler so
  }

  Communicator& m_comm;
  CudaBackend& m_be;
  float* m_grads;
  cudaStream_t m_compute = nullptr;
  cudaStream_t m_stream = nullptr;
  ncclComm_t m_nccl = nullptr;
  bool m_aborted = false;
  std::vector<cudaEvent_t> m_ready;
  cudaEvent_t m_done = nullptr;
};

}  // namespace

std::unique_ptr<GradientSync> make_nccl_sync(Communicator& comm, Backend<float>& be, float* grads, size_t n,
                                             size_t bucket_elems) {
  auto* cuda = dynamic_cast<CudaBackend*>(&be);
  if (cuda == nullptr)
    throw config_error("dist.communicator: nccl reduces GPU buffers; it needs device: cuda (this run uses " +
                       be.name() + ")");
  return std::make_unique<NcclGradientSync>(comm, *cuda, grads, n, bucket_elems);
}

}  // namespace elbo
