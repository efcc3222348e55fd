// Evaluation loop: each rank takes a contiguous slice of the test set; sums are
// reduced at the end. eps is keyed by (seed, IW sample, dataset index).
#include "elbo/train/evaluate.hpp"

#include <algorithm>
#include <cmath>
#include <span>
#include <cstdio>
#include <numeric>
#include <vector>

#include "elbo/data/sampler.hpp"

namespace elbo {

EvalResult evaluate(const VaeLayout& layout, Backend<float>& be, const float* params,
                    const data::ShardSet& set, Communicator& comm, const EvalOptions& opt) {
  const int64_t n = set.size();
  const int D = layout.input_dim(), L = layout.latent();
  const int K = opt.iw_samples;
  const data::Slice mine = data::rank_slice(n, comm.rank(), comm.size());
  const int rows_max = static_cast<int>(std::max<int64_t>(1, std::min(opt.batch_size, std::max<int64_t>(1, mine.count))));

  Vae<float> model(layout, be, rows_max);
  Buffer<float> x(be, static_cast<size_t>(rows_max) * D), eps(be, static_cast<size_t>(rows_max) * L);
  Buffer<float> ratio(be, static_cast<size_t>(rows_max));
  std::vector<uint8_t> pixels(static_cast<size_t>(rows_max) * D);
  std::vector<float> xh(static_cast<size_t>(rows_max) * D), rec(rows_max), kl(rows_max), lr(rows_max);
  std::vector<int64_t> idx(rows_max);
  std::vector<double> logw(static_cast<size_t>(rows_max) * std::max(K, 1));

  // sums: samples, rec, kl, iwae
  double sums[4] = {0, 0, 0, 0};
  for (int64_t off = 0; off < mine.count; off += rows_max) {
    const int rows = static_cast<int>(std::min<int64_t>(rows_max, mine.count - off));
    const int64_t first = mine.begin + off;
    std::iota(idx.begin(), idx.begin() + rows, first);
    set.gather(std::span<const int64_t>(idx.data(), rows), pixels.data());
    data::pixels_to_input<float>(pixels.data(), idx.data(), rows, D, opt.binarize, opt.seed, 0xFFFFFFFFu, xh.data());
    be.upload(x.data(), xh.data(), static_cast<size_t>(rows) * D);
    for (int k = 0; k < std::max(K, 1); ++k) {
      be.normal(opt.seed, RngStream::EvalEps, static_cast<uint32_t>(k), static_cast<uint64_t>(first), rows, L, eps.data());
      model.forward(params, x.data(), eps.data(), rows);
      be.download(rec.data(), model.rec(), rows);
      if (k == 0) {
        be.download(kl.data(), model.kl(), rows);
        for (int r = 0; r < rows; ++r) {
          sums[1] += rec[r];
          sums[2] += kl[r];
        }
      }
      if (K > 0) {
        be.posterior_log_ratio(rows, L, model.mulv(), eps.data(), model.z(), ratio.data());
        be.download(lr.data(), ratio.data(), rows);
        for (int r = 0; r < rows; ++r) logw[static_cast<size_t>(r) * K + k] = -double(rec[r]) - double(lr[r]);
      }
    }
    if (K > 0) {
      for (int r = 0; r < rows; ++r) {
        const double* w = &logw[static_cast<size_t>(r) * K];
        double m = *std::max_element(w, w + K);
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += std::exp(w[k] - m);
        sums[3] += -(m + std::log(acc) - std::log(static_cast<double>(K)));
      }
    }
    sums[0] += rows;
  }
  comm.allreduce_sum(sums, 4);
  EvalResult out;
  out.samples = static_cast<int64_t>(sums[0]);
  double denom = std::max(1.0, sums[0]);
  out.rec = sums[1] / denom;
  out.kl = sums[2] / denom;
  out.neg_elbo = out.rec + out.kl;
  out.iw_samples = K;
  out.iwae_nll = K > 0 ? sums[3] / denom : std::nan("");
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
  return s + " | " + std::to_string(r.samples) + " samples";
}

std::string eval_yaml(const EvalResult& r, const std::string& model, const std::string& data) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "model: %s\ndata: %s\nsamples: %lld\nneg_elbo: %.6f\nrec: %.6f\nkl: %.6f\niw_samples: %d\n",
                model.c_str(), data.c_str(), static_cast<long long>(r.samples), r.neg_elbo, r.rec, r.kl,
                r.iw_samples);
  std::string s = buf;
  if (r.iw_samples > 0) {
    std::snprintf(buf, sizeof(buf), "iwae_nll: %.6f\n", r.iwae_nll);
    s += buf;
  }
  return s;
}

}  // namespace elbo
