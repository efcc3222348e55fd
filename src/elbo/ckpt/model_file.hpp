// The trained-model file: an HDF5 file with every parameter under its PyTorch
// state_dict name and layout (/params/encoder.layers.0.weight is (out, in)), plus
// the resolved spec, so `elbo eval` and h5py users need nothing else.
#pragma once

#include <string>
#include <vector>

#include "elbo/config/spec.hpp"
#include "elbo/model/vae.hpp"

namespace elbo {

struct ModelFile {
  ExperimentSpec spec;
  std::vector<int> input_shape;  // [C, H, W]
  std::vector<float> params;     // flat, in VaeLayout order
  int64_t step = 0;
  int64_t epochs_completed = 0;
};

// Writes `path` atomically (temporary file, then rename): a crash never leaves a
// half-written model where a good one was.
void write_model_file(const std::string& path, const ExperimentSpec& spec, const std::vector<int>& input_shape,
                      const VaeLayout& layout, const float* params, int64_t step, int64_t epochs_completed);

// Reads and validates a model file; every problem is a Model error naming the file.
ModelFile read_model_file(const std::string& path);

// Shared by the model file and checkpoints (ckpt/checkpoint.cpp): one dataset per
// named view under `group`, in PyTorch layout; the input shape as three attributes.
namespace detail {
void write_param_views(int64_t file, const std::string& group, const VaeLayout& layout, const float* flat);
void read_param_views(int64_t file, const std::string& group, const VaeLayout& layout, const std::string& path,
                      std::vector<float>* flat);
void write_input_shape(int64_t file, const std::vector<int>& input_shape);
std::vector<int> read_input_shape(int64_t file);
}  // namespace detail

}  // namespace elbo
