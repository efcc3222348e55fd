// Bucketed gradient all-reduce over MPI (CPU buffers in place, GPU buffers staged
// through pinned host memory), the factory that picks MPI or NCCL, and the
// bandwidth self-test.
#include "elbo/dist/grad_sync.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>

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

ShardPlan plan_shards(size_t n, size_t bucket_elems, int ranks) {
  if (ranks < 1) throw internal_error("plan_shards: " + std::to_string(ranks) + " ranks");
  ShardPlan p;
  p.ranks = ranks;
  p.buckets = plan_buckets(n, bucket_elems);
  return p;
}

BucketRange ShardPlan::part(size_t k, int rank) const {
  const BucketRange& b = buckets.at(k);
  const size_t s = b.size(), N = static_cast<size_t>(ranks), r = static_cast<size_t>(rank);
  const size_t q = s / N, extra = s % N;  // parts 0..extra-1 hold q + 1 elements
  const size_t begin = b.begin + r * q + std::min(r, extra);
  return {begin, begin + q + (r < extra ? 1 : 0)};
}

std::vector<BucketRange> ShardPlan::owned(int rank) const {
  std::vector<BucketRange> out;
  for (size_t k = buckets.size(); k-- > 0;) {  // buckets run from the end of the buffer: walk them backwards
    const BucketRange p = part(k, rank);
    if (p.size() == 0) continue;
    if (!out.empty() && out.back().end == p.begin)
      out.back().end = p.end;
    else
      out.push_back(p);
  }
  return out;
}

size_t ShardPlan::owned_elems(int rank) const {
  size_t total = 0;
  for (size_t k = 0; k < buckets.size(); ++k) total += part(k, rank).size();
  return total;
}

void pack_ranges(const std::vector<BucketRange>& ranges, const float* flat, float* packed) {
  for (const auto& r : ranges) packed = std::copy(flat + r.begin, flat + r.end, packed);
}

void unpack_ranges(const std::vector<BucketRange>& ranges, const float* packed, float* flat) {
  for (const auto& r : ranges) {
    std::copy(packed, packed + r.size(), flat + r.begin);
    packed += r.size();
  }
}

BucketedSync::BucketedSync(size_t n, size_t bucket_elems) : m_buckets(plan_buckets(n, bucket_elems)) {}

void BucketedSync::begin(int64_t step) {
  m_step = step;
  m_next = 0;
}

void BucketedSync::ready_from(size_t offset) {
  while (m_next < m_buckets.size() && m_buckets[m_next].begin >= offset) launch(m_buckets[m_next++]);
  if (m_next > 0) progress();
}

void BucketedSync::finish() {
  ready_from(0);
  complete();
}

