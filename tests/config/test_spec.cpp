// ExperimentSpec parsing: defaults, overrides, and errors that name file, line and key.
#include <gtest/gtest.h>

#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"
#include "spec_errors.hpp"

namespace elbo {
namespace {

using spec_test::error_of;
using spec_test::expect_error;

const char* kMinimal = "data:\n  train: /tmp/train\n";

TEST(Spec, DefaultsMatchThePyTorchExampleVae) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml");
  EXPECT_EQ(s.data.train, "/tmp/train");
  EXPECT_EQ(s.model.encoder, std::vector<int>{400});
  EXPECT_EQ(s.model.latent, 20);
  EXPECT_EQ(s.model.activation, Activation::Relu);
  EXPECT_EQ(s.model.likelihood, Likelihood::Bernoulli);
  EXPECT_EQ(s.optim.type, OptimizerType::Adam);
  EXPECT_DOUBLE_EQ(s.optim.lr, 1e-3);
  EXPECT_EQ(s.train.batch_size, 128);
  EXPECT_EQ(s.seed, 1u);
}

TEST(Spec, TrainingSafetyKeysHaveDefaultsAndRanges) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml");
  EXPECT_TRUE(s.train.deterministic);
  EXPECT_EQ(s.train.max_consecutive_skips, 10);
  EXPECT_DOUBLE_EQ(s.train.max_skip_fraction, 0.05);
  s = parse_spec(std::string(kMinimal) +
                     "train: {deterministic: false, max_consecutive_skips: 3, "
                     "max_skip_fraction: 0.5}\n",
                 "exp.yaml");
  EXPECT_FALSE(s.train.deterministic);
  EXPECT_EQ(s.train.max_consecutive_skips, 3);
  EXPECT_DOUBLE_EQ(s.train.max_skip_fraction, 0.5);
  EXPECT_NE(dump_spec(s).find("deterministic: false"), std::string::npos);
  EXPECT_DOUBLE_EQ(s.train.skip_threshold, 0.0);  // off
  EXPECT_EQ(s.train.accumulate, 1);
  s = parse_spec(std::string(kMinimal) + "train: {skip_threshold: 250.5, accumulate: 4}\n", "exp.yaml");
  EXPECT_DOUBLE_EQ(s.train.skip_threshold, 250.5);
  EXPECT_EQ(s.train.accumulate, 4);
  const ExperimentSpec again = parse_spec(dump_spec(s), "dumped.yaml");  // both survive the resolved dump
  EXPECT_DOUBLE_EQ(again.train.skip_threshold, 250.5);
  EXPECT_EQ(again.train.accumulate, 4);
  for (const char* bad :
       {"train: {max_consecutive_skips: 0}\n", "train: {max_skip_fraction: 1.5}\n", "train: {skip_threshold: -1}\n",
        "train: {skip_threshold: .inf}\n", "train: {accumulate: 0}\n", "train: {accumulate: 1.5}\n"}) {
    try {
      parse_spec(std::string(kMinimal) + bad, "exp.yaml");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Config) << e.what();
    }
  }
}

// optim.ema (0 = off, below 1) and train.patience (needs evaluations to count).
TEST(Spec, EmaAndPatienceHaveDefaultsRangesAndRoundTrip) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml");
  EXPECT_EQ(s.optim.ema, 0.0);
  EXPECT_EQ(s.train.patience, 0);
  s = parse_spec(std::string(kMinimal) + "  test: /tmp/test\n", "exp.yaml",
                 {"optim.ema=0.9999", "train.patience=3", "eval.every=100"});
  EXPECT_DOUBLE_EQ(s.optim.ema, 0.9999);
  EXPECT_EQ(s.train.patience, 3);
  const ExperimentSpec t = parse_spec(dump_spec(s), "dump");
  EXPECT_DOUBLE_EQ(t.optim.ema, 0.9999);
  EXPECT_EQ(t.train.patience, 3);
  expect_error(kMinimal, {"optim.ema=1"}, {"optim.ema: must be in [0, 1)"});
  expect_error(kMinimal, {"optim.ema=-0.5"}, {"optim.ema"});
  expect_error(kMinimal, {"train.patience=-1"}, {"train.patience: must be >= 0"});
  expect_error(kMinimal, {"train.patience=2"}, {"eval.every: must be > 0 with train.patience: 2"});
}

