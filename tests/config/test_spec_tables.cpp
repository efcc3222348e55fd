// The spec's tables: choice names, the resolved dump's text (which checkpoints store
// and the resume check compares), and which keys a resumed run must keep.
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/config/choices.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"
#include "spec_errors.hpp"

namespace elbo {
namespace {

using spec_test::expect_error;

const std::string kFixtures = std::string(ELBO_SOURCE_DIR) + "/tests/config/fixtures/";

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every name of a table parses back to its value, and no two values share a name.
template <class E>
void expect_table_round_trips(size_t expected_size) {
  std::set<std::string> seen;
  size_t n = 0;
  for (const auto& c : choices_of(E{})) {
    ++n;
    EXPECT_TRUE(seen.insert(c.name).second) << "name '" << c.name << "' appears twice";
    EXPECT_EQ(parse_choice<E>(c.name), c.value) << c.name;
    EXPECT_STREQ(choice_name(c.value), c.name);
  }
  EXPECT_EQ(n, expected_size);
  EXPECT_FALSE(parse_choice<E>("no-such-choice").has_value());
}

TEST(Choices, EveryNameRoundTrips) {
  expect_table_round_trips<Device>(3);
  expect_table_round_trips<Loader>(3);
  expect_table_round_trips<Shuffle>(3);
  expect_table_round_trips<ModelType>(3);
  expect_table_round_trips<LayerType>(9);
  expect_table_round_trips<Activation>(4);
  expect_table_round_trips<Likelihood>(4);  // with discretized_logistic_mixture
  expect_table_round_trips<OptimizerType>(2);
  expect_table_round_trips<LrSchedule>(2);
  expect_table_round_trips<NonfinitePolicy>(2);
  expect_table_round_trips<GraphMode>(3);
  expect_table_round_trips<CommKind>(4);
}

TEST(Choices, ListsAndSubsetsKeepTableOrder) {
  EXPECT_EQ(choice_list<Device>(), "auto, cpu, cuda");
  EXPECT_EQ(choice_list<CommKind>({CommKind::Mpi, CommKind::Auto}), "auto, mpi");
  EXPECT_FALSE(parse_choice<CommKind>("none", {CommKind::Auto, CommKind::Nccl, CommKind::Mpi}).has_value());
  EXPECT_EQ(parse_choice<CommKind>("none"), CommKind::None);
  std::ostringstream os;
  os << Loader::Stream << " " << Likelihood::GaussianLearned;
  EXPECT_EQ(os.str(), "stream gaussian_learned");
}

TEST(Choices, ASpecOffersOnlyItsSubsetAndNamesIt) {
  // The op set's Identity and placement's None are not spec choices.
  expect_error("data: {train: x}\nmodel: {activation: identity}\n",
               {"exp.yaml:2: model.activation: unknown value 'identity'; valid choices: relu, tanh, softplus"});
  expect_error("data: {train: x}\ndist: {communicator: none}\n",
               {"dist.communicator: unknown value 'none'; valid choices: auto, nccl, mpi"});
  expect_error("data: {train: x}\ndevice: tpu\n",
               {"exp.yaml:2: device: unknown value 'tpu'; valid choices: auto, cpu, cuda"});
  expect_error("data: {train: x, loader: disk}\n",
               {"data.loader: unknown value 'disk'; valid choices: auto, memory, stream"});
  expect_error("data: {train: x}\ntrain: {cuda_graph: maybe}\n",
               {"train.cuda_graph: unknown value 'maybe'; valid choices: auto, on, off"});
  expect_error("data: {train: x}\nmodel: {type: conv, encoder: [relu, {type: pool}], decoder: [flatten]}\n",
               {"model.encoder[1].type: unknown layer 'pool'; valid layers: linear, conv2d, conv_transpose2d, "
                "group_norm, relu, tanh, softplus, flatten, reshape"});
  expect_error("data: {train: x}\nmodel: {type: conv, encoder: [{type: relu, groups: 2}], decoder: [flatten]}\n",
               {"model.encoder[0].groups: unknown key; valid keys here: type, features, channels, kernel, stride, "
                "padding, output_padding, groups, shape"});
  expect_error("data: {train: x}\nmodel: {latent: 4, depth: 3}\n",
               {"model.depth: unknown key; valid keys here: type, encoder, decoder, latent, activation, likelihood, "
                "width, bottleneck, stages"});
}

// `dump` without the section keys that `stored` lacks (keys added after the fixture was
// written, e.g. dist.shard_optimizer), with whatever is nested under them: what is left
// must be the stored text byte for byte.
std::string without_keys_added_later(const std::string& dump, const std::string& stored) {
  const auto key_of = [](const std::string& line) { return line.substr(0, line.find(':')); };
  std::set<std::string> known;
  std::string section;
  std::istringstream in(stored);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("  ", 0) != 0)
      section = key_of(line);
    else if (line.rfind("   ", 0) != 0)
      known.insert(section + "." + key_of(line.substr(2)));
  }
  std::string out;
  bool keep = true;
  std::istringstream now(dump);
  for (std::string line; std::getline(now, line);) {
    if (line.rfind("  ", 0) != 0) {
      section = key_of(line);
      keep = true;
    } else if (line.rfind("   ", 0) != 0 && line.rfind("  - ", 0) != 0) {
      keep = known.count(section + "." + key_of(line.substr(2))) > 0;
    }
    if (keep) out += line + "\n";
  }
  return out;
}

