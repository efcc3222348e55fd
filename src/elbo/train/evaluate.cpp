// Evaluation loop: each rank takes a contiguous slice of the test set; sums are
// reduced at the end. eps is keyed by (seed, IW sample, dataset index), so every
// figure is the same for any number of ranks.
#include "elbo/train/evaluate.hpp"

#include <algorithm>
#include <cmath>
#include <span>
#include <cstdio>
#include <numeric>
#include <vector>

#include "elbo/data/sampler.hpp"
#include "elbo/util/progress.hpp"

namespace elbo {

EvalResult evaluate(const VaeLayout& layout, Backend<float>& be, const float* params,
                    const data::ShardSet& set, Communicator& comm, const EvalOptions& opt) {
  const int64_t n = opt.max_samples > 0 ? std::min(opt.max_samples, set.size()) : set.size();
  const int D = layout.input_dim(), L = layout.latent();
  const int K = opt.iw_samples;
  const data::Slice mine = data::rank_slice(n, comm.rank(), comm.size());
  // Work per pass is bounded by batch_size rows through the network. The IWAE bound
  // needs K decoder passes per input; the encoder runs once per input and its
  // posterior is repeated for a chunk of kc samples, so K = 5000 costs K/kc passes of
  // xb * kc rows, never K copies of the activations.
  const int64_t W = std::max<int64_t>(1, opt.batch_size);
  const int kc = K > 0 ? static_cast<int>(std::min<int64_t>(K, W)) : 1;
  const int xb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(W / kc, std::max<int64_t>(1, mine.count))));
  const int cap = xb * kc;

  Vae<float> model(layout, be, cap);
  Buffer<float> x(be, static_cast<size_t>(xb) * D), eps(be, static_cast<size_t>(cap) * L);
  // Repeated inputs and posteriors for the IW chunks: block j holds sample k0 + j for every row.
  Buffer<float> x_rep, mulv_rep, z, kl_buf, rec_buf, ratio;
  if (K > 0) {
    x_rep = Buffer<float>(be, static_cast<size_t>(cap) * D);
    mulv_rep = Buffer<float>(be, static_cast<size_t>(cap) * 2 * L);
    z = Buffer<float>(be, static_cast<size_t>(cap) * L);
    kl_buf = Buffer<float>(be, static_cast<size_t>(cap));
    rec_buf = Buffer<float>(be, static_cast<size_t>(cap));
    ratio = Buffer<float>(be, static_cast<size_t>(cap));
  }
  std::vector<uint8_t> pixels(static_cast<size_t>(xb) * D);
  std::vector<float> xh(static_cast<size_t>(xb) * D), rep(static_cast<size_t>(cap) * std::max(D, 2 * L));
  std::vector<float> rec(cap), kl(xb), lr(cap), mulv(static_cast<size_t>(xb) * 2 * L);
  std::vector<int64_t> idx(xb);
  std::vector<double> logw(static_cast<size_t>(xb) * std::max(K, 1));
  const auto& spec = layout.spec();

  // sums: samples, rec, kl, iwae, then per latent unit sum mu_j and sum mu_j^2
  std::vector<double> sums(4 + 2 * static_cast<size_t>(L), 0.0);
  // Rank 0 shows its own share; the ranks' shares differ by at most one sample.
  Progress progress(comm.size() > 1 ? opt.progress_label + " (rank 0's share)" : opt.progress_label, mine.count,
                    opt.progress && comm.is_root());
  for (int64_t off = 0; off < mine.count; off += xb) {
    const int rows = static_cast<int>(std::min<int64_t>(xb, mine.count - off));
    const int64_t first = mine.begin + off;
    std::iota(idx.begin(), idx.begin() + rows, first);
    set.gather(std::span<const int64_t>(idx.data(), rows), pixels.data());
    data::pixels_to_input<float>(pixels.data(), idx.data(), rows, D, opt.binarize, opt.seed, 0xFFFFFFFFu, xh.data());
    be.upload(x.data(), xh.data(), static_cast<size_t>(rows) * D);

    // One posterior sample per input (IW sample 0) for the ELBO and its parts.
    be.normal(opt.seed, RngStream::EvalEps, 0, static_cast<uint64_t>(first), rows, L, eps.data());
    model.forward(params, x.data(), eps.data(), rows);
    be.download(rec.data(), model.rec(), rows);
    be.download(kl.data(), model.kl(), rows);
    be.download(mulv.data(), model.mulv(), static_cast<size_t>(rows) * 2 * L);
    for (int r = 0; r < rows; ++r) {
      sums[1] += rec[r];
      sums[2] += kl[r];
      for (int j = 0; j < L; ++j) {
        const double mu = mulv[static_cast<size_t>(r) * 2 * L + j];
        sums[4 + j] += mu;
        sums[4 + L + j] += mu * mu;
      }
    }

    if (K > 0) {
      // Sample 0 is the forward pass above; the chunks decode samples 1..K-1.
      be.posterior_log_ratio(rows, L, model.mulv(), eps.data(), model.z(), ratio.data());
      be.download(lr.data(), ratio.data(), rows);
      for (int r = 0; r < rows; ++r) logw[static_cast<size_t>(r) * K] = -double(rec[r]) - double(lr[r]);
      const size_t n_rep = static_cast<size_t>(rows) * kc;
      for (int j = 0; j < kc; ++j) std::copy_n(xh.data(), static_cast<size_t>(rows) * D, rep.data() + j * rows * D);
      be.upload(x_rep.data(), rep.data(), n_rep * D);
      for (int j = 0; j < kc; ++j)
        std::copy_n(mulv.data(), static_cast<size_t>(rows) * 2 * L, rep.data() + j * rows * 2 * L);
      be.upload(mulv_rep.data(), rep.data(), n_rep * 2 * L);
      for (int k0 = 1; k0 < K; k0 += kc) {
        const int kn = std::min(kc, K - k0);
        const int nr = rows * kn;
        // eps for IW sample k of dataset item i is keyed by (k, i) alone: the bound does
        // not depend on the world size, the batch size or the chunking.
        for (int j = 0; j < kn; ++j)
          be.normal(opt.seed, RngStream::EvalEps, static_cast<uint32_t>(k0 + j), static_cast<uint64_t>(first), rows,
                    L, eps.data() + static_cast<size_t>(j) * rows * L);
        be.posterior_forward(nr, L, mulv_rep.data(), eps.data(), z.data(), kl_buf.data());
        model.decode(params, z.data(), nr);
        be.likelihood_forward(spec.likelihood, static_cast<float>(spec.sigma), nr, D, model.output(), x_rep.data(),
                              rec_buf.data());
        be.posterior_log_ratio(nr, L, mulv_rep.data(), eps.data(), z.data(), ratio.data());
        be.download(rec.data(), rec_buf.data(), nr);
        be.download(lr.data(), ratio.data(), nr);
        for (int j = 0; j < kn; ++j)
          for (int r = 0; r < rows; ++r)
            logw[static_cast<size_t>(r) * K + k0 + j] =
                -double(rec[static_cast<size_t>(j) * rows + r]) - double(lr[static_cast<size_t>(j) * rows + r]);
      }
      for (int r = 0; r < rows; ++r) {
        const double* w = &logw[static_cast<size_t>(r) * K];
        double m = *std::max_element(w, w + K);
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += std::exp(w[k] - m);
        sums[3] += -(m + std::log(acc) - std::log(static_cast<double>(K)));
      }
    }
    sums[0] += rows;
    progress.update(off + rows);
  }
  progress.finish();
  comm.allreduce_sum(sums.data(), sums.size());
  EvalResult out;
  out.samples = static_cast<int64_t>(sums[0]);
  double denom = std::max(1.0, sums[0]);
  out.rec = sums[1] / denom;
  out.kl = sums[2] / denom;
  out.neg_elbo = out.rec + out.kl;
  out.iw_samples = K;
  out.iwae_nll = K > 0 ? sums[3] / denom : std::nan("");
  out.latent = L;
  for (int j = 0; j < L; ++j) {
    const double mean = sums[4 + j] / denom;
    const double var = std::max(0.0, sums[4 + L + j] / denom - mean * mean);
    if (var > kActiveUnitThreshold) ++out.active_units;
  }
  return out;
}

