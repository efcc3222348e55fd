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
  NcclGradientSync(Communicator& comm, CudaBackend& be, float* grads, size_t n, size_t bucket_elems, float* params)
      : BucketedSync(n, bucket_elems), m_comm(comm), m_be(be), m_grads(grads), m_params(params),
        m_plan(plan_shards(n, bucket_elems, comm.size())) {
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
    CHECK_CUDA(cudaEventCreateWithFlags(&m_updated, cudaEventDisableTiming));
    CHECK_CUDA(cudaEventCreateWithFlags(&m_gathered, cudaEventDisableTiming));
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
    if (m_updated != nullptr) cudaEventDestroy(m_updated);
    if (m_gathered != nullptr) cudaEventDestroy(m_gathered);
    if (m_stream != nullptr) cudaStreamDestroy(m_stream);
  }

  std::string describe() const override {
    int version = 0;
    ncclGetVersion(&version);
    return "nccl " + std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100) + " on GPU " + std::to_string(m_be.device_ordinal()) + ", " +
           (sharded() ? "reduce-scatter + all-gather (optimizer sharded over " + std::to_string(m_plan.ranks) +
                            " ranks), "
                      : std::string()) +
           bucket_summary();
  }

  const ShardPlan* shard_plan() const override { return sharded() ? &m_plan : nullptr; }

  void gather_params() override {
    if (!sharded()) return;
    params_ready();
    // After the optimizer's kernels on the compute stream; first buckets of the buffer first.
    CHECK_CUDA(cudaEventRecord(m_updated, m_compute));
    CHECK_CUDA(cudaStreamWaitEvent(m_stream, m_updated, 0));
    const std::string what = "all-gather of the parameters after step " + std::to_string(m_step + 1);
    const int me = m_comm.rank();
    for (size_t k = m_buckets.size(); k-- > 0;) {
      float* p = m_params + m_buckets[k].begin;
      const BucketRange mine = m_plan.part(k, me);
      if (equal_parts(k)) {
        // In place: this rank's part is where ncclAllGather expects it (recv + rank * count).
        settle(ncclAllGather(m_params + mine.begin, p, mine.size(), ncclFloat, m_nccl, m_stream), "ncclAllGather",
               what, __LINE__);
      } else {
        check(ncclGroupStart(), "ncclGroupStart()", __FILE__, __LINE__);
        for (int r = 0; r < m_plan.ranks; ++r) {
          const BucketRange part = m_plan.part(k, r);
          float* q = m_params + part.begin;
          check(ncclBroadcast(q, q, part.size(), ncclFloat, r, m_nccl, m_stream), "ncclBroadcast", __FILE__, __LINE__);
        }
        settle(ncclGroupEnd(), "ncclGroupEnd (all-gather by broadcasts)", what, __LINE__);
      }
    }
    m_gathering = true;
  }

  void params_ready() override {
    if (!m_gathering) return;
    m_gathering = false;
    CHECK_CUDA(cudaEventRecord(m_gathered, m_stream));
    CHECK_CUDA(cudaStreamWaitEvent(m_compute, m_gathered, 0));  // the next forward reads params
    watch(m_gathered, "all-gather of the parameters after step " + std::to_string(m_step + 1));
  }
  // (params_ready_until waits for the whole gather: the first layer's kernels would
  // wait on the stream anyway. The reduce-scatter of the next step queues behind the
  // gather on m_stream, so a rank without rows needs no wait of its own.)


 protected:
  void launch(const BucketRange& b) override {
    const size_t k = m_next - 1;  // BucketedSync advanced m_next before calling us
    CHECK_CUDA(cudaEventRecord(m_ready[k], m_compute));
    CHECK_CUDA(cudaStreamWaitEvent(m_stream, m_ready[k], 0));
    float* p = m_grads + b.begin;
    if (!sharded()) {
      settle(ncclAllReduce(p, p, b.size(), ncclFloat, ncclSum, m_nccl, m_stream), "ncclAllReduce", operation(),
             __LINE__);
      return;
    }
    const BucketRange mine = m_plan.part(k, m_comm.rank());
    if (equal_parts(k)) {
      // In place: the sum of this rank's part lands at send + rank * count, its own offset.
      settle(ncclReduceScatter(p, m_grads + mine.begin, mine.size(), ncclFloat, ncclSum, m_nccl, m_stream),
             "ncclReduceScatter", operation(), __LINE__);
      return;
    }
    // Parts differ by one element: ncclReduceScatter takes one count, so each part is
    // reduced to its owner, the calls grouped into one launch.
    check(ncclGroupStart(), "ncclGroupStart()", __FILE__, __LINE__);
    for (int r = 0; r < m_plan.ranks; ++r) {
      const BucketRange part = m_plan.part(k, r);
      float* q = m_grads + part.begin;
      check(ncclReduce(q, q, part.size(), ncclFloat, ncclSum, r, m_nccl, m_stream), "ncclReduce", __FILE__, __LINE__);
    }
    settle(ncclGroupEnd(), "ncclGroupEnd (reduce-scatter by reduces)", operation(), __LINE__);
  }

  const char* collective() const override { return sharded() ? "reduce-scatter" : "all-reduce"; }

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

  bool sharded() const { return m_params != nullptr; }
  bool equal_parts(size_t k) const { return m_buckets[k].size() % static_cast<size_t>(m_plan.ranks) == 0; }

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
  float* m_params;  // non-null: the optimizer is sharded (reduce-scatter + all-gather)
  ShardPlan m_plan;
  bool m_gathering = false;  // an all-gather of params is queued on m_stream
  cudaStream_t m_compute = nullptr;
  cudaStream_t m_stream = nullptr;
  ncclComm_t m_nccl = nullptr;
  bool m_aborted = false;
  std::vector<cudaEvent_t> m_ready;
  cudaEvent_t m_done = nullptr;
  cudaEvent_t m_updated = nullptr, m_gathered = nullptr;  // the optimizer step done; the all-gather done
};

}  // namespace

std::unique_ptr<GradientSync> make_nccl_sync(Communicator& comm, Backend<float>& be, float* grads, size_t n,
                                             size_t bucket_elems, float* params) {
  auto* cuda = dynamic_cast<CudaBackend*>(&be);
  if (cuda == nullptr)
    throw config_error("dist.communicator: nccl reduces GPU buffers; it needs device: cuda (this run uses " +
                       be.name() + ")");
  return std::make_unique<NcclGradientSync>(comm, *cuda, grads, n, bucket_elems, params);
}

}  // namespace elbo