TEST(Spec, UnknownKeyNamesFileLineKeyAndValidKeys) {
  expect_error("data:\n  train: x\nmodel:\n  latnet: 3\n",
               {"exp.yaml:4", "model.latnet", "latent"});  // listed among the valid keys
}

TEST(Spec, WrongTypeAndRange) {
  expect_error("data:\n  train: x\ntrain:\n  batch_size: many\n",
               {"exp.yaml:4: train.batch_size: must be an integer, got 'many'"});
  expect_error("data:\n  train: x\nmodel:\n  latent: 0\n", {"model.latent: must be >= 1 (got 0)"});
  expect_error("data:\n  train: x\noptim:\n  beta2: 1.5\n", {"optim.beta2"});
  expect_error("data:\n  train: x\nmodel:\n  encoder: 400\n", {"model.encoder: must be a list"});
}

TEST(Spec, ChoicesAreListed) {
  expect_error("data:\n  train: x\nmodel:\n  activation: gelu\n",
               {"unknown value 'gelu'; valid choices: relu, tanh, softplus"});
  expect_error("data:\n  train: x\nmodel:\n  likelihood: {type: poisson}\n",
               {"model.likelihood.type", "bernoulli, gaussian"});
}

TEST(Spec, MissingRequiredAndMalformedYaml) {
  expect_error("model:\n  latent: 3\n", {"data.train: is required"});
  expect_error("data:\n  train: [unclosed\n", {"exp.yaml:", "invalid YAML"});
  EXPECT_THROW(load_spec("/nonexistent/spec.yaml"), Error);
}

TEST(Spec, SetOverridesAnyKeyAndIsNamedInErrors) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml",
                                {"optim.lr=3e-4", "model.encoder=[64, 32]", "model.likelihood.type=gaussian",
                                 "model.likelihood.variance=learned", "train.epochs=2"});
  EXPECT_DOUBLE_EQ(s.optim.lr, 3e-4);
  EXPECT_EQ(s.model.encoder, (std::vector<int>{64, 32}));
  EXPECT_EQ(s.model.likelihood, Likelihood::GaussianLearned);
  EXPECT_EQ(s.train.epochs, 2);
  expect_error(kMinimal, {"model.latent=0"}, {"--set model.latent"});
  expect_error(kMinimal, {"optim.lr"}, {"key.path=value"});
  expect_error(kMinimal, {"data.train.x=1"}, {"not a mapping"});
}

TEST(Spec, DuplicateKeysNameFileLineAndKey) {
  // yaml-cpp accepts them and lookups return the first: the second value would be lost.
  expect_error("data:\n  train: x\ntrain:\n  epochs: 2\n  batch_size: 64\n  epochs: 30\n",
               {"exp.yaml:6: train.epochs: duplicate key (also on line 4)"});
  expect_error("data:\n  train: x\noptim:\n  lr: 1e-3\ndata:\n  train: y\n",
               {"exp.yaml:5: data: duplicate key (also on line 1)"});
  expect_error("data:\n  train: x\nmodel:\n  likelihood: {type: gaussian, sigma: 1, sigma: 2}\n",
               {"model.likelihood.sigma: duplicate key"});
  expect_error(
      "data:\n  train: x\nmodel:\n  type: conv\n  encoder: [{type: linear, features: 4, features: 8}]\n"
      "  decoder: [flatten]\n",
      {"model.encoder[0].features: duplicate key"});
  // In a --set value, the argument is named instead of a line.
  expect_error(kMinimal, {"train={epochs: 2, epochs: 3}"},
               {"--set train={epochs: 2, epochs: 3}: train.epochs: duplicate key"});
  // The same key in different mappings is fine.
  EXPECT_EQ(parse_spec("data:\n  train: x\n  max_samples: 5\neval:\n  max_samples: 7\n", "exp.yaml").eval.max_samples,
            7);
}