std::string format_eval(const EvalResult& r) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "test -ELBO %.4f nats (rec %.4f, KL %.4f)", r.neg_elbo, r.rec, r.kl);
  std::string s = buf;
  if (r.iw_samples > 0) {
    std::snprintf(buf, sizeof(buf), " | IWAE(k=%d) NLL %.4f nats", r.iw_samples, r.iwae_nll);
    s += buf;
  }
  return s + " | active units " + std::to_string(r.active_units) + "/" + std::to_string(r.latent) + " | " +
         std::to_string(r.samples) + " samples";
}

std::string eval_yaml(const EvalResult& r, const std::string& model, const std::string& data) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "model: %s\ndata: %s\nsamples: %lld\nneg_elbo: %.6f\nrec: %.6f\nkl: %.6f\nactive_units: %d\n"
                "latent: %d\niw_samples: %d\n",
                model.c_str(), data.c_str(), static_cast<long long>(r.samples), r.neg_elbo, r.rec, r.kl,
                r.active_units, r.latent, r.iw_samples);
  std::string s = buf;
  if (r.iw_samples > 0) {
    std::snprintf(buf, sizeof(buf), "iwae_nll: %.6f\n", r.iwae_nll);
    s += buf;
  }
  return s;
}

}  // namespace elbo
