// Device and communicator resolution (see placement.hpp).
#include "elbo/dist/placement.hpp"

namespace elbo {

Placement resolve_placement(const ExperimentSpec& spec, const WorldInfo& world, const BackendReport& machine) {
  const std::string& src = spec.source;
  const std::string where = "rank " + std::to_string(world.rank) + " on " + world.host;
  Placement p;
  bool cuda = false;
  if (spec.device == Device::Cuda) {
    if (!machine.cuda_compiled)
      throw config_error(src + ": device: cuda, but this build of elbo has no CUDA backend (" + machine.cuda_detail +
                         "); rebuild with nvcc present or use device: cpu");
    if (machine.cuda_devices == 0)
      throw config_error(src + ": device: cuda, but " + where + " sees no usable GPU (" + machine.cuda_detail +
                         "); use device: auto or cpu");
    cuda = true;
  } else if (spec.device == Device::Auto) {
    cuda = machine.cuda_compiled && machine.cuda_devices > 0;
  }

  if (!cuda) {
    if (spec.dist.communicator == CommKind::Nccl)
      throw config_error(src + ": dist.communicator: nccl reduces GPU buffers, but " + where + " runs on the CPU (device: " +
                         choice_name(spec.device) + "); use dist.communicator: mpi or auto");
    p.device = DeviceKind::Cpu;
    p.communicator = CommKind::Mpi;
    p.why = spec.device == Device::Cpu ? "device: cpu" : "device: auto and no usable GPU";
    return p;
  }

  p.device = DeviceKind::Cuda;
  p.gpu = world.local_rank % machine.cuda_devices;
  // NCCL refuses two ranks of one communicator on the same GPU; MPI staging does not care.
  const bool shared = world.local_size > machine.cuda_devices;
  const std::string sharing = std::to_string(world.local_size) + " ranks share " +
                              std::to_string(machine.cuda_devices) + " GPU(s) on " + world.host;
  if (spec.dist.communicator == CommKind::Nccl && shared)
    throw config_error(src + ": dist.communicator: nccl cannot run several ranks on one GPU (" + sharing +
                       "); start at most one rank per GPU or use dist.communicator: mpi (or auto)");
  if (spec.dist.communicator == CommKind::Auto && world.size == 1) {
    // One replica: its gradient already is the sum. NCCL would cost a communicator's
    // start-up and an all-reduce launch per bucket per step for a copy.
    p.communicator = CommKind::None;
    p.why = "dist.communicator: auto and 1 rank: no gradient sync";
  } else if (spec.dist.communicator == CommKind::Auto) {
    p.communicator = shared ? CommKind::Mpi : CommKind::Nccl;
    p.why = shared ? "dist.communicator: auto and " + sharing + ": MPI through pinned host memory"
                   : "dist.communicator: auto: one rank per GPU";
  } else {
    p.communicator = spec.dist.communicator;
    p.why = std::string("dist.communicator: ") + choice_name(spec.dist.communicator);
  }
  return p;
}

}  // namespace elbo