// Specs dumped by elbo before the key tables (tests/config/fixtures, written by commit
// de4a055): the same input must give the same text byte for byte (but for keys added
// since, at their defaults), the stored text must parse and dump to itself, and a run
// resumed from a checkpoint holding it sees no change.
TEST(SpecFixtures, DumpsWrittenBeforeTheTablesAreReproducedExactly) {
  const std::pair<std::string, std::string> cases[] = {
      {"every_choice.yaml", "every_choice.dump.yaml"},
      {"other_choices.yaml", "other_choices.dump.yaml"},
      {"defaults.yaml", "defaults.dump.yaml"},
      {"softplus_auto.yaml", "softplus_auto.dump.yaml"},
      {"../../../configs/fmnist_mlp.yaml", "config_fmnist_mlp.dump.yaml"},
      {"../../../configs/smoke.yaml", "config_smoke.dump.yaml"},
      {"../../../configs/fmnist_conv.yaml", "config_fmnist_conv.dump.yaml"},
      {"../../../configs/celeba64_conv.yaml", "config_celeba64_conv.dump.yaml"},
  };
  for (const auto& [input, dump] : cases) {
    SCOPED_TRACE(input);
    const std::string stored = read_file(kFixtures + dump);
    ASSERT_FALSE(stored.empty());
    const ExperimentSpec now = load_spec(kFixtures + input);
    EXPECT_EQ(without_keys_added_later(dump_spec(now), stored), stored);
    const ExperimentSpec from_checkpoint = parse_spec(stored, dump + " (stored spec)");
    EXPECT_EQ(dump_spec(from_checkpoint), dump_spec(now));
    EXPECT_TRUE(check_resume_compatible(from_checkpoint, now, "ckpt-000000001.h5").empty());
  }
}