std::string BucketedSync::operation() const {
  std::string what =
      std::string(collective()) + " of the gradient buffer (" + std::to_string(m_buckets.size()) + " bucket(s))";
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

// One rank with a sharded optimizer: the rank owns everything, nothing moves.
class LocalShardedSync final : public GradientSync {
 public:
  LocalShardedSync(size_t n, size_t bucket_elems) : m_plan(plan_shards(n, bucket_elems, 1)) {}
  std::string describe() const override { return "none (1 rank; the optimizer's slice is the whole buffer)"; }
  void begin(int64_t) override {}
  void ready_from(size_t) override {}
  void finish() override {}
  const ShardPlan* shard_plan() const override { return &m_plan; }

 private:
  ShardPlan m_plan;
};

// ZeRO stage 1 over MPI: MPI_Ireduce_scatter per bucket as backward finalises it,
// MPI_Iallgatherv per bucket after the optimizer step, both completed through the
// communicator's polled wait() (timeouts, roll calls) like every other collective.
class MpiShardedSync final : public BucketedSync {
 public:
  MpiShardedSync(MpiCommunicator& comm, Backend<float>& be, float* grads, float* params, size_t n,
                 size_t bucket_elems)
      : BucketedSync(n, bucket_elems), m_plan(plan_shards(n, bucket_elems, comm.size())), m_comm(comm), m_be(be),
        m_grads(grads), m_params(params), m_n(n), m_rank(comm.rank()), m_staged(be.device() != DeviceKind::Cpu) {
    const int N = comm.size();
    for (size_t k = 0; k < m_buckets.size(); ++k) {
      std::vector<int> counts(static_cast<size_t>(N)), displs(static_cast<size_t>(N));
      for (int r = 0; r < N; ++r) {
        const BucketRange p = m_plan.part(k, r);
        counts[static_cast<size_t>(r)] = static_cast<int>(p.size());  // buckets are capped at INT_MAX
        displs[static_cast<size_t>(r)] = static_cast<int>(p.begin - m_buckets[k].begin);
      }
      m_counts.push_back(std::move(counts));
      m_displs.push_back(std::move(displs));
    }
    if (m_staged) {
      // One pinned copy serves both phases: gradients during backward, parameters after
      // the optimizer step (begin() completes the gather before gradients arrive again).
      m_staging = std::make_unique<HostBuffer<float, float>>(be, n);
      m_host = m_staging->data();
    }
    m_requests.reserve(m_buckets.size());
  }
  ~MpiShardedSync() override {
    // A job that ends between a step and the next params_ready() (an error thrown on
    // every rank) still has gathers in flight; they complete or the job aborts.
    if (!m_gathers.empty()) {
      try {
        params_ready();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "elbo: rank %d: the parameters' all-gather did not complete: %s\n", m_rank, e.what());
      }
    }
  }
  std::string describe() const override {
    return std::string("mpi reduce-scatter + all-gather (optimizer sharded over ") + std::to_string(m_plan.ranks) +
           " ranks), " + (m_staged ? "staged through pinned host memory, " : "") + bucket_summary();
  }
  const ShardPlan* shard_plan() const override { return &m_plan; }

  void gather_params() override {
    params_ready();
    // The first buckets of the buffer first: the next forward pass reads them first.
    for (size_t k = m_buckets.size(); k-- > 0;) {
      const BucketRange& b = m_buckets[k];
      float* p = m_params + b.begin;
      if (m_staged) {
        const BucketRange mine = m_plan.part(k, m_rank);
        m_be.download(m_host + mine.begin, m_params + mine.begin, mine.size());
        p = m_host + b.begin;
      }
      MPI_Request req = MPI_REQUEST_NULL;
      // In place: this rank's part already sits at its displacement in the bucket.
      ELBO_CHECK_MPI(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, p, m_counts[k].data(), m_displs[k].data(),
                                     MPI_FLOAT, m_comm.handle(), &req));
      m_gathers.push_back(req);
      m_gather_bucket.push_back(k);
    }
  }

  void params_ready() override { params_ready_until(m_n); }

  void params_ready_until(size_t end) override {
    if (m_gathers.empty()) return;
    // Gathers were started in buffer order: the ones params[0, end) needs are a prefix.
    size_t j = m_gathered;
    while (j < m_gathers.size() && m_buckets[m_gather_bucket[j]].begin < end) ++j;
    if (j > m_gathered) {
      const std::string what = "all-gather of the parameters after step " + std::to_string(m_step + 1);
      m_comm.wait(m_gathers.data() + m_gathered, static_cast<int>(j - m_gathered), what.c_str());
      for (size_t i = m_gathered; m_staged && i < j; ++i) {
        const BucketRange& b = m_buckets[m_gather_bucket[i]];
        m_be.upload(m_params + b.begin, m_host + b.begin, b.size());
      }
      m_gathered = j;
    }
    if (m_gathered == m_gathers.size()) {
      m_gathers.clear();
      m_gather_bucket.clear();
      m_gathered = 0;
      return;
    }
    // The rest moves on while the caller computes: Open MPI progresses non-blocking
    // collectives only inside MPI calls.
    int done = 0;
    ELBO_CHECK_MPI(MPI_Testall(static_cast<int>(m_gathers.size() - m_gathered), m_gathers.data() + m_gathered, &done,
                               MPI_STATUSES_IGNORE));
  }

 protected:
  const char* collective() const override { return "reduce-scatter"; }

  void launch(const BucketRange& b) override {
    const size_t k = m_next - 1;  // BucketedSync advanced m_next before calling us
    // A rank without rows this step ran no forward pass to complete the last gather; the
    // staging buffer must be free of it too.
    if (k == 0) params_ready();
    float* p = m_grads + b.begin;
    if (m_staged) {
      m_be.download(m_host + b.begin, m_grads + b.begin, b.size());
      p = m_host + b.begin;
    }
    MPI_Request req = MPI_REQUEST_NULL;
    // In place: the whole bucket is the input; this rank's summed part comes back at
    // the bucket's start, and complete() moves it to its own offset.
    ELBO_CHECK_MPI(MPI_Ireduce_scatter(MPI_IN_PLACE, p, m_counts[k].data(), MPI_FLOAT, MPI_SUM, m_comm.handle(), &req));
    m_requests.push_back(req);
  }
  void progress() override {
    int done = 0;
    ELBO_CHECK_MPI(MPI_Testall(static_cast<int>(m_requests.size()), m_requests.data(), &done, MPI_STATUSES_IGNORE));
  }
  void complete() override {
    m_comm.wait(m_requests.data(), static_cast<int>(m_requests.size()), operation().c_str());
    m_requests.clear();
    for (size_t k = 0; k < m_buckets.size(); ++k) {
      const BucketRange mine = m_plan.part(k, m_rank);
      const float* src = (m_staged ? m_host : m_grads) + m_buckets[k].begin;
      if (m_staged)
        m_be.upload(m_grads + mine.begin, src, mine.size());
      else if (src != m_grads + mine.begin)
        std::memmove(m_grads + mine.begin, src, mine.size() * sizeof(float));  // may overlap
    }
  }

 private:
  ShardPlan m_plan;
  MpiCommunicator& m_comm;
  Backend<float>& m_be;
  float* m_grads;
  float* m_params;
  size_t m_n;
  int m_rank;
  bool m_staged;
  std::vector<std::vector<int>> m_counts, m_displs;  // per bucket, per rank: MPI's int arrays, alive while in flight
  std::unique_ptr<HostBuffer<float, float>> m_staging;
  float* m_host = nullptr;
  std::vector<MPI_Request> m_requests, m_gathers;
  std::vector<size_t> m_gather_bucket;  // the bucket of each gather, in launch (buffer) order
  size_t m_gathered = 0;                // gathers [0, m_gathered) are complete (and uploaded)
};

}  // namespace

