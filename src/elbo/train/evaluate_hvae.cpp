// The hierarchical model's test-set evaluation: the same slices, keys and chunking as
// the Vae's (evaluate.cpp), with what differs for a top-down model. The Vae decodes K
// samples from one encoder pass; here every latent group's posterior depends on the
// groups sampled above it, so each importance sample is a full pass over its input
// (x repeated kc times per pass), with log w = -(rec + log q(z|x) - log p(z)) from
// the model's own log_ratio.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "elbo/data/sampler.hpp"
#include "elbo/train/evaluate.hpp"
#include "elbo/util/progress.hpp"

namespace elbo {

EvalResult evaluate_hierarchical(const HvaeLayout& layout, Backend<float>& be, const float* params,
                                 const data::ShardSet& set, Communicator& comm, const EvalOptions& opt) {
  const int64_t n = opt.max_samples > 0 ? std::min(opt.max_samples, set.size()) : set.size();
  const int D = layout.input_dim(), E = static_cast<int>(layout.eps_per_row()), G = layout.num_groups();
  const int K = opt.iw_samples;
  const data::Slice mine = data::rank_slice(n, comm.rank(), comm.size());
  detail::check_eval_memory(layout, be, comm, mine.count, opt);
  const EvalChunks chunks = eval_chunks(K, opt.batch_size, mine.count);
  const int kc = chunks.kc, xb = chunks.xb, cap = static_cast<int>(chunks.cap);

  Hvae<float> model(layout, be, cap);
  Buffer<float> x(be, static_cast<size_t>(cap) * D), eps(be, static_cast<size_t>(cap) * E);
  std::vector<uint8_t> pixels(static_cast<size_t>(xb) * D);
  std::vector<float> xh(static_cast<size_t>(xb) * D), rep(K > 0 ? static_cast<size_t>(cap) * D : 0);
  std::vector<float> rec(cap), kl(cap), lr(cap), klg(static_cast<size_t>(xb) * G);
  std::vector<std::vector<float>> q(static_cast<size_t>(G));  // per group: (rows, 2 numel) [mu_q | r_q]
  for (int l = 0; l < G; ++l) q[l].resize(static_cast<size_t>(xb) * 2 * layout.groups()[l].numel());
  std::vector<int64_t> idx(xb);
  detail::IwBound bound(static_cast<size_t>(xb));

  if (K > 1 && opt.max_seconds > 0) {
    // As the Vae's: time the bound's unit of work (a full pass of cap rows, the faster
    // of two) and refuse a bound that would run past the limit before spending it.
    double best = 0;
    if (mine.count > 0) {
      be.fill(x.data(), 0.0f, static_cast<size_t>(cap) * D);
      be.fill(eps.data(), 0.0f, static_cast<size_t>(cap) * E);
      best = std::numeric_limits<double>::infinity();
      for (int t = 0; t < 2; ++t) {
        const auto t0 = std::chrono::steady_clock::now();
        model.forward(params, x.data(), eps.data(), cap);
        be.synchronize();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    const double passes = static_cast<double>(mine.count) * (K - 1) / static_cast<double>(cap);
    const double secs = comm.allreduce_max(static_cast<int>(std::min(best * passes, 2e9)));
    if (secs > opt.max_seconds) {
      char work[64];
      std::snprintf(work, sizeof(work), "%.3g", static_cast<double>(n) * K);
      throw AgreedError(opt.error_kind,
                        opt.source + ": " + opt.iw_samples_name + ": the IWAE bound with k = " + std::to_string(K) +
                            " on " + std::to_string(n) + " samples runs " + work +
                            " full passes of the hierarchical model, estimated at " + detail::duration_words(secs) +
                            " (from a timed pass of " + std::to_string(cap) + " rows), over the limit of " +
                            detail::duration_words(opt.max_seconds) + "; lower " + opt.iw_samples_name +
                            (opt.max_samples_name.empty() ? "" : " or " + opt.max_samples_name) +
                            (opt.max_seconds_hint.empty() ? "" : ", or " + opt.max_seconds_hint));
    }
  }

  // sums: samples, rec, kl, iwae, then per group its KL, then per latent element sum
  // mu and sum mu^2 (groups in order, each numel elements).
  const size_t S = static_cast<size_t>(E);
  std::vector<double> sums(4 + static_cast<size_t>(G) + 2 * S, 0.0);
  double* const group_kl = sums.data() + 4;
  double* const mu_sum = group_kl + G;
  double* const mu_sq = mu_sum + S;
  const int64_t per_input = std::max(K, 1);
  Progress progress(comm.size() > 1 ? opt.progress_label + " (rank 0's share)" : opt.progress_label,
                    mine.count * per_input, opt.progress && comm.is_root());
  for (int64_t off = 0; off < mine.count; off += xb) {
    const int rows = static_cast<int>(std::min<int64_t>(xb, mine.count - off));
    const int64_t first = mine.begin + off;
    std::iota(idx.begin(), idx.begin() + rows, first);
    set.gather(std::span<const int64_t>(idx.data(), rows), pixels.data());
    data::pixels_to_input<float>(pixels.data(), idx.data(), rows, D, opt.binarize, opt.seed, 0xFFFFFFFFu, xh.data());
    be.upload(x.data(), xh.data(), static_cast<size_t>(rows) * D);

    // IW sample 0: the ELBO, its parts per group, and the posterior means.
    be.normal(opt.seed, RngStream::EvalEps, 0, static_cast<uint64_t>(first), rows, E, eps.data());
    model.forward(params, x.data(), eps.data(), rows);
    be.download(rec.data(), model.rec(), rows);
    be.download(kl.data(), model.kl(), rows);
    be.download(lr.data(), model.log_ratio(), rows);
    be.download(klg.data(), model.kl_groups(), static_cast<size_t>(rows) * G);
    for (int l = 0; l < G; ++l)
      be.download(q[l].data(), model.posterior(l), static_cast<size_t>(rows) * 2 * layout.groups()[l].numel());
    for (int r = 0; r < rows; ++r) {
      sums[1] += rec[r];
      sums[2] += kl[r];
      for (int l = 0; l < G; ++l) group_kl[l] += klg[static_cast<size_t>(r) * G + l];
      for (int l = 0; l < G; ++l) {
        const HvaeGroup& g = layout.groups()[l];
        const size_t m = g.numel();
        const float* mu = q[l].data() + static_cast<size_t>(r) * 2 * m;  // mu_q: the first zc channels
        for (size_t e = 0; e < m; ++e) {
          mu_sum[g.eps_offset + e] += mu[e];
          mu_sq[g.eps_offset + e] += double(mu[e]) * mu[e];
        }
      }
    }

    if (K > 0) {
      bound.start(rows, rec.data(), lr.data());
      for (int j = 0; j < kc; ++j)
        std::copy_n(xh.data(), static_cast<size_t>(rows) * D, rep.data() + static_cast<size_t>(j) * rows * D);
      if (K > 1) be.upload(x.data(), rep.data(), static_cast<size_t>(rows) * kc * D);
      for (int k0 = 1; k0 < K; k0 += kc) {
        const int kn = std::min(kc, K - k0);
        const int nr = rows * kn;
        // eps of IW sample k of item i keyed by (k, i): independent of ranks and chunks.
        for (int j = 0; j < kn; ++j)
          be.normal(opt.seed, RngStream::EvalEps, static_cast<uint32_t>(k0 + j), static_cast<uint64_t>(first), rows, E,
                    eps.data() + static_cast<size_t>(j) * rows * E);
        model.forward(params, x.data(), eps.data(), nr);
        be.download(rec.data(), model.rec(), nr);
        be.download(lr.data(), model.log_ratio(), nr);
        bound.add(rows, kn, rec.data(), lr.data());
        progress.update(off * per_input + static_cast<int64_t>(rows) * (k0 + kn));
      }
      bound.add_neg_bounds(rows, K, sums[3]);
    }
    sums[0] += rows;
    progress.update((off + rows) * per_input);
  }
  progress.finish();
  comm.allreduce_sum(sums.data(), sums.size());
  EvalResult out;
  out.samples = static_cast<int64_t>(sums[0]);
  const double denom = std::max(1.0, sums[0]);
  out.rec = sums[1] / denom;
  out.kl = sums[2] / denom;
  out.neg_elbo = out.rec + out.kl;
  out.iw_samples = K;
  out.iwae_nll = K > 0 ? sums[3] / denom : std::nan("");
  out.latent = E;
  if (layout.likelihood().is_dlm()) out.dim = D;  // 8-bit pixels: bits/dim too
  for (int l = 0; l < G; ++l) {
    const HvaeGroup& g = layout.groups()[l];
    int active = 0;
    for (size_t e = g.eps_offset; e < g.eps_offset + g.numel(); ++e) {
      const double mean = mu_sum[e] / denom;
      if (std::max(0.0, mu_sq[e] / denom - mean * mean) > kActiveUnitThreshold) ++active;
    }
    out.kl_groups.push_back(group_kl[l] / denom);
    out.active_groups.push_back(active);
    out.group_sizes.push_back(static_cast<int>(g.numel()));
    out.active_units += active;
  }
  return out;
}

}  // namespace elbo
