// ExperimentSpec: the typed, validated form of a YAML experiment file. Parsed once
// (with --set overrides applied to the YAML tree first); every error names the
// file, the line and the key, and lists the valid choices where there are some.
// One table of keys per section (spec.cpp) drives parsing, the resolved dump and the
// resume rule; the choices are enums with one name table each (choices.hpp).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "elbo/config/choices.hpp"

namespace elbo {

struct DataSpec {
  std::string train;             // split directory (or its manifest.yaml) written by elbo-shard
  std::string test;              // optional: evaluated at the end of training
  std::vector<int> shape;        // optional [C, H, W]; checked against the shards when given
  bool binarize = false;         // dynamic binarization: x ~ Bernoulli(pixel) per step
  Shuffle shuffle = Shuffle::Global;  // blocks: the locality-aware order (shuffled blocks, windows; data/sampler.hpp)
  int64_t max_samples = 0;       // 0 = all; otherwise the first N samples of the split
  Loader loader = Loader::Auto;  // auto = memory when a split fits in cache_mb
  double cache_mb = 1024.0;      // stream: pixels cached per rank; auto: the largest split held in memory
};

// One entry of a convolutional model's encoder or decoder list (model.type: conv),
// in PyTorch's terms: the list reads like an nn.Sequential.
struct LayerSpec {
  LayerType type = LayerType::Linear;
  int features = 0;        // linear: output features
  int channels = 0;        // conv2d, conv_transpose2d: output channels
  int kernel = 3, stride = 1, padding = 0, output_padding = 0;
  int groups = 0;          // group_norm: number of channel groups
  std::vector<int> shape;  // reshape: [C, H, W]
};

// One resolution of a hierarchical model (model.type: hierarchical), listed from the
// input's resolution down: the encoder average-pools its input by `down` and runs
// `blocks` residual blocks; the decoder, on its way back up, runs `groups` blocks
// with a latent group of `latent` channels per position each, then `dec_blocks`
// residual blocks without latents, then unpools by `down`. A stage may have its own
// stream width and bottleneck (VDVAE's per-resolution widths: wide where positions
// are few); 0 takes model.width / model.bottleneck, and is left out of the dump so
// that specs without the keys keep their text.
struct StageSpec {
  int down = 1;                        // pooling factor from the previous stage (the first: from the input)
  int blocks = 1;                      // encoder residual blocks
  int groups = 1;                      // decoder blocks, one latent group each
  int latent = 4;                      // latent channels per position in each group
  Resample resample = Resample::Pool;  // how the resolution (and width) changes from the previous stage
  int dec_blocks = 0;                  // decoder residual blocks after the groups (no latent)
  int width = 0;                       // the stream's channels at this resolution; 0 = model.width
  int bottleneck = 0;                  // channels inside this stage's residual blocks; 0 = model.bottleneck
  bool operator==(const StageSpec&) const = default;
};

struct ModelSpec {
  ModelType type = ModelType::Mlp;
  std::vector<int> encoder{400};  // mlp: hidden widths
  std::vector<int> decoder{400};
  std::vector<LayerSpec> conv_encoder;  // conv: x -> ... (then a linear head to [mu | logvar])
  std::vector<LayerSpec> conv_decoder;  // conv: z -> ... -> the decoder output (image shape)
  int latent = 20;
  Activation activation = Activation::Relu;
  Likelihood likelihood = Likelihood::Bernoulli;
  double sigma = 1.0;  // standard deviation of the fixed-variance Gaussian likelihood
  // hierarchical: the residual stream's channels, the residual blocks' bottleneck
  // channels and the stages (model/hvae.hpp); activation is the blocks' activation.
  int width = 32;
  int bottleneck = 16;
  std::vector<StageSpec> stages;
  int components = 10;  // mixture components K of the discretized logistic mixture (PixelCNN++'s 10)

