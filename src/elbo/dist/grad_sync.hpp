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

using BucketRange = FlatRange;  // elements [begin, end) of the flat buffer

// Buckets of at most `bucket_elems` elements covering [0, n), last bucket of the
// buffer first (the order in which backward finalises them). bucket_elems == 0 means
// one bucket. Buckets are also capped at INT_MAX elements (MPI and NCCL counts).
std::vector<BucketRange> plan_buckets(size_t n, size_t bucket_elems);

// ZeRO stage 1's partition of the flat buffer [0, n) over N ranks (dist.shard_optimizer).
// Every bucket of plan_buckets is cut into N contiguous parts of nearly equal size (the
// first size % N parts one element longer) and rank r owns part r of every bucket.
// Why per bucket and not one contiguous slice per rank: each bucket is reduce-scattered
// the moment backward finalises it, as the replicated path all-reduces it, so the overlap
// with backward is kept; every rank receives (N-1)/N of every bucket rather than one rank
// receiving a whole bucket while the others idle; and the optimizer work per rank is
// balanced to one element per bucket whatever the bucket size. The price is that a rank's
// slice is one run per bucket instead of one range; Adam is elementwise, so it takes the
// runs as a list. With one rank the slice is the whole buffer.
struct ShardPlan {
  int ranks = 1;
  std::vector<BucketRange> buckets;  // plan_buckets(n, bucket_elems): the last bucket of the buffer first
  // Part `rank` of bucket `k`, in flat-buffer elements.
  BucketRange part(size_t k, int rank) const;
  // Rank's parts in increasing order, adjacent ones merged (one range [0, n) for 1 rank).
  std::vector<BucketRange> owned(int rank) const;
  size_t owned_elems(int rank) const;
};
ShardPlan plan_shards(size_t n, size_t bucket_elems, int ranks);

// Host-side copies between the flat layout and a rank's packed slice (its owned ranges
// back to back, in order): checkpoints hold the flat layout, a rank keeps its slice.
void pack_ranges(const std::vector<BucketRange>& ranges, const float* flat, float* packed);
void unpack_ranges(const std::vector<BucketRange>& ranges, const float* packed, float* flat);

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

  // --- a sharded optimizer (make_sharded_sync); the replicated syncs do nothing here ---
  // The partition, or nullptr when every rank holds the whole reduced gradient. When
  // sharded, finish() leaves the sum over ranks on this rank's owned ranges only (the
  // rest of grads is scratch), and the optimizer updates only those ranges of params.
  virtual const ShardPlan* shard_plan() const { return nullptr; }
  // After the optimizer step: starts sending this rank's updated ranges of params to
  // every rank (an all-gather per bucket, first buckets of the buffer first, which the
  // next forward pass needs first).
  virtual void gather_params() {}
  // Returns when params is whole and identical on every rank again (on the GPU: ordered
  // before later work on the compute stream); a no-op when no gather is in flight. Call
  // before anything reads params: the next forward pass, evaluation, a checkpoint.
  virtual void params_ready() {}
  // The same for params[0, end) only (a forward pass about to run the layers there); the
  // rest of the gather keeps moving. Syncs that cannot wait in parts wait for all.
  virtual void params_ready_until(size_t end) {
    (void)end;
    params_ready();
  }
};

// The reducer bookkeeping shared by the MPI and NCCL implementations.
class BucketedSync : public GradientSync {
 public:
  void begin(int64_t step) override;
  void ready_from(size_t offset) final;
  void finish() final;
  size_t num_buckets() const { return m_buckets.size(); }

 protected:
  BucketedSync(size_t n, size_t bucket_elems);
  virtual void launch(const BucketRange& bucket) = 0;  // start reducing one bucket
  virtual void progress() {}                           // give the transport a chance to move
  virtual void complete() = 0;                         // wait for every launched bucket
  std::string operation() const;                       // names the step, for timeout messages
  virtual const char* collective() const { return "all-reduce"; }  // what launch() does, for operation()
  std::string bucket_summary() const;

  std::vector<BucketRange> m_buckets;
  size_t m_next = 0;
  int64_t m_step = 0;
};

// `communicator` is Mpi, Nccl or None (dist/placement.hpp decides). grads must
// stay valid for the lifetime of the result. On one rank with Mpi or None nothing
// is reduced; Nccl on one rank still runs NCCL (the tests compare it with the rest).
// With a CUDA backend, Mpi stages buckets through pinned host memory (Debian's Open
// MPI is not CUDA-aware); Nccl reduces in device memory on its own stream.
std::unique_ptr<GradientSync> make_gradient_sync(CommKind communicator, Communicator& comm,
                                                 Backend<float>& be, float* grads, size_t n, size_t bucket_elems);

// ZeRO stage 1 (dist.shard_optimizer): gradient buckets are reduce-scattered as backward
// finalises them (part r of every bucket to rank r, plan_shards), params all-gathered
// after the optimizer step. `communicator` as for make_gradient_sync; on one rank nothing
// is sent (the plan gives that rank the whole buffer), except that "nccl" still runs NCCL.
// grads and params must stay valid for the lifetime of the result.
std::unique_ptr<GradientSync> make_sharded_sync(CommKind communicator, Communicator& comm,
                                                Backend<float>& be, float* grads, float* params, size_t n,
                                                size_t bucket_elems);

// The moments of a sharded Adam whole on rank 0, for a checkpoint: every rank sends its
// packed slices (`m_slice`, `v_slice`, plan.owned(rank) order, host memory); rank 0
// writes the flat layout into m_flat and v_flat (n elements each; ignored elsewhere).
// Every rank must call it (a collective).
void gather_slices_to_root(Communicator& comm, const ShardPlan& plan, const float* m_slice, const float* v_slice,
                           float* m_flat, float* v_flat);

// All-reduce bandwidth of the gradient buffer, measured as nccl-tests does:
// algbw = bytes / time, busbw = algbw * 2 (ranks - 1) / ranks.
struct AllreduceRate {
  double seconds = 0;     // mean time of one all-reduce of the whole buffer
  double algbw_gbs = 0;   // GB/s (1e9 bytes)
  double busbw_gbs = 0;
};
// Zeroes grads, then times `iters` synchronised all-reduces after 2 warm-up rounds (a
// sharded sync: reduce-scatter + parameter all-gather, the same bytes).
AllreduceRate measure_allreduce(GradientSync& sync, Backend<float>& be, float* grads, size_t n, int ranks,
                                int iters);

}  // namespace elbo
