// model.likelihood's keys for the discretized logistic mixture: parse, defaults, the
// dump (a likelihood writes only its own keys), resume rules and errors.
#include <gtest/gtest.h>

#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"
#include "spec_errors.hpp"

namespace elbo {
namespace {

using spec_test::expect_error;

const std::string kData = "data:\n  train: /tmp/train\n";

TEST(LikelihoodSpec, DiscretizedLogisticMixtureWithComponents) {
  ExperimentSpec s =
      parse_spec(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, components: 5}\n", "exp.yaml");
  EXPECT_EQ(s.model.likelihood, Likelihood::DiscretizedLogisticMixture);
  EXPECT_EQ(s.model.components, 5);
  // A bare type takes PixelCNN++'s 10 components.
  s = parse_spec(kData + "model:\n  likelihood: discretized_logistic_mixture\n", "exp.yaml");
  EXPECT_EQ(s.model.components, 10);
  s = parse_spec(kData, "exp.yaml", {"model.likelihood={type: discretized_logistic_mixture, components: 3}"});
  EXPECT_EQ(s.model.components, 3);
  EXPECT_EQ(std::string(choice_name(s.model.likelihood)), "discretized_logistic_mixture");  // model files store it
}

TEST(LikelihoodSpec, DumpWritesEachLikelihoodsOwnKeys) {
  ExperimentSpec s =
      parse_spec(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, components: 7}\n", "exp.yaml");
  const std::string text = dump_spec(s);
  EXPECT_NE(text.find("likelihood:\n    type: discretized_logistic_mixture\n    components: 7\n"), std::string::npos)
      << text;
  EXPECT_EQ(text.find("sigma"), std::string::npos) << text;
  EXPECT_EQ(text.find("variance"), std::string::npos) << text;
  const ExperimentSpec t = parse_spec(text, "dump");
  EXPECT_EQ(t.model.likelihood, Likelihood::DiscretizedLogisticMixture);
  EXPECT_EQ(t.model.components, 7);
  EXPECT_EQ(dump_spec(t), text);
  // The Bernoulli and Gaussian dumps are as before: type, variance, sigma, no components.
  const std::string bern = dump_spec(parse_spec(kData, "exp.yaml"));
  EXPECT_NE(bern.find("likelihood:\n    type: bernoulli\n    variance: fixed\n    sigma: 1\n"), std::string::npos)
      << bern;
  EXPECT_EQ(bern.find("components"), std::string::npos) << bern;
}

TEST(LikelihoodSpec, ErrorsNameTheKey) {
  expect_error(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, components: 0}\n",
               {"exp.yaml:4: model.likelihood.components: must be in [1, 256] (mixture components) (got 0)"});
  expect_error(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, components: many}\n",
               {"model.likelihood.components: must be an integer"});
  expect_error(kData + "model:\n  likelihood: {type: bernoulli, components: 4}\n",
               {"model.likelihood.components: applies to type discretized_logistic_mixture only"});
  expect_error(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, sigma: 0.5}\n",
               {"model.likelihood.sigma: applies to the gaussian likelihood, not discretized_logistic_mixture"});
  expect_error(kData + "model:\n  likelihood: {type: discretized_logistic_mixture, variance: learned}\n",
               {"model.likelihood.variance: applies to the gaussian likelihood"});
  expect_error(kData + "model:\n  likelihood: {type: logistic}\n",
               {"valid choices: bernoulli, gaussian, discretized_logistic_mixture"});
  // Binarized pixels are two edge bins: the Bernoulli likelihood's data.
  expect_error("data:\n  train: x\n  binarize: true\nmodel:\n  likelihood: {type: discretized_logistic_mixture}\n",
               {"model.likelihood.type: discretized_logistic_mixture models the 256 values of 8-bit pixels, but "
                "data.binarize is true"});
  expect_error("data:\n  train: x\n  binarize: true\nmodel:\n  likelihood: discretized_logistic_mixture\n",
               {"model.likelihood: discretized_logistic_mixture models the 256 values"});
}

TEST(LikelihoodSpec, ComponentsCannotChangeOnResume) {
  EXPECT_TRUE(fixed_on_resume("model.likelihood.components"));
  EXPECT_TRUE(fixed_on_resume("model.likelihood.type"));
}

}  // namespace
}  // namespace elbo
