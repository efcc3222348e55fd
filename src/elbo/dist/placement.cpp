// Device and communicator resolution (see placement.hpp).
#include "elbo/dist/placement.hpp"

namespace elbo {

Placement resolve_placement(const ExperimentSpec& spec, const WorldInfo& world, const BackendReport& machine) {
  const std::string& src = spec.source;
  const std::string where = "rank " + std::to_string(world.rank) + " on " + world.host;
  Placement p;
  bool cuda = false;
  if (spec.device == "cuda") {
    if (!machine.cuda_compiled)
      throw config_error(src + ": device: cuda, but this build of elbo has no CUDA backend (" + machine.cuda_detail +
                         "); rebuild with nvcc present or use device: cpu");
    if (machine.cuda_devices == 0)
      throw config_error(src + ": device: cuda, but " + where + " sees no usable GPU (" + machine.cuda_detail +
                         "); use device: auto or cpu");
    cuda = true;
  } else if (spec.device == "auto") {
    cuda = machine.cuda_compiled && machine.cuda_devices > 0;
  }

  if (!cuda) {
    if (spec.dist.communicator == "nccl")
      throw config_error(src + ": dist.communicator: nccl reduces GPU buffers, but " + where + " runs on the CPU (device: " +
                         spec.device + "); use dist.communicator: mpi or auto");
    p.device = DeviceKind::Cpu;
    p.communicator = "mpi";
    p.why = spec.device == "cpu" ? "device: cpu" : "device: auto and no usable GPU";
    return p;
  }

  p.device = DeviceKind::Cuda;
  p.gpu = world.local_rank % machine.cuda_devices;
  // NCCL refuses two ranks of one communicator on the same GPU; MPI staging does not care.
  const bool shared = world.local_size > machine.cuda_devices;
  const std::string sharing = std::to_string(world.local_size) + " ranks share " +
                              std::to_string(machine.cuda_devices) + " GPU(s) on " + world.host;
  if (spec.dist.communicator == "nccl" && shared)
    throw config_error(src + ": dist.communicator: nccl cannot run several ranks on one GPU (" + sharing +
                       "); start at most one rank per GPU or use dist.communicator: mpi (or auto)");
  if (spec.dist.communicator == "auto" && world.size == 1) {
    // One replica: its gradient already is the sum. NCCL would cost a communicator's
    // start-up and an all-reduce launch per bucket per step for a copy.
    p.communicator = "none";
    p.why = "dist.communicator: auto and 1 rank: no gradient sync";
  } else if (spec.dist.communicator == "auto") {
    p.communicator = shared ? "mpi" : "nccl";
    p.why = shared ? "dist.communicator: auto and " + sharing + ": MPI through pinned host memory"
                   : "dist.communicator: auto: one rank per GPU";
  } else {
    p.communicator = spec.dist.communicator;
    p.why = "dist.communicator: " + spec.dist.communicator;
  }
  return p;
}

}  // namespace elbo
