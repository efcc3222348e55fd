// The trained-model file: an HDF5 file with every parameter under its PyTorch
// state_dict name and layout (/params/encoder.layers.0.weight is (out, in)), plus
// the resolved spec, so `elbo eval` and h5py users need nothing else.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "elbo/config/spec.hpp"
#include "elbo/model/model.hpp"

namespace elbo {

struct ModelFile {
  ExperimentSpec spec;
  std::vector<int> input_shape;  // [C, H, W]
  std::vector<float> params;     // flat, in layout order
  int64_t step = 0;
  int64_t epochs_completed = 0;
  // False for a file written before model files carried checksums: it loaded, but
  // nothing vouches for its parameters.
  bool verified = false;
};

// What a model file may hold besides the parameters that eval and sample use.
struct ModelFileExtras {
  // With optim.ema > 0 /params holds the moving average and /params_raw/<name> the
  // trained parameters themselves (each array with its checksum); attribute `ema` is
  // the decay. Null: no /params_raw, no `ema` attribute.
  const float* raw_params = nullptr;
  double ema = 0;
  // best.h5: the held-out bound that made these parameters the best so far (attribute
  // `test_neg_elbo`, nats per sample on the first `eval_samples` test samples).
  bool has_bound = false;
  double bound = 0;
  int64_t eval_samples = 0;
};

// Writes `path` atomically (temporary file, then rename): a crash never leaves a
// half-written model where a good one was.
void write_model_file(const std::string& path, const ExperimentSpec& spec, const std::vector<int>& input_shape,
                      const ModelLayout& layout, const float* params, int64_t step, int64_t epochs_completed,
                      const ModelFileExtras& extras = {});

// Reads and validates a model file; every problem is a Model error naming the file
// (and, for a checksum mismatch, the array). A file without checksums (written by an
// older elbo) still loads, with `verified` false.
ModelFile read_model_file(const std::string& path);

// Shared by the model file and checkpoints (ckpt/checkpoint.cpp): one dataset per
// named view under `group`, in PyTorch layout; the input shape as three attributes.
namespace detail {
void write_param_views(int64_t file, const std::string& group, const ModelLayout& layout, const float* flat);
void read_param_views(int64_t file, const std::string& group, const ModelLayout& layout, const std::string& path,
                      std::vector<float>* flat);
void write_input_shape(int64_t file, const std::vector<int>& input_shape);
std::vector<int> read_input_shape(int64_t file);
// FNV-1a (hex) over the raw bytes of every named view of each array, array after
// array, views in buffer order: over the views rather than the flat buffer, so the
// alignment padding between layers is not part of the format. For a layout without
// gaps this is the hash of the whole flat buffers, as checkpoints had it before the
// padding: those still verify.
std::string checksum_views(std::initializer_list<const float*> arrays, const ModelLayout& layout);
}  // namespace detail

}  // namespace elbo