TEST(Spec, SetErrorsNameTheArgumentNotTheFilesFirstLine) {
  // Values under a mapping given by --set have no line in the file.
  std::string e = error_of(kMinimal, {"train={batch_size: abc}"});
  EXPECT_NE(e.find("--set train={batch_size: abc}: train.batch_size: must be an integer, got 'abc'"), std::string::npos)
      << e;
  EXPECT_EQ(e.find("exp.yaml"), std::string::npos) << e;
  expect_error(kMinimal, {"train.batch_size=abc"},
               {"--set train.batch_size=abc: train.batch_size: must be an integer"});
  expect_error(kMinimal, {"model={latent: 0}"}, {"--set model={latent: 0}: model.latent: must be >= 1"});
  expect_error(kMinimal, {"model.likelihood={type: poisson}"},
               {"--set model.likelihood={type: poisson}: model.likelihood.type"});
  expect_error(kMinimal, {"model={type: conv, encoder: [{type: conv2d, channels: 0}], decoder: [flatten]}"},
               {"--set model={type: conv", "model.encoder[0].channels: must be >= 1"});
  // The nearest override wins; a later --set of the same key replaces an earlier one.
  expect_error(kMinimal, {"model={latent: 4}", "model.latent=-1"}, {"--set model.latent=-1: model.latent"});
  expect_error(kMinimal, {"optim.lr=abc", "optim.lr=-1"}, {"--set optim.lr=-1: optim.lr: must be > 0"});
  // A file error next to an unrelated --set still names the file's line.
  expect_error("data:\n  train: x\nmodel:\n  latent: 0\n", {"model.encoder=[8]"}, {"exp.yaml:4: model.latent"});
  // A key merely sharing a prefix is not covered: "optim.lr" does not set "optim.lr_x".
  expect_error("data:\n  train: x\noptim:\n  lrx: 1\n", {"optim.lr=0.1"}, {"exp.yaml:4: optim.lrx: unknown key"});
}

TEST(Spec, DumpRoundTrips) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml",
                                {"optim.type=adamw", "optim.schedule=cosine", "model.activation=tanh",
                                 "model.likelihood={type: gaussian, variance: fixed, sigma: 0.25}",
                                 "data.shape=[1, 28, 28]", "loss.kl_warmup_steps=100", "seed=7"});
  std::string text = dump_spec(s);
  ExperimentSpec t = parse_spec(text, "dump");
  EXPECT_EQ(dump_spec(t), text);
  EXPECT_EQ(t.model.likelihood, Likelihood::GaussianFixed);
  EXPECT_DOUBLE_EQ(t.model.sigma, 0.25);
  EXPECT_EQ(t.data.shape, (std::vector<int>{1, 28, 28}));
  EXPECT_EQ(t.seed, 7u);
  EXPECT_DOUBLE_EQ(t.optim.weight_decay, 0.01);  // AdamW's default decay
}

TEST(Spec, KlScheduleAndFreeBitsKeys) {
  ExperimentSpec d = parse_spec(kMinimal, "exp.yaml");
  EXPECT_EQ(d.loss.kl_schedule, KlSchedule::Linear);  // today's behaviour by default
  EXPECT_EQ(d.loss.free_bits, 0.0);
  EXPECT_EQ(d.loss.free_bits_group, 1);
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml",
                                {"loss.kl_schedule=cyclical", "loss.kl_cycles=3", "loss.kl_ramp=0.25",
                                 "loss.free_bits=0.5", "loss.free_bits_group=4"});
  EXPECT_EQ(s.loss.kl_schedule, KlSchedule::Cyclical);
  EXPECT_EQ(s.loss.kl_cycles, 3);
  EXPECT_DOUBLE_EQ(s.loss.kl_ramp, 0.25);
  EXPECT_DOUBLE_EQ(s.loss.free_bits, 0.5);
  EXPECT_EQ(s.loss.free_bits_group, 4);
  const std::string text = dump_spec(s);
  const ExperimentSpec t = parse_spec(text, "dump");
  EXPECT_EQ(dump_spec(t), text);
  EXPECT_EQ(t.loss.kl_schedule, KlSchedule::Cyclical);
  EXPECT_EQ(t.loss.kl_cycles, 3);
  EXPECT_DOUBLE_EQ(t.loss.kl_ramp, 0.25);
  EXPECT_DOUBLE_EQ(t.loss.free_bits, 0.5);
  EXPECT_EQ(t.loss.free_bits_group, 4);

  expect_error(kMinimal, {"loss.kl_schedule=cosine"}, {"loss.kl_schedule", "linear, cyclical"});
  expect_error(kMinimal, {"loss.kl_schedule=cyclical", "loss.kl_ramp=0"}, {"loss.kl_ramp"});
  expect_error(kMinimal, {"loss.kl_schedule=cyclical", "loss.kl_cycles=0"}, {"loss.kl_cycles"});
  expect_error(kMinimal, {"loss.free_bits=-0.1"}, {"loss.free_bits"});
  expect_error(kMinimal, {"loss.free_bits_group=0"}, {"loss.free_bits_group"});
  // The linear schedule's warm-up would be ignored under the cyclical one: refused.
  // Free bits need the whole batch's KL before the backward pass: no micro-batches.
  expect_error(kMinimal, {"loss.free_bits=0.5", "train.accumulate=2"}, {"train.accumulate", "loss.free_bits"});
  expect_error(kMinimal, {"loss.kl_schedule=cyclical", "loss.kl_warmup_steps=10"},
               {"loss.kl_warmup_steps", "cyclical"});
}

