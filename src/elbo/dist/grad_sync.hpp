// Gradient synchronisation: how one replica's flat gradient buffer becomes the sum
// over all replicas. The buffer is cut into buckets from its end, because backward
// finalises gradients from the last layer (highest offsets) to the first; as soon
// as backward reports that a bucket is final, its all-reduce starts, so communication
// overlaps the rest of backward (the scheme of PyTorch DDP's reducer, on one flat
// buffer instead of per-tensor hooks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/dist/comm.hpp"

namespace elbo {

struct BucketRange {
  size_t begin = 0, end = 0;  // elements [begin, end) of the flat buffer
  size_t size() const { return end - begin; }
};

// Buckets of at most `bucket_elems` elements covering [0, n), last bucket of the
// buffer first (the order in which backward finalises them). bucket_elems == 0 means
// one bucket. Buckets are also capped at INT_MAX elements (MPI and NCCL counts).
std::vector<BucketRange> plan_buckets(size_t n, size_t bucket_elems);

class GradientSync {
 public:
  virtual ~GradientSync() = default;
  // For the log: "mpi, 3 buckets of <= 1.0 MB", "nccl ...", "none (1 rank)".
  virtual std::string describe() const = 0;
  // Before the backward pass of `step` (0-based; negative for the startup self-test).
  virtual void begin(int64_t step) = 0;
  // grads[offset, n) hold their final values for this step; buckets inside may start.
  virtual void ready_from(size_t offset) = 0;
  // All gradients are final: returns when every bucket is reduced (on the GPU: ordered
  // before any later work on the compute stream), so grads hold the sum over ranks.
  virtual void finish() = 0;

  // What the training steps reduced (begin() with step >= 0; the self-test is not
  // counted): rounds are finish() calls, buckets the all-reduces launched in them. The
  // evidence that gradient accumulation syncs once per update, not per micro-batch.
  struct Counts {
    int64_t rounds = 0, buckets = 0;
  };
  virtual Counts counts() const { return {}; }  // nothing is reduced on one rank without NCCL
};

// The reducer bookkeeping shared by the MPI and NCCL implementations.
class BucketedSync : public GradientSync {
 public:
  void begin(int64_t step) override;
  void ready_from(size_t offset) final;
  void finish() final;
  size_t num_buckets() const { return m_buckets.size(); }
  Counts counts() const final { return m_counts; }

 protected:
  BucketedSync(size_t n, size_t bucket_elems);
  virtual void launch(const BucketRange& bucket) = 0;  // start reducing one bucket
  virtual void progress() {}                           // give the transport a chance to move
  virtual void complete() = 0;                         // wait for every launched bucket
  std::string operation() const;                       // names the step, for timeout messages
  std::string bucket_summary() const;

  std::vector<BucketRange> m_buckets;
  size_t m_next = 0;
  int64_t m_step = 0;
  Counts m_counts;
};

// `communicator` is "mpi", "nccl" or "none" (dist/placement.hpp decides). grads must
// stay valid for the lifetime of the result. On one rank with "mpi" or "none" nothing
// is reduced; "nccl" on one rank still runs NCCL (the tests compare it with the rest).
// With a CUDA backend, "mpi" stages buckets through pinned host memory (Debian's Open
// MPI is not CUDA-aware); "nccl" reduces in device memory on its own stream.
std::unique_ptr<GradientSync> make_gradient_sync(const std::string& communicator, Communicator& comm,
                                                 Backend<float>& be, float* grads, size_t n, size_t bucket_elems);

// All-reduce bandwidth of the gradient buffer, measured as nccl-tests does:
// algbw = bytes / time, busbw = algbw * 2 (ranks - 1) / ranks.
struct AllreduceRate {
  double seconds = 0;     // mean time of one all-reduce of the whole buffer
  double algbw_gbs = 0;   // GB/s (1e9 bytes)
  double busbw_gbs = 0;
};
// Zeroes grads, then times `iters` synchronised all-reduces after 2 warm-up rounds.
AllreduceRate measure_allreduce(GradientSync& sync, Backend<float>& be, float* grads, size_t n, int ranks,
                                int iters);

}  // namespace elbo