TEST(SpecFixtures, TheStoredDumpParsesToTheSameValues) {
  const ExperimentSpec s = parse_spec(read_file(kFixtures + "every_choice.dump.yaml"), "every_choice.dump.yaml");
  EXPECT_EQ(s.name, "every choice: quoted");
  EXPECT_EQ(s.seed, 123456789012u);
  EXPECT_EQ(s.device, Device::Cuda);
  EXPECT_TRUE(s.data.binarize);
  EXPECT_EQ(s.data.shuffle, Shuffle::Blocks);
  EXPECT_EQ(s.data.loader, Loader::Stream);
  EXPECT_EQ(s.data.shape, (std::vector<int>{3, 16, 16}));
  EXPECT_EQ(s.model.type, ModelType::Conv);
  ASSERT_EQ(s.model.conv_encoder.size(), 8u);
  EXPECT_EQ(s.model.conv_encoder[1].type, LayerType::GroupNorm);
  EXPECT_EQ(s.model.conv_encoder[1].groups, 4);
  EXPECT_EQ(s.model.conv_encoder[3].kernel, 3);  // the default, written out by the dump
  EXPECT_EQ(s.model.conv_encoder[7].type, LayerType::Relu);
  ASSERT_EQ(s.model.conv_decoder.size(), 4u);
  EXPECT_EQ(s.model.conv_decoder[2].shape, (std::vector<int>{16, 8, 8}));
  EXPECT_EQ(s.model.conv_decoder[3].type, LayerType::ConvTranspose2d);
  EXPECT_EQ(s.model.conv_decoder[3].output_padding, 1);
  EXPECT_TRUE(s.model.encoder.empty());
  EXPECT_EQ(s.model.likelihood, Likelihood::GaussianLearned);
  EXPECT_DOUBLE_EQ(s.model.sigma, 0.3);
  EXPECT_EQ(s.optim.type, OptimizerType::AdamW);
  EXPECT_EQ(s.optim.schedule, LrSchedule::Cosine);
  EXPECT_DOUBLE_EQ(s.optim.weight_decay, 0.01);
  EXPECT_EQ(s.train.on_nonfinite, NonfinitePolicy::Skip);
  EXPECT_EQ(s.train.cuda_graph, GraphMode::Off);
  EXPECT_EQ(s.dist.communicator, CommKind::Nccl);
  EXPECT_EQ(s.checkpoint.keep, 0);

  const ExperimentSpec o = parse_spec(read_file(kFixtures + "other_choices.dump.yaml"), "other_choices.dump.yaml");
  EXPECT_EQ(o.device, Device::Cpu);
  EXPECT_EQ(o.data.shuffle, Shuffle::Off);
  EXPECT_EQ(o.model.activation, Activation::Tanh);
  EXPECT_EQ(o.model.likelihood, Likelihood::GaussianFixed);
  EXPECT_EQ(o.train.cuda_graph, GraphMode::On);
  EXPECT_EQ(o.dist.communicator, CommKind::Mpi);
}

TEST(Resume, FixedKeysComeFromTheTable) {
  for (const char* key : {"seed", "data.shuffle", "data.binarize", "data.max_samples", "train.batch_size",
                          "train.drop_last", "model.type", "model.encoder", "model.decoder", "model.latent",
                          "model.activation", "model.likelihood.sigma", "model.likelihood.type"})
    EXPECT_TRUE(fixed_on_resume(key)) << key;
  for (const char* key :
       {"name", "device", "data.train", "data.loader", "data.cache_mb", "train.epochs", "train.max_steps", "optim.lr",
        "dist.communicator", "checkpoint.every", "eval.every", "output.dir", "no.such.key", "shuffle", "train"})
    EXPECT_FALSE(fixed_on_resume(key)) << key;
}

TEST(Resume, AFixedChangeIsRefusedAndAFreeOneListed) {
  const ExperimentSpec stored = load_spec(kFixtures + "other_choices.yaml");
  ExperimentSpec now = load_spec(kFixtures + "other_choices.yaml", {"train.epochs=12", "dist.communicator=auto"});
  const std::vector<std::string> changes = check_resume_compatible(stored, now, "ck.h5");
  EXPECT_EQ(changes, (std::vector<std::string>{"dist.communicator: mpi -> auto", "train.epochs: 10 -> 12"}));
  now = load_spec(kFixtures + "other_choices.yaml", {"model.likelihood={type: gaussian, variance: learned}"});
  try {
    check_resume_compatible(stored, now, "ck.h5");
    ADD_FAILURE() << "a changed likelihood was accepted on resume";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.likelihood.variance: cannot change on resume (the checkpoint ck.h5 "
                                         "has fixed, the spec says learned)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace elbo
