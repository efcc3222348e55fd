// What a trained model produces for people to look at: decoded samples from the
// prior, reconstructions, latent interpolations. Everything returned is E[x|z] (the
// Bernoulli probabilities or the Gaussian mean) on the host, one row per image.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/model/vae.hpp"

namespace elbo {

// n decoded samples from the prior, eps ~ N(0, I) keyed by (seed, RngStream::Sample,
// item): z = eps for a Vae, the top-down pass for a hierarchical model: (n, D).
std::vector<float> sample_from_prior(const ModelLayout& layout, Backend<float>& be, const float* params, int n,
                                     uint64_t seed);

// Posterior means mu(x) for host inputs x (rows, D): (rows, L).
std::vector<float> posterior_means(const VaeLayout& layout, Backend<float>& be, const float* params, const float* x,
                                   int rows);

// E[x | z] for host latents z (rows, L): (rows, D).
std::vector<float> decode_means(const VaeLayout& layout, Backend<float>& be, const float* params, const float* z,
                                int rows);

// Reconstructions E[x | z = mu(x)] (the posterior mean, no sampling noise; for a
// hierarchical model each group's posterior mean given the groups above): (rows, D).
std::vector<float> reconstruct(const ModelLayout& layout, Backend<float>& be, const float* params, const float* x,
                               int rows);

// Dataset items of `set` as gray inputs in [0, 1], no binarization (pictures show the
// data as it is): (items, D). An item outside the split is a Usage error naming `what`.
std::vector<float> gray_inputs(const data::ShardSet& set, const std::vector<int64_t>& items, const std::string& what);

// `steps` latents from mu(a) to mu(b) inclusive, on the straight line: (steps, L).
std::vector<float> interpolate_latents(const float* mu_a, const float* mu_b, int latent, int steps);

}  // namespace elbo
