// Bucketed gradient all-reduce over MPI (CPU buffers in place, GPU buffers staged
// through pinned host memory), the factory that picks MPI or NCCL, and the
// bandwidth self-test.
#include "elbo/dist/grad_sync.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>

#ifdef ELBO_HAVE_CUDA
#include "elbo/dist/nccl_sync.hpp"
#endif

namespace elbo {

std::vector<BucketRange> plan_buckets(size_t n, size_t bucket_elems) {
  std::vector<BucketRange> out;
  const size_t cap = static_cast<size_t>(INT_MAX);
  size_t step = bucket_elems == 0 ? n : bucket_elems;
  step = std::clamp<size_t>(step, 1, cap);
  for (size_t end = n; end > 0;) {
    size_t begin = end > step ? end - step : 0;
    out.push_back({begin, end});
    end = begin;
  }
  return out;
}

BucketedSync::BucketedSync(size_t n, size_t bucket_elems) : m_buckets(plan_buckets(n, bucket_elems)) {}

void BucketedSync::begin(int64_t step) {
  m_step = step;
  m_next = 0;
}

void BucketedSync::ready_from(size_t offset) {
  while (m_next < m_buckets.size() && m_buckets[m_next].begin >= offset) {
    launch(m_buckets[m_next++]);
    if (m_step >= 0) ++m_counts.buckets;
  }
  if (m_next > 0) progress();
}

void BucketedSync::finish() {
  ready_from(0);
  complete();
  if (m_step >= 0) ++m_counts.rounds;
}

std::string BucketedSync::operation() const {
  std::string what = "all-reduce of the gradient buffer (" + std::to_string(m_buckets.size()) + " bucket(s))";
  return m_step < 0 ? what + " in the startup self-test" : what + " at step " + std::to_string(m_step + 1);
}

std::string BucketedSync::bucket_summary() const {
  size_t largest = 0;
  for (const auto& b : m_buckets) largest = std::max(largest, b.size());
  char buf[96];
  std::snprintf(buf, sizeof(buf), "%zu bucket(s) of <= %.2f MB", m_buckets.size(),
                static_cast<double>(largest) * sizeof(float) / 1e6);
  return buf;
}

namespace {

// One rank: the local gradient already is the sum.
class LocalSync final : public GradientSync {
 public:
  std::string describe() const override { return "none (1 rank)"; }
  void begin(int64_t) override {}
  void ready_from(size_t) override {}
  void finish() override {}
};

// MPI_Iallreduce per bucket. Open MPI has no progress thread for non-blocking
// collectives, so every later ready_from() tests the outstanding requests: backward
// itself drives the communication forward between its GEMMs.
class MpiGradientSync final : public BucketedSync {
 public:
  MpiGradientSync(MpiCommunicator& comm, Backend<float>& be, float* grads, size_t n, size_t bucket_elems)
      : BucketedSync(n, bucket_elems), m_comm(comm), m_be(be), m_grads(grads), m_n(n),
        m_staged(be.device() != DeviceKind::Cpu) {
    if (m_staged) {
      m_staging = std::make_unique<HostBuffer<float, float>>(be, n);
      m_host = m_staging->data();
    }
    m_requests.reserve(m_buckets.size());
  }
  std::string describe() const override {
    return std::string(m_staged ? "mpi, staged through pinned host memory, " : "mpi, ") + bucket_summary();
  }

 protected:
  void launch(const BucketRange& b) override {
    float* p = m_grads + b.begin;
    if (m_staged) {
      // The download orders after the backward kernels that produced this bucket.
      m_be.download(m_host + b.begin, m_grads + b.begin, b.size());
      p = m_host + b.begin;
    }
    MPI_Request req = MPI_REQUEST_NULL;
    ELBO_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, p, static_cast<int>(b.size()), MPI_FLOAT, MPI_SUM, m_comm.handle(),
                                  &req));
    m_requests.push_back(req);
  }
  void progress() override {
    int done = 0;  // Testall leaves the requests alone until all of them are complete
    ELBO_CHECK_MPI(MPI_Testall(static_cast<int>(m_requests.size()), m_requests.data(), &done, MPI_STATUSES_IGNORE));
  }
  void complete() override {
    m_comm.wait(m_requests.data(), static_cast<int>(m_requests.size()), operation().c_str());
    m_requests.clear();
    if (m_staged) m_be.upload(m_grads, m_host, m_n);
  }

 private:
  MpiCommunicator& m_comm;
  Backend<float>& m_be;
  float* m_grads;
  size_t m_n;
  bool m_staged;
  std::unique_ptr<HostBuffer<float, float>> m_staging;  // pinned, for a GPU's gradients
  float* m_host = nullptr;
  std::vector<MPI_Request> m_requests;
};

}  // namespace

std::unique_ptr<GradientSync> make_gradient_sync(const std::string& communicator, Communicator& comm,
                                                 Backend<float>& be, float* grads, size_t n, size_t bucket_elems) {
  if (communicator == "nccl") {
#ifdef ELBO_HAVE_CUDA
    return make_nccl_sync(comm, be, grads, n, bucket_elems);
#else
    throw config_error("dist.communicator: nccl needs the CUDA backend, which this build does not have");
#endif
  }
  if (communicator == "none") {
    if (comm.size() != 1) throw internal_error("no gradient sync requested for " + std::to_string(comm.size()) + " ranks");
    return std::make_unique<LocalSync>();
  }
  if (communicator != "mpi") throw internal_error("unknown communicator '" + communicator + "'");
  if (comm.size() == 1) return std::make_unique<LocalSync>();
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  if (mpi == nullptr) throw internal_error("an MPI gradient all-reduce needs an MpiCommunicator");
  return std::make_unique<MpiGradientSync>(*mpi, be, grads, n, bucket_elems);
}

AllreduceRate measure_allreduce(GradientSync& sync, Backend<float>& be, float* grads, size_t n, int ranks,
                                int iters) {
  be.fill(grads, 0.0f, n);  // sums of zeros stay finite however often they are reduced
  auto round = [&] {
    sync.begin(-1);
    sync.finish();
  };
  round();
  round();
  be.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) round();
  be.synchronize();
  AllreduceRate r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / std::max(1, iters);
  const double bytes = static_cast<double>(n) * sizeof(float);
  r.algbw_gbs = bytes / std::max(r.seconds, 1e-12) / 1e9;
  r.busbw_gbs = ranks > 1 ? r.algbw_gbs * 2.0 * (ranks - 1) / ranks : 0.0;
  return r;
}

}  // namespace elbo