TEST(Spec, LossTypeSamplesAndDreg) {
  const ExperimentSpec d = parse_spec(kMinimal, "exp.yaml");
  EXPECT_EQ(d.loss.type, LossType::Elbo);
  EXPECT_EQ(d.loss.samples, 1);
  EXPECT_FALSE(d.loss.dreg);
  EXPECT_EQ(iw_samples(d.loss), 0);
  const ExperimentSpec s = parse_spec(kMinimal, "exp.yaml", {"loss.type=iwae", "loss.samples=5", "loss.dreg=true"});
  EXPECT_EQ(s.loss.type, LossType::Iwae);
  EXPECT_EQ(s.loss.samples, 5);
  EXPECT_TRUE(s.loss.dreg);
  EXPECT_EQ(iw_samples(s.loss), 5);
  const std::string text = dump_spec(s);
  EXPECT_EQ(dump_spec(parse_spec(text, "dump")), text);
  EXPECT_EQ(iw_samples(parse_spec(kMinimal, "exp.yaml", {"loss.type=iwae"}).loss), 1);

  expect_error(kMinimal, {"loss.type=vimco"}, {"loss.type", "elbo, iwae"});
  expect_error(kMinimal, {"loss.type=iwae", "loss.samples=0"}, {"loss.samples"});
  expect_error(kMinimal, {"loss.samples=5"}, {"loss.samples", "loss.type: iwae"});  // the ELBO takes one sample
  expect_error(kMinimal, {"loss.dreg=true"}, {"loss.dreg"});
  expect_error(kMinimal, {"loss.type=iwae", "loss.free_bits=0.5"}, {"loss.free_bits", "iwae"});
}

TEST(Spec, TensorboardIsOnByDefaultAndDumped) {
  EXPECT_TRUE(parse_spec(kMinimal, "exp.yaml").output.tensorboard);
  const ExperimentSpec s = parse_spec(kMinimal, "exp.yaml", {"output.tensorboard=false"});
  EXPECT_FALSE(s.output.tensorboard);
  EXPECT_FALSE(parse_spec(dump_spec(s), "dump").output.tensorboard);
  expect_error(std::string(kMinimal) + "output:\n  tensorboard: sometimes\n", {"output.tensorboard"});
}

}  // namespace
}  // namespace elbo

