// ExperimentSpec parsing: defaults, overrides, and errors that name file, line and key.
#include <gtest/gtest.h>

#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"

namespace elbo {
namespace {

const char* kMinimal = "data:\n  train: /tmp/train\n";

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_spec(yaml, "exp.yaml", overrides);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config);
    return e.what();
  }
  ADD_FAILURE() << "expected a config error for:\n" << yaml;
  return "";
}

TEST(Spec, DefaultsMatchThePyTorchExampleVae) {
  ExperimentSpec s = parse_spec(kMinimal, "exp.yaml");
  EXPECT_EQ(s.data.train, "/tmp/train");
  EXPECT_EQ(s.model.encoder, std::vector<int>{400});
  EXPECT_EQ(s.model.latent, 20);
  EXPECT_EQ(s.model.activation, Activation::Relu);
  EXPECT_EQ(s.model.likelihood, Likelihood::Bernoulli);
  EXPECT_EQ(s.optim.type, "adam");
  EXPECT_DOUBLE_EQ(s.optim.lr, 1e-3);
  EXPECT_EQ(s.train.batch_size, 128);
  EXPECT_EQ(s.seed, 1u);
}

TEST(Spec, UnknownKeyNamesFileLineKeyAndValidKeys) {
  std::string e = error_of("data:\n  train: x\nmodel:\n  latnet: 3\n");
  EXPECT_NE(e.find("exp.yaml:4"), std::string::npos) << e;
  EXPECT_NE(e.find("model.latnet"), std::string::npos) << e;
  EXPECT_NE(e.find("latent"), std::string::npos) << e;  // listed among the valid keys
}

TEST(Spec, WrongTypeAndRange) {
  std::string e = error_of("data:\n  train: x\ntrain:\n  batch_size: many\n");
  EXPECT_NE(e.find("exp.yaml:4: train.batch_size: must be an integer, got 'many'"), std::string::npos) << e;
  e = error_of("data:\n  train: x\nmodel:\n  latent: 0\n");
  EXPECT_NE(e.find("model.latent: must be >= 1 (got 0)"), std::string::npos) << e;
  e = error_of("data:\n  train: x\noptim:\n  beta2: 1.5\n");
  EXPECT_NE(e.find("optim.beta2"), std::string::npos) << e;
  e = error_of("data:\n  train: x\nmodel:\n  encoder: 400\n");
  EXPECT_NE(e.find("model.encoder: must be a list"), std::string::npos) << e;
}

TEST(Spec, ChoicesAreListed) {
  std::string e = error_of("data:\n  train: x\nmodel:\n  activation: gelu\n");
  EXPECT_NE(e.find("unknown value 'gelu'; valid choices: relu, tanh, softplus"), std::string::npos) << e;
  e = error_of("data:\n  train: x\nmodel:\n  likelihood: {type: poisson}\n");
  EXPECT_NE(e.find("model.likelihood.type"), std::string::npos) << e;
  EXPECT_NE(e.find("bernoulli, gaussian"), std::string::npos) << e;
}

TEST(Spec, MissingRequiredAndMalformedYaml) {
  std::string e = error_of("model:\n  latent: 3\n");
  EXPECT_NE(e.find("data.train: is required"), std::string::npos) << e;
  e = error_of("data:\n  train: [unclosed\n");
  EXPECT_NE(e.find("exp.yaml:"), std::string::npos) << e;
  EXPECT_NE(e.find("invalid YAML"), std::string::npos) << e;
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
  std::string e = error_of(kMinimal, {"model.latent=0"});
  EXPECT_NE(e.find("--set model.latent"), std::string::npos) << e;
  e = error_of(kMinimal, {"optim.lr"});
  EXPECT_NE(e.find("key.path=value"), std::string::npos) << e;
  e = error_of(kMinimal, {"data.train.x=1"});
  EXPECT_NE(e.find("not a mapping"), std::string::npos) << e;
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

}  // namespace
}  // namespace elbo
