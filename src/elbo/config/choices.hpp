// The settings that are choices: one enum and one name table each. The table is the
// only place a choice is spelled; the spec parser, the resolved dump, log lines and
// error messages all go through it. (C++17: the CUDA sources include this via backend/.)
#pragma once

#include <initializer_list>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>

namespace elbo {

template <class E>
struct Named {
  E value;
  const char* name;
};

// --- the choices -----------------------------------------------------------------
// Each enum's table is found by overload resolution on `choices_of(E)`; the order of
// a table is the order in which messages list the choices.

enum class Device { Auto, Cpu, Cuda };  // device: auto = CUDA when a GPU is visible, else CPU
inline constexpr Named<Device> kDeviceNames[] = {{Device::Auto, "auto"}, {Device::Cpu, "cpu"}, {Device::Cuda, "cuda"}};
constexpr const auto& choices_of(Device) { return kDeviceNames; }

// data.loader; resolve_loader (data/stream.hpp) turns Auto into Memory or Stream.
enum class Loader { Auto, Memory, Stream };
inline constexpr Named<Loader> kLoaderNames[] = {
    {Loader::Auto, "auto"}, {Loader::Memory, "memory"}, {Loader::Stream, "stream"}};
constexpr const auto& choices_of(Loader) { return kLoaderNames; }

// data.shuffle: the sample order of each epoch. The spec spells Global and Off as any
// YAML boolean; the dump writes true and false.
enum class Shuffle { Global, Off, Blocks };
inline constexpr Named<Shuffle> kShuffleNames[] = {
    {Shuffle::Global, "true"}, {Shuffle::Off, "false"}, {Shuffle::Blocks, "blocks"}};
constexpr const auto& choices_of(Shuffle) { return kShuffleNames; }

// hierarchical: the top-down latent hierarchy of model/hvae.hpp (VDVAE's structure).
enum class ModelType { Mlp, Conv, Hierarchical };
inline constexpr Named<ModelType> kModelTypeNames[] = {
    {ModelType::Mlp, "mlp"}, {ModelType::Conv, "conv"}, {ModelType::Hierarchical, "hierarchical"}};
constexpr const auto& choices_of(ModelType) { return kModelTypeNames; }

// How a hierarchical model's stage changes resolution: pool = average pooling in the
// encoder and nearest unpooling in the decoder (VDVAE; no parameters); conv = a learned
// convolution with kernel = stride = down (a patch embedding) and its transposed
// convolution, which gives each position of the coarser stage its own down x down
// patch and carries the change of width.
enum class Resample { Pool, Conv };
inline constexpr Named<Resample> kResampleNames[] = {{Resample::Pool, "pool"}, {Resample::Conv, "conv"}};
constexpr const auto& choices_of(Resample) { return kResampleNames; }

// An entry of a conv model's encoder or decoder list (LayerSpec).
enum class LayerType { Linear, Conv2d, ConvTranspose2d, GroupNorm, Relu, Tanh, Softplus, Flatten, Reshape };
inline constexpr Named<LayerType> kLayerTypeNames[] = {{LayerType::Linear, "linear"},
                                                       {LayerType::Conv2d, "conv2d"},
                                                       {LayerType::ConvTranspose2d, "conv_transpose2d"},
                                                       {LayerType::GroupNorm, "group_norm"},
                                                       {LayerType::Relu, "relu"},
                                                       {LayerType::Tanh, "tanh"},
                                                       {LayerType::Softplus, "softplus"},
                                                       {LayerType::Flatten, "flatten"},
                                                       {LayerType::Reshape, "reshape"}};
constexpr const auto& choices_of(LayerType) { return kLayerTypeNames; }

// The op set's activations; a spec's model.activation offers all but Identity.
enum class Activation { Identity, Relu, Tanh, Softplus };
inline constexpr Named<Activation> kActivationNames[] = {{Activation::Identity, "identity"},
                                                         {Activation::Relu, "relu"},
                                                         {Activation::Tanh, "tanh"},
                                                         {Activation::Softplus, "softplus"}};
constexpr const auto& choices_of(Activation) { return kActivationNames; }

// The decoder's output distribution. These names are stored in model files; the spec
// spells them as model.likelihood {type, variance} ({type, components} for the
// discretized logistic mixture of 8-bit pixels, PixelCNN++'s).
enum class Likelihood { Bernoulli, GaussianFixed, GaussianLearned, DiscretizedLogisticMixture };
inline constexpr Named<Likelihood> kLikelihoodNames[] = {
    {Likelihood::Bernoulli, "bernoulli"},
    {Likelihood::GaussianFixed, "gaussian_fixed"},
    {Likelihood::GaussianLearned, "gaussian_learned"},
    {Likelihood::DiscretizedLogisticMixture, "discretized_logistic_mixture"}};
constexpr const auto& choices_of(Likelihood) { return kLikelihoodNames; }

enum class OptimizerType { Adam, AdamW };
inline constexpr Named<OptimizerType> kOptimizerTypeNames[] = {{OptimizerType::Adam, "adam"},
                                                               {OptimizerType::AdamW, "adamw"}};
constexpr const auto& choices_of(OptimizerType) { return kOptimizerTypeNames; }

// loss.kl_schedule: the KL weight's schedule over the run (optim/kl.hpp).
enum class LossType { Elbo, Iwae };
inline constexpr Named<LossType> kLossTypeNames[] = {{LossType::Elbo, "elbo"}, {LossType::Iwae, "iwae"}};
constexpr const auto& choices_of(LossType) { return kLossTypeNames; }

enum class KlSchedule { Linear, Cyclical };
inline constexpr Named<KlSchedule> kKlScheduleNames[] = {{KlSchedule::Linear, "linear"},
                                                         {KlSchedule::Cyclical, "cyclical"}};
constexpr const auto& choices_of(KlSchedule) { return kKlScheduleNames; }

enum class LrSchedule { Constant, Cosine };
inline constexpr Named<LrSchedule> kLrScheduleNames[] = {{LrSchedule::Constant, "constant"},
                                                         {LrSchedule::Cosine, "cosine"}};
constexpr const auto& choices_of(LrSchedule) { return kLrScheduleNames; }

// train.on_nonfinite: a NaN/Inf loss or gradient ends the run or drops the step.
enum class NonfinitePolicy { Abort, Skip };
inline constexpr Named<NonfinitePolicy> kNonfinitePolicyNames[] = {{NonfinitePolicy::Abort, "abort"},
                                                                   {NonfinitePolicy::Skip, "skip"}};
constexpr const auto& choices_of(NonfinitePolicy) { return kNonfinitePolicyNames; }

// train.cuda_graph.
enum class GraphMode { Auto, On, Off };
inline constexpr Named<GraphMode> kGraphModeNames[] = {
    {GraphMode::Auto, "auto"}, {GraphMode::On, "on"}, {GraphMode::Off, "off"}};
constexpr const auto& choices_of(GraphMode) { return kGraphModeNames; }

// How the replicas reduce gradients. A spec's dist.communicator offers auto, nccl and
// mpi; placement (dist/placement.hpp) resolves auto to one of the others, or to None
// when a single replica has nothing to reduce.
enum class CommKind { Auto, Nccl, Mpi, None };
inline constexpr Named<CommKind> kCommKindNames[] = {
    {CommKind::Auto, "auto"}, {CommKind::Nccl, "nccl"}, {CommKind::Mpi, "mpi"}, {CommKind::None, "none"}};
constexpr const auto& choices_of(CommKind) { return kCommKindNames; }

// --- one set of functions for all of them ----------------------------------------

template <class E>
const char* choice_name(E value) {
  for (const auto& c : choices_of(value))
    if (c.value == value) return c.name;
  return "?";  // only an enum value cast from an integer gets here
}

// `allowed`: the subset a caller offers (empty: the whole table).
template <class E>
bool choice_allowed(E value, std::initializer_list<E> allowed) {
  if (allowed.size() == 0) return true;
  for (E a : allowed)
    if (a == value) return true;
  return false;
}

// The choice spelled `text`, or nothing when no (allowed) choice is spelled so.
template <class E>
std::optional<E> parse_choice(std::string_view text, std::initializer_list<E> allowed = {}) {
  for (const auto& c : choices_of(E{}))
    if (text == c.name && choice_allowed(c.value, allowed)) return c.value;
  return std::nullopt;
}

// "auto, cpu, cuda": the (allowed) names in table order, for messages.
template <class E>
std::string choice_list(std::initializer_list<E> allowed = {}) {
  std::string out;
  for (const auto& c : choices_of(E{})) {
    if (!choice_allowed(c.value, allowed)) continue;
    out += (out.empty() ? "" : ", ");
    out += c.name;
  }
  return out;
}

// Log lines and test failures print a choice by its name.
template <class E, class = decltype(choices_of(E{}))>
std::ostream& operator<<(std::ostream& os, E value) {
  return os << choice_name(value);
}

}  // namespace elbo
