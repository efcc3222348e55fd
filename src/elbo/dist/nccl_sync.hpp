// The NCCL gradient reducer (CUDA builds only): rank 0 creates the ncclUniqueId,
// MPI broadcasts it, every rank joins with ncclCommInitRankConfig. Buckets are
// all-reduced in device memory on a communication stream of their own, each gated
// by an event recorded on the compute stream when backward finalised it.
#pragma once

#include <memory>

#include "elbo/dist/grad_sync.hpp"

namespace elbo {

// `be` must be the CUDA backend. Throws a Dist error naming the NCCL call on failure.
std::unique_ptr<GradientSync> make_nccl_sync(Communicator& comm, Backend<float>& be, float* grads, size_t n,
                                             size_t bucket_elems);

}  // namespace elbo
