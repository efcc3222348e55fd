// The `elbo` subcommands beyond train/eval/info, and what they share: a trained
// model loaded onto a backend chosen by --device.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/cli/args.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/model/model.hpp"

namespace elbo::cli {

// A subcommand of `elbo`: adding it to the command line binds its options to its own
// state; `run` runs it once the whole line has parsed (on every rank).
struct Command {
  CLI::App* app;
  std::function<int(Communicator&)> run;
};

struct LoadedModel {
  ModelFile file;
  std::unique_ptr<ModelLayout> layout;  // by model.type (make_layout)
  std::unique_ptr<Backend<float>> backend;
  Buffer<float> params;  // in the backend's memory
};

// Reads MODEL.h5 and places it on `device` (auto|cpu|cuda, checked by the command
// line) with `threads` BLAS threads per rank (0 = the node's cores / local ranks).
// Collective; errors name the file or the option (`command` is the command's name
// for messages).
LoadedModel load_model(Communicator& comm, const std::string& command, const std::string& path,
                       const std::string& device, int64_t threads);

// Refuses a split `dir` whose samples are not the [C, H, W] the model was trained on.
void check_model_input(const data::ShardSet& set, const std::string& dir, const LoadedModel& m,
                       const std::string& model_path);

// elbo sample / reconstruct / interpolate: PNG grids (rank 0 writes them).
Command add_sample(CLI::App& elbo);
Command add_reconstruct(CLI::App& elbo);
Command add_interpolate(CLI::App& elbo);

}  // namespace elbo::cli
