// Where a rank's replica runs and how the replicas reduce gradients: the spec's
// `device` and `dist.communicator` resolved against the build, this node's GPUs and
// the ranks sharing them. Pure logic over facts gathered elsewhere, so every rule is
// unit-tested without a GPU.
#pragma once

#include <string>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/dist/comm.hpp"

namespace elbo {

struct Placement {
  DeviceKind device = DeviceKind::Cpu;
  int gpu = -1;                     // CUDA ordinal of this rank (local_rank % GPUs on the node)
  CommKind communicator = CommKind::Mpi;  // Mpi, Nccl, or None (auto with a single rank); never Auto
  std::string why;                  // one line for the log
};

// Throws a Config error naming the spec key when the request cannot be met.
Placement resolve_placement(const ExperimentSpec& spec, const WorldInfo& world, const BackendReport& machine);

}  // namespace elbo