std::unique_ptr<GradientSync> make_sharded_sync(CommKind communicator, Communicator& comm,
                                                Backend<float>& be, float* grads, float* params, size_t n,
                                                size_t bucket_elems) {
  if (communicator == CommKind::Nccl) {
#ifdef ELBO_HAVE_CUDA
    return make_nccl_sync(comm, be, grads, n, bucket_elems, params);
#else
    throw config_error("dist.communicator: nccl needs the CUDA backend, which this build does not have");
#endif
  }
  if (comm.size() == 1) return std::make_unique<LocalShardedSync>(n, bucket_elems);
  if (communicator == CommKind::None)
    throw internal_error("no gradient sync requested for " + std::to_string(comm.size()) + " ranks");
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  if (mpi == nullptr) throw internal_error("a sharded MPI gradient sync needs an MpiCommunicator");
  return std::make_unique<MpiShardedSync>(*mpi, be, grads, params, n, bucket_elems);
}

void gather_slices_to_root(Communicator& comm, const ShardPlan& plan, const float* m_slice, const float* v_slice,
                           float* m_flat, float* v_flat) {
  if (plan.ranks != comm.size())
    throw internal_error("gather_slices_to_root: a plan for " + std::to_string(plan.ranks) + " ranks on " +
                         std::to_string(comm.size()));
  std::vector<size_t> counts(static_cast<size_t>(plan.ranks));
  size_t total = 0;
  for (int r = 0; r < plan.ranks; ++r) total += counts[static_cast<size_t>(r)] = plan.owned_elems(r);
  const size_t mine = counts[static_cast<size_t>(comm.rank())];
  std::vector<float> packed(comm.is_root() ? total : 0);
  for (auto [slice, flat] : {std::pair{m_slice, m_flat}, std::pair{v_slice, v_flat}}) {
    comm.gather(slice, mine, packed.data(), counts, 0);
    if (!comm.is_root()) continue;
    const float* from = packed.data();
    for (int r = 0; r < plan.ranks; ++r) {
      unpack_ranges(plan.owned(r), from, flat);
      from += counts[static_cast<size_t>(r)];
    }
  }
}

std::unique_ptr<GradientSync> make_gradient_sync(CommKind communicator, Communicator& comm,
                                                 Backend<float>& be, float* grads, size_t n, size_t bucket_elems) {
  if (communicator == CommKind::Nccl) {
#ifdef ELBO_HAVE_CUDA
    return make_nccl_sync(comm, be, grads, n, bucket_elems);
#else
    throw config_error("dist.communicator: nccl needs the CUDA backend, which this build does not have");
#endif
  }
  if (communicator == CommKind::None) {
    if (comm.size() != 1) throw internal_error("no gradient sync requested for " + std::to_string(comm.size()) + " ranks");
    return std::make_unique<LocalSync>();
  }
  if (communicator != CommKind::Mpi)
    throw internal_error(std::string("no gradient sync for dist.communicator '") + choice_name(communicator) + "'");
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
    // Sharded: the parameters' all-gather too, so that one round moves what an
    // all-reduce moves (and busbw keeps its meaning). At start-up every rank holds the
    // same parameters, so gathering them changes no value.
    sync.gather_params();
    sync.params_ready();
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