  // Stage s's stream width and bottleneck with model.width / model.bottleneck filled in.
  int stage_width(size_t s) const { return stages.at(s).width > 0 ? stages[s].width : width; }
  int stage_bottleneck(size_t s) const { return stages.at(s).bottleneck > 0 ? stages[s].bottleneck : bottleneck; }
};

// The objective, and its KL term (optim/kl.hpp has the formulas).
struct LossSpec {
  // elbo: the one-sample ELBO with the closed-form KL. iwae: the importance-weighted
  // bound with `samples` samples per input (Burda et al. 2015); beta tempers its
  // log q - log p term like the KL's, so the schedules below apply to both.
  LossType type = LossType::Elbo;
  int samples = 1;               // iwae: importance samples k per input
  bool dreg = false;             // iwae: the doubly reparameterized encoder gradient (Tucker et al. 2018)
  double beta = 1.0;             // weight of the KL term after warm-up
  KlSchedule kl_schedule = KlSchedule::Linear;  // linear: the warm-up below | cyclical: Fu et al. 2019
  int64_t kl_warmup_steps = 0;   // linear: beta ramps linearly from 0 over this many steps
  int kl_cycles = 4;             // cyclical: M cycles over the run's total steps
  double kl_ramp = 0.5;          // cyclical: R, the share of each cycle spent ramping 0 -> beta
  double free_bits = 0.0;        // nats per latent dimension: floor of each group's batch-mean KL; 0 = off
  int free_bits_group = 1;       // latent dimensions per free-bits group (consecutive; 1 = per dimension)
};

// Importance samples per input a training pass runs: loss.samples for iwae, 0 (none: the ELBO's one pass) else.
inline int iw_samples(const LossSpec& l) { return l.type == LossType::Iwae ? l.samples : 0; }

struct OptimSpec {
  OptimizerType type = OptimizerType::Adam;
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double grad_clip = 0.0;        // max global gradient L2 norm; 0 = off
  LrSchedule schedule = LrSchedule::Constant;
  int64_t warmup_steps = 0;      // linear warm-up from 0 to lr
  double min_lr = 0.0;           // floor of the cosine decay
  // Decay of the exponential moving average of the parameters (0 = off): after each
  // applied update ema = ema * d + params * (1 - d), starting from the initial
  // parameters. Evaluation, image grids, model.h5 and best.h5 use it.
  double ema = 0.0;
};

struct TrainSpec {
  int64_t batch_size = 128;      // global batch, split evenly over the ranks
  int64_t epochs = 10;
  int64_t max_steps = 0;         // 0 = no cap; otherwise stop after this many steps
  bool drop_last = false;
  int64_t log_every = 100;       // steps between progress lines
  int threads = 0;               // BLAS threads per rank; 0 = cores / ranks on the node
  NonfinitePolicy on_nonfinite = NonfinitePolicy::Abort;
  // With skip, how much skipping a run may do before it ends with an error: this many
  // consecutive skipped steps, or more than this share of all steps (once the skips
  // also exceed max_consecutive_skips, so that an early burst alone does not count).
  int64_t max_consecutive_skips = 10;
  double max_skip_fraction = 0.05;
  // A finite gradient norm (of the summed gradient, before clipping) above this skips
  // the update on every rank, as VDVAE's skip_threshold; 0 = off. The limits above
  // count these skips too.
  double skip_threshold = 0.0;
  // Micro-batches per update: each rank's slice of the global batch (batch_size) is
  // computed in this many passes whose gradients add up before the one all-reduce.
  // A memory knob: the update, the steps and the sample sequence do not change.
  int64_t accumulate = 1;
  GraphMode cuda_graph = GraphMode::Auto;  // replay the steady-state forward/backward as one CUDA graph
  bool deterministic = true;           // false: cuDNN may pick faster, non-deterministic algorithms
  // Stop (like a finished run) after this many evaluations during training (eval.every)
  // without a better held-out bound than the best so far; 0 = never.
  int64_t patience = 0;
};

struct CheckpointSpec {
  int64_t every = 0;             // steps between checkpoints (0 = only at the end and on a stop signal)
  int keep = 3;                  // newest checkpoints kept in output.dir/checkpoints (0 = all)
  double grace_s = 120.0;        // after a stop signal, exit no later than this even if unfinished
};

struct EvalSpec {
  bool at_end = true;            // evaluate data.test after training, when given
  int iw_samples = 0;            // importance samples for the IWAE bound; 0 = skip
  int64_t batch_size = 500;
  int64_t every = 0;             // during training, every N steps: data.test metrics and image grids (0 = off)
  int64_t max_samples = 2000;    // of data.test for those periodic evaluations (0 = all); the final one uses all
  bool images = true;            // sample and reconstruction grids (PNG) at each evaluation during and after training
};

struct OutputSpec {
  std::string dir = "runs/default";
  bool overwrite = false;        // allow writing into a directory that holds an earlier run
  bool tensorboard = true;       // TensorBoard event files in output.dir/tensorboard (metrics and image grids)
};

// How replicas are placed and how they talk (the GPU path; the CPU path always uses MPI).
struct DistSpec {
  CommKind communicator = CommKind::Auto;  // auto | nccl | mpi (auto: nccl on GPUs unless ranks share one)
  double bucket_mb = 1.0;        // gradient all-reduce bucket size; 0 = one all-reduce after backward
  double timeout_s = 300.0;      // a collective unfinished after this long aborts the job; 0 = never
  bool self_test = true;         // time one all-reduce of the gradient buffer at startup (busbw in the log)
  bool shard_optimizer = false;  // ZeRO stage 1: reduce-scatter the gradients, Adam moments for 1/N of the
                                 // parameters per rank, all-gather the parameters (may change on resume)
  double min_link_mbps = 10.0;   // a link between nodes measured slower ends the job (dist/link_check.cpp); 0 = off
};

struct ExperimentSpec {
  std::string name = "experiment";
  uint64_t seed = 1;
  Device device = Device::Auto;
  DataSpec data;
  ModelSpec model;
  LossSpec loss;
  OptimSpec optim;
  TrainSpec train;
  EvalSpec eval;
  OutputSpec output;
  DistSpec dist;
  CheckpointSpec checkpoint;
  std::string source;  // the file it came from, for messages
  std::map<std::string, std::string> overrides;  // key path -> the --set argument that set it, for messages
};

// Where `key`'s value came from, for messages checked after parsing: "--set key=value"
// when an override set it (or a mapping above it), else the spec file.
std::string spec_origin(const ExperimentSpec& spec, const std::string& key);

// Parses `path`, applying each "key.path=value" override first. Throws a Config error.
ExperimentSpec load_spec(const std::string& path, const std::vector<std::string>& overrides = {});
// Same from YAML text (`source` names it in messages); used for specs stored in model files.
ExperimentSpec parse_spec(const std::string& yaml_text, const std::string& source,
                          const std::vector<std::string>& overrides = {});
// The resolved spec as YAML: every key, defaults included; parse_spec(dump_spec(s)) == s.
// Its text is stored in run directories and checkpoints: keep it stable.
std::string dump_spec(const ExperimentSpec& spec);

// Whether a key of the resolved spec ("seed", "data.shuffle", "model.likelihood.sigma",
// "model.encoder") must keep a checkpoint's value when the run resumes: a change would
// alter the model or the sequence of samples, eps and binarization draws.
bool fixed_on_resume(const std::string& key);

}  // namespace elbo
