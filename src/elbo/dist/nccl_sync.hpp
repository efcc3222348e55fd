// The NCCL gradient reducer (CUDA builds only): rank 0 creates the ncclUniqueId,
// MPI broadcasts it, every rank joins with ncclCommInitRankConfig. Buckets are
// all-reduced in device memory on a communication stream of their own, each gated
// by an event recorded on the compute stream when backward finalised it.
#pragma once

#include <memory>

#include "elbo/dist/grad_sync.hpp"

namespace elbo {

// `be` must be the CUDA backend. Throws a Dist error naming the NCCL call on failure.
// With `params`, the optimizer is sharded (make_sharded_sync): buckets are
// reduce-scattered (ncclReduceScatter; grouped ncclReduce calls when a bucket does not
// split into equal parts) and params all-gathered (ncclAllGather; grouped ncclBroadcast).
std::unique_ptr<GradientSync> make_nccl_sync(Communicator& comm, Backend<float>& be, float* grads, size_t n,
                                             size_t bucket_elems, float* params = nullptr);

}  // namespace elbo
