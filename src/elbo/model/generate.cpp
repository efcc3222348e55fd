// Sampling, reconstruction and interpolation in batches of the replica's size.
#include "elbo/model/generate.hpp"

#include <algorithm>
#include <span>

#include "elbo/data/sampler.hpp"

#include "elbo/util/error.hpp"

namespace elbo {

namespace {

constexpr int kRows = 256;  // rows per pass: bounds the activations' memory for any n

// Runs `pass(first, rows)` over [0, n) in chunks; the model is sized for one chunk.
template <class F>
void in_chunks(int n, F&& pass) {
  for (int first = 0; first < n; first += kRows) pass(first, std::min(kRows, n - first));
}

}  // namespace

std::vector<float> decode_means(const VaeLayout& layout, Backend<float>& be, const float* params, const float* z,
                                int rows) {
  ELBO_ASSERT(rows >= 1, "decode_means: no rows");
  const int L = layout.latent(), D = layout.input_dim();
  Vae<float> model(layout, be, std::min(rows, kRows));
  Buffer<float> zd(be, static_cast<size_t>(std::min(rows, kRows)) * L), mean(be, static_cast<size_t>(std::min(rows, kRows)) * D);
  std::vector<float> out(static_cast<size_t>(rows) * D);
  in_chunks(rows, [&](int first, int n) {
    be.upload(zd.data(), z + static_cast<size_t>(first) * L, static_cast<size_t>(n) * L);
    model.decode(params, zd.data(), n);
    layout.likelihood().mean(be, n, model.output(), mean.data());
    be.download(out.data() + static_cast<size_t>(first) * D, mean.data(), static_cast<size_t>(n) * D);
  });
  return out;
}

std::vector<float> sample_from_prior(const ModelLayout& layout, Backend<float>& be, const float* params, int n,
                                     uint64_t seed) {
  ELBO_ASSERT(n >= 1, "sample_from_prior: no samples");
  const int D = layout.input_dim(), cap = std::min(n, kRows);
  const size_t E = layout.eps_per_row();
  std::unique_ptr<Model<float>> model = make_model(layout, be, cap);
  Buffer<float> eps(be, static_cast<size_t>(cap) * E), mean(be, static_cast<size_t>(cap) * D);
  std::vector<float> out(static_cast<size_t>(n) * D);
  in_chunks(n, [&](int first, int rows) {
    // Keyed by the sample's index: the chunking does not change the draws.
    be.normal(seed, RngStream::Sample, 0, static_cast<uint64_t>(first), rows, static_cast<int>(E), eps.data());
    model->sample_prior(params, eps.data(), rows);
    layout.likelihood().mean(be, rows, model->output(), mean.data());
    be.download(out.data() + static_cast<size_t>(first) * D, mean.data(), static_cast<size_t>(rows) * D);
  });
  return out;
}

std::vector<float> posterior_means(const VaeLayout& layout, Backend<float>& be, const float* params, const float* x,
                                   int rows) {
  ELBO_ASSERT(rows >= 1, "posterior_means: no rows");
  const int L = layout.latent(), D = layout.input_dim();
  const int cap = std::min(rows, kRows);
  Vae<float> model(layout, be, cap);
  Buffer<float> xd(be, static_cast<size_t>(cap) * D);
  std::vector<float> mulv(static_cast<size_t>(cap) * 2 * L), mu(static_cast<size_t>(rows) * L);
  in_chunks(rows, [&](int first, int n) {
    be.upload(xd.data(), x + static_cast<size_t>(first) * D, static_cast<size_t>(n) * D);
    model.encode(params, xd.data(), n);
    be.download(mulv.data(), model.mulv(), static_cast<size_t>(n) * 2 * L);
    for (int r = 0; r < n; ++r)
      std::copy_n(mulv.data() + static_cast<size_t>(r) * 2 * L, L, mu.data() + static_cast<size_t>(first + r) * L);
  });
  return mu;
}

std::vector<float> reconstruct(const ModelLayout& layout, Backend<float>& be, const float* params, const float* x,
                               int rows) {
  if (const auto* vae = dynamic_cast<const VaeLayout*>(&layout)) {
    const std::vector<float> mu = posterior_means(*vae, be, params, x, rows);
    return decode_means(*vae, be, params, mu.data(), rows);
  }
  // Hierarchical: the posterior pass with eps = 0 takes z_l = mu_q(z_>l, x) in every group.
  ELBO_ASSERT(rows >= 1, "reconstruct: no rows");
  const int D = layout.input_dim(), cap = std::min(rows, kRows);
  std::unique_ptr<Model<float>> model = make_model(layout, be, cap);
  Buffer<float> xd(be, static_cast<size_t>(cap) * D), eps(be, static_cast<size_t>(cap) * layout.eps_per_row()),
      mean(be, static_cast<size_t>(cap) * D);
  be.fill(eps.data(), 0.0f, eps.size());
  std::vector<float> out(static_cast<size_t>(rows) * D);
  in_chunks(rows, [&](int first, int n) {
    be.upload(xd.data(), x + static_cast<size_t>(first) * D, static_cast<size_t>(n) * D);
    model->forward(params, xd.data(), eps.data(), n);
    layout.likelihood().mean(be, n, model->output(), mean.data());
    be.download(out.data() + static_cast<size_t>(first) * D, mean.data(), static_cast<size_t>(n) * D);
  });
  return out;
}

std::vector<float> gray_inputs(const data::ShardSet& set, const std::vector<int64_t>& items, const std::string& what) {
  for (int64_t i : items)
    if (i < 0 || i >= set.size())
      throw usage_error(what + " holds samples 0.." + std::to_string(set.size() - 1) + "; there is no sample " +
                        std::to_string(i));
  const int64_t D = set.sample_dim();
  std::vector<uint8_t> pixels(items.size() * D);
  set.gather(std::span<const int64_t>(items.data(), items.size()), pixels.data());
  std::vector<float> x(pixels.size());
  data::pixels_to_input<float>(pixels.data(), items.data(), static_cast<int64_t>(items.size()), D, false, 0, 0, x.data());
  return x;
}

std::vector<float> interpolate_latents(const float* mu_a, const float* mu_b, int latent, int steps) {
  ELBO_ASSERT(steps >= 2, "an interpolation needs at least its two ends");
  std::vector<float> z(static_cast<size_t>(steps) * latent);
  for (int s = 0; s < steps; ++s) {
    const float t = static_cast<float>(s) / static_cast<float>(steps - 1);
    for (int j = 0; j < latent; ++j) z[static_cast<size_t>(s) * latent + j] = (1.0f - t) * mu_a[j] + t * mu_b[j];
  }
  return z;
}

}  // namespace elbo
