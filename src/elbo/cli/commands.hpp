// The `elbo` subcommands beyond train/eval/info, and what they share: a trained
// model loaded onto a backend chosen by --device.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/model/vae.hpp"

namespace elbo::cli {

struct LoadedModel {
  ModelFile file;
  std::unique_ptr<VaeLayout> layout;
  std::unique_ptr<Backend<float>> backend;
  Buffer<float> params;  // in the backend's memory
};

// Reads MODEL.h5 and places it on `device` (auto|cpu|cuda) with `threads` BLAS
// threads per rank (0 = the node's cores / local ranks). Collective; errors name the
// file or the option (`command` is the command's name for messages).
LoadedModel load_model(Communicator& comm, const std::string& command, const std::string& path,
                       const std::string& device, int64_t threads);

// elbo sample / reconstruct / interpolate: PNG grids (rank 0 writes them).
int cmd_sample(const std::vector<std::string>& args, Communicator& comm);
int cmd_reconstruct(const std::vector<std::string>& args, Communicator& comm);
int cmd_interpolate(const std::vector<std::string>& args, Communicator& comm);

}  // namespace elbo::cli