namespace elbo {
namespace {

const char* kHvae =
    "data:\n  train: x\n"
    "model:\n"
    "  type: hierarchical\n"
    "  width: 24\n"
    "  bottleneck: 8\n"
    "  activation: tanh\n"
    "  stages:\n"
    "    - {down: 1, blocks: 2, groups: 1, latent: 2}\n"
    "    - {down: 2, blocks: 1, groups: 3, latent: 4}\n"
    "    - {down: 7, groups: 2, resample: conv}\n";

TEST(SpecHierarchical, StagesParseDumpAndRoundTrip) {
  ExperimentSpec s = parse_spec(kHvae, "exp.yaml");
  EXPECT_EQ(s.model.type, ModelType::Hierarchical);
  EXPECT_EQ(s.model.width, 24);
  EXPECT_EQ(s.model.bottleneck, 8);
  EXPECT_EQ(s.model.activation, Activation::Tanh);
  ASSERT_EQ(s.model.stages.size(), 3u);
  EXPECT_EQ(s.model.stages[0], (StageSpec{1, 2, 1, 2}));
  EXPECT_EQ(s.model.stages[1], (StageSpec{2, 1, 3, 4}));
  EXPECT_EQ(s.model.stages[2], (StageSpec{7, 1, 2, 4, Resample::Conv}));  // blocks and latent take their defaults
  EXPECT_EQ(s.model.stages[0].resample, Resample::Pool);
  const std::string text = dump_spec(s);
  // resample is dumped where it is not the default only: specs written before it existed dump unchanged.
  EXPECT_EQ(text.find("resample: pool"), std::string::npos) << text;
  EXPECT_NE(text.find("resample: conv"), std::string::npos) << text;
  EXPECT_NE(text.find("stages"), std::string::npos) << text;
  EXPECT_EQ(text.find("latent: 20"), std::string::npos) << "model.latent means nothing here:\n" << text;
  EXPECT_EQ(text.find("encoder"), std::string::npos) << text;
  const ExperimentSpec t = parse_spec(text, "dump");
  EXPECT_EQ(dump_spec(t), text);
  EXPECT_EQ(t.model.stages, s.model.stages);
  EXPECT_TRUE(fixed_on_resume("model.stages"));
  EXPECT_TRUE(fixed_on_resume("model.width"));
  EXPECT_TRUE(fixed_on_resume("model.bottleneck"));
}

TEST(SpecHierarchical, OtherModelTypesNeitherTakeNorDumpItsKeys) {
  const std::string mlp = dump_spec(parse_spec("data:\n  train: x\n", "exp.yaml"));
  EXPECT_EQ(mlp.find("stages"), std::string::npos) << mlp;
  EXPECT_EQ(mlp.find("width"), std::string::npos) << mlp;
  EXPECT_EQ(mlp.find("bottleneck"), std::string::npos) << mlp;
  EXPECT_NE(mlp.find("latent: 20"), std::string::npos) << mlp;
  expect_error("data:\n  train: x\nmodel:\n  width: 8\n",
               {"exp.yaml:4: model.width: applies to model.type hierarchical only (this model is mlp)"});
}

TEST(SpecHierarchical, ErrorsNameTheStageAndKey) {
  const std::string head = "data:\n  train: x\nmodel:\n  type: hierarchical\n";
  expect_error(head + "  stages:\n    - {down: 1}\n    - {down: 0, groups: 1}\n",
               {"exp.yaml:7: model.stages[1].down: must be >= 1"});
  expect_error(head + "  stages:\n    - {down: 1, latent: 0}\n", {"model.stages[0].latent: must be >= 1"});
  expect_error(head + "  stages:\n    - {down: 1, grups: 2}\n",
               {"model.stages[0].grups: unknown key; valid keys here: down, blocks, groups, latent, resample, "
                "dec_blocks, width, bottleneck"});
  expect_error(head + "  stages:\n    - {down: 2, resample: bilinear}\n", {"model.stages[0].resample", "pool"});
  expect_error(head + "  stages:\n    - {down: 1, groups: 0}\n    - {down: 2, groups: 0}\n",
               {"model.stages: has no latent group"});
  expect_error(head + "  width: 8\n", {"model.stages: is required for model.type hierarchical"});
  expect_error(head + "  latent: 8\n  stages: [{groups: 1}]\n",
               {"model.latent: a hierarchical model's latent channels are model.stages[i].latent"});
  expect_error(head + "  encoder: [400]\n  stages: [{groups: 1}]\n",
               {"model.encoder: a hierarchical model is described by"});
  expect_error(head + "  stages: [{groups: 1}]\n  bottleneck: 0\n", {"model.bottleneck: must be >= 1"});
  // The per-stage keys: an explicit 0 width is an error, not "model.width".
  expect_error(head + "  stages:\n    - {groups: 1}\n    - {down: 2, width: 0}\n",
               {"exp.yaml:7: model.stages[1].width: must be >= 1 (channels of the stream at this resolution; "
                "leave it out for model.width) (got 0)"});
  expect_error(head + "  stages:\n    - {groups: 1, bottleneck: -2}\n",
               {"exp.yaml:6: model.stages[0].bottleneck: must be >= 1"});
  expect_error(head + "  stages:\n    - {groups: 1}\n    - {down: 2, dec_blocks: -1}\n",
               {"exp.yaml:7: model.stages[1].dec_blocks: must be >= 0 (decoder residual blocks after the groups) "
                "(got -1)"});
  expect_error(head + "  stages:\n    - {groups: 1, width: wide}\n",
               {"model.stages[0].width: must be an integer, got 'wide'"});
  // dec_blocks alone adds no latent group.
  expect_error(head + "  stages:\n    - {groups: 0, dec_blocks: 2}\n", {"model.stages: has no latent group"});
}

// Per-stage widths and bottlenecks, decoder-only blocks, and stages without groups
// with or without a latent key; the dump writes the new keys only where given, so a
// spec without them keeps its text (run directories and checkpoints store it).
TEST(SpecHierarchical, PerStageWidthsAndDecoderBlocks) {
  const std::string text =
      "data:\n  train: x\n"
      "model:\n"
      "  type: hierarchical\n"
      "  width: 24\n"
      "  bottleneck: 8\n"
      "  stages:\n"
      "    - {down: 1, blocks: 1, groups: 0, dec_blocks: 2, width: 16, bottleneck: 4}\n"
      "    - {down: 2, blocks: 1, groups: 0, latent: 3, dec_blocks: 1}\n"
      "    - {down: 2, groups: 2, latent: 5, width: 64, dec_blocks: 0}\n"
      "    - {down: 7, groups: 1, bottleneck: 32}\n";
  const ExperimentSpec s = parse_spec(text, "exp.yaml");
  const ModelSpec& m = s.model;
  const Resample P = Resample::Pool;
  ASSERT_EQ(m.stages.size(), 4u);
  EXPECT_EQ(m.stages[0], (StageSpec{1, 1, 0, 4, P, 2, 16, 4}));
  EXPECT_EQ(m.stages[1], (StageSpec{2, 1, 0, 3, P, 1, 0, 0}));
  EXPECT_EQ(m.stages[2], (StageSpec{2, 1, 2, 5, P, 0, 64, 0}));
  EXPECT_EQ(m.stages[3], (StageSpec{7, 1, 1, 4, P, 0, 0, 32}));
  EXPECT_EQ(m.stage_width(0), 16);
  EXPECT_EQ(m.stage_width(1), 24);  // model.width
  EXPECT_EQ(m.stage_width(2), 64);
  EXPECT_EQ(m.stage_bottleneck(0), 4);
  EXPECT_EQ(m.stage_bottleneck(2), 8);  // model.bottleneck
  EXPECT_EQ(m.stage_bottleneck(3), 32);
  const std::string dump = dump_spec(s);
  EXPECT_NE(dump.find("{down: 1, blocks: 1, groups: 0, latent: 4, dec_blocks: 2, width: 16, bottleneck: 4}"),
            std::string::npos)
      << dump;
  EXPECT_NE(dump.find("{down: 2, blocks: 1, groups: 2, latent: 5, width: 64}"), std::string::npos) << dump;
  EXPECT_NE(dump.find("{down: 7, blocks: 1, groups: 1, latent: 4, bottleneck: 32}"), std::string::npos) << dump;
  const ExperimentSpec t = parse_spec(dump, "dump");
  EXPECT_EQ(t.model.stages, m.stages);
  EXPECT_EQ(dump_spec(t), dump);
  // Without the keys: none of them in the dump, the stages as before.
  const std::string old = dump_spec(parse_spec(kHvae, "exp.yaml"));
  EXPECT_EQ(old.find("dec_blocks"), std::string::npos) << old;
  EXPECT_NE(old.find("{down: 2, blocks: 1, groups: 3, latent: 4}"), std::string::npos) << old;
  EXPECT_EQ(old.find("width"), old.rfind("width")) << "only model.width:\n" << old;
  // --set reaches a stage's keys through the list as a whole.
  const ExperimentSpec o = parse_spec(
      text, "exp.yaml", {"model.stages=[{groups: 1, width: 12}, {down: 2, groups: 0, dec_blocks: 3, bottleneck: 2}]"});
  EXPECT_EQ(o.model.stages[0], (StageSpec{1, 1, 1, 4, P, 0, 12, 0}));
  EXPECT_EQ(o.model.stages[1], (StageSpec{2, 1, 0, 4, P, 3, 0, 2}));
}

}  // namespace
}  // namespace elbo
