// Evaluation loop: each rank takes a contiguous slice of the test set; sums are
// reduced at the end. eps is keyed by (seed, IW sample, dataset index), so every
// figure is the same for any number of ranks.
#include "elbo/train/evaluate.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <limits>
#include <span>
#include <cstdio>
#include <numeric>
#include <vector>

#include "elbo/data/sampler.hpp"
#include "elbo/optim/kl.hpp"
#include "elbo/train/footprint.hpp"
#include "elbo/util/progress.hpp"

namespace elbo {

EvalChunks eval_chunks(int K, int64_t batch_size, int64_t rank_samples) {
  // Work per pass is bounded by batch_size rows through the network. The IWAE bound
  // needs K decoder passes per input; the encoder runs once per input and its
  // posterior is repeated for a chunk of kc samples, so K = 5000 costs K/kc passes of
  // xb * kc rows, never K copies of the activations.
  const int64_t W = std::max<int64_t>(1, batch_size);
  EvalChunks c;
  c.kc = K > 0 ? static_cast<int>(std::min<int64_t>(K, W)) : 1;
  c.xb = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(W / c.kc, rank_samples), 1, INT_MAX));
  c.cap = static_cast<int64_t>(c.xb) * c.kc;
  return c;
}

namespace detail {

// Refuses evaluation buffers that cannot fit in this rank's share of the machine's memory
// (CPU backend; a GPU's own limit shows as a failed allocation).
void check_eval_memory(const ModelLayout& layout, Backend<float>& be, Communicator& comm, int64_t rank_samples,
                       const EvalOptions& opt) {
  collectively(comm, [&] {
    MemoryEstimate need;
    add_eval_memory(need, layout, rank_samples, opt.iw_samples, opt.batch_size,
                    opt.batch_size_name + (opt.iw_samples > 0 ? " or " + opt.iw_samples_name : std::string()));
    check_memory(need, be.device(), host_memory_per_rank(comm.world().local_size), opt.source);
    const EvalChunks c = eval_chunks(opt.iw_samples, opt.batch_size, rank_samples);
    if (c.cap > INT_MAX)
      throw config_error(opt.source + ": " + opt.batch_size_name + ": " + std::to_string(c.cap) +
                         " rows per pass exceed the 2^31 a pass can hold");
  });
}

void IwBound::start(int rows, const float* rec, const float* log_ratio) {
  for (int r = 0; r < rows; ++r) {
    m_max[r] = -double(rec[r]) - double(log_ratio[r]);
    m_sum[r] = 1.0;
  }
}

void IwBound::add(int rows, int kn, const float* rec, const float* log_ratio) {
  for (int r = 0; r < rows; ++r) {
    auto logw = [&](int j) {
      return -double(rec[static_cast<size_t>(j) * rows + r]) - double(log_ratio[static_cast<size_t>(j) * rows + r]);
    };
    double m = m_max[r];
    for (int j = 0; j < kn; ++j) m = std::max(m, logw(j));
    double acc = m_sum[r] * std::exp(m_max[r] - m);
    for (int j = 0; j < kn; ++j) acc += std::exp(logw(j) - m);
    m_max[r] = m;
    m_sum[r] = acc;
  }
}

void IwBound::add_neg_bounds(int rows, int K, double& total) const {
  for (int r = 0; r < rows; ++r) total += -(m_max[r] + std::log(m_sum[r]) - std::log(static_cast<double>(K)));
}

std::string duration_words(double s) {
  char buf[64];
  if (s >= 2 * 86400.0 * 365) std::snprintf(buf, sizeof(buf), "%.3g years", s / (86400.0 * 365));
  else if (s >= 2 * 86400.0) std::snprintf(buf, sizeof(buf), "%.3g days", s / 86400.0);
  else if (s >= 2 * 3600.0) std::snprintf(buf, sizeof(buf), "%.3g hours", s / 3600.0);
  else std::snprintf(buf, sizeof(buf), "%.3g minutes", s / 60.0);
  return buf;
}

}  // namespace detail

EvalResult evaluate(const ModelLayout& model_layout, Backend<float>& be, const float* params, const data::ShardSet& set,
                    Communicator& comm, const EvalOptions& opt) {
  if (const auto* h = dynamic_cast<const HvaeLayout*>(&model_layout))
    return evaluate_hierarchical(*h, be, params, set, comm, opt);
  const VaeLayout& layout = dynamic_cast<const VaeLayout&>(model_layout);
  const int64_t n = opt.max_samples > 0 ? std::min(opt.max_samples, set.size()) : set.size();
  const int D = layout.input_dim(), L = layout.latent();
  const int K = opt.iw_samples;
  const data::Slice mine = data::rank_slice(n, comm.rank(), comm.size());
  detail::check_eval_memory(layout, be, comm, mine.count, opt);
  const EvalChunks chunks = eval_chunks(K, opt.batch_size, mine.count);
  const int kc = chunks.kc, xb = chunks.xb, cap = static_cast<int>(chunks.cap);

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
  // Each input's log-sum-exp of its K log-weights, accumulated chunk by chunk (running
  // max and the sum scaled to it): memory does not grow with K.
  detail::IwBound bound(static_cast<size_t>(xb));

  if (K > 1 && opt.max_seconds > 0) {
    // Time the IWAE bound's unit of work, one pass of cap decoder rows (the faster of
    // two: the first may pay for lazy set-up), and refuse a bound that would run for
    // longer than the limit before any of it is spent. Every rank measures; the
    // slowest decides, the same on all ranks.
    double best = 0;
    if (mine.count > 0) {
      be.fill(z.data(), 0.0f, static_cast<size_t>(cap) * L);
      be.fill(x_rep.data(), 0.0f, static_cast<size_t>(cap) * D);
      best = std::numeric_limits<double>::infinity();
      for (int t = 0; t < 2; ++t) {
        const auto t0 = std::chrono::steady_clock::now();
        model.decode(params, z.data(), cap);
        layout.likelihood().forward(be, cap, model.output(), x_rep.data(), rec_buf.data());
        be.synchronize();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    const double passes = static_cast<double>(mine.count) * (K - 1) / static_cast<double>(cap);
    const double secs = comm.allreduce_max(static_cast<int>(std::min(best * passes, 2e9)));
    if (secs > opt.max_seconds) {
      const double rows = static_cast<double>(n) * K;
      char work[64];
      std::snprintf(work, sizeof(work), "%.3g", rows);
      throw AgreedError(opt.error_kind,
                        opt.source + ": " + opt.iw_samples_name + ": the IWAE bound with k = " + std::to_string(K) +
                            " on " + std::to_string(n) + " samples decodes " + work + " samples, estimated at " +
                            detail::duration_words(secs) + " (from a timed pass of " + std::to_string(cap) +
                            " rows), over the limit of " + detail::duration_words(opt.max_seconds) + "; lower " +
                            opt.iw_samples_name + (opt.max_samples_name.empty() ? "" : " or " + opt.max_samples_name) +
                            (opt.max_seconds_hint.empty() ? "" : ", or " + opt.max_seconds_hint));
    }
  }

  // sums: samples, rec, kl, iwae, then per latent unit sum mu_j, sum mu_j^2 and sum KL_j
  std::vector<double> sums(4 + 3 * static_cast<size_t>(L), 0.0);
  // Rank 0 shows its own share; the ranks' shares differ by at most one sample. With
  // the IWAE bound the unit is a decoded sample (inputs x k), updated after every
  // pass, so that a large k shows its pace (and an ETA) from the first pass on (the
  // label stays "eval": scripts read these lines).
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
    add_kl_per_dim(rows, L, mulv.data(), sums.data() + 4 + 2 * L);

    if (K > 0) {
      // Sample 0 is the forward pass above; the chunks decode samples 1..K-1.
      be.posterior_log_ratio(rows, L, model.mulv(), eps.data(), model.z(), ratio.data());
      be.download(lr.data(), ratio.data(), rows);
      bound.start(rows, rec.data(), lr.data());
      const size_t n_rep = static_cast<size_t>(rows) * kc;
      for (int j = 0; j < kc; ++j)
        std::copy_n(xh.data(), static_cast<size_t>(rows) * D, rep.data() + static_cast<size_t>(j) * rows * D);
      be.upload(x_rep.data(), rep.data(), n_rep * D);
      for (int j = 0; j < kc; ++j)
        std::copy_n(mulv.data(), static_cast<size_t>(rows) * 2 * L, rep.data() + static_cast<size_t>(j) * rows * 2 * L);
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
        layout.likelihood().forward(be, nr, model.output(), x_rep.data(), rec_buf.data());
        be.posterior_log_ratio(nr, L, mulv_rep.data(), eps.data(), z.data(), ratio.data());
        be.download(rec.data(), rec_buf.data(), nr);
        be.download(lr.data(), ratio.data(), nr);
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
  double denom = std::max(1.0, sums[0]);
  out.rec = sums[1] / denom;
  out.kl = sums[2] / denom;
  out.neg_elbo = out.rec + out.kl;
  out.iw_samples = K;
  out.iwae_nll = K > 0 ? sums[3] / denom : std::nan("");
  out.latent = L;
  if (layout.likelihood().is_dlm()) out.dim = D;
  for (int j = 0; j < L; ++j) {
    const double mean = sums[4 + j] / denom;
    const double var = std::max(0.0, sums[4 + L + j] / denom - mean * mean);
    if (var > kActiveUnitThreshold) ++out.active_units;
    out.kl_per_dim.push_back(sums[4 + 2 * L + j] / denom);
  }
  return out;
}

std::string format_eval(const EvalResult& r) {
  char buf[256];
  auto bpd = [&](double nats) {
    if (r.dim == 0) return std::string();
    char b[48];
    std::snprintf(b, sizeof(b), " = %.4f bits/dim", r.bits_per_dim(nats));
    return std::string(b);
  };
  std::snprintf(buf, sizeof(buf), "test -ELBO %.4f nats%s (rec %.4f, KL %.4f)", r.neg_elbo, bpd(r.neg_elbo).c_str(),
                r.rec, r.kl);
  std::string s = buf;
  if (r.iw_samples > 0) {
    std::snprintf(buf, sizeof(buf), " | IWAE(k=%d) NLL %.4f nats%s", r.iw_samples, r.iwae_nll, bpd(r.iwae_nll).c_str());
    s += buf;
  }
  return s + " | active units " + std::to_string(r.active_units) + "/" + std::to_string(r.latent) + " | " +
         std::to_string(r.samples) + " samples";
}

std::string format_kl_per_dim(const EvalResult& r) {
  char buf[64];
  if (!r.kl_groups.empty()) {  // hierarchical: per latent group, top first
    std::string s = "KL per latent group (nats; active units/elements):";
    for (size_t l = 0; l < r.kl_groups.size(); ++l) {
      std::snprintf(buf, sizeof(buf), " %.4f (%d/%d)", r.kl_groups[l], r.active_groups[l], r.group_sizes[l]);
      s += buf;
    }
    return s;
  }
  std::string s = "KL per latent dimension (nats):";
  for (double v : r.kl_per_dim) {
    std::snprintf(buf, sizeof(buf), " %.4f", v);
    s += buf;
  }
  return s;
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
  if (r.dim > 0) {  // 8-bit pixels: the same bounds in bits/dim, and the D they divide by
    std::snprintf(buf, sizeof(buf), "dim: %d\nneg_elbo_bpd: %.6f\n", r.dim, r.bits_per_dim(r.neg_elbo));
    s += buf;
    if (r.iw_samples > 0) {
      std::snprintf(buf, sizeof(buf), "iwae_bpd: %.6f\n", r.bits_per_dim(r.iwae_nll));
      s += buf;
    }
  }
  // A flow list on one line (YAML), next to active_units; %.9g keeps the float's digits.
  s += "kl_per_dim: [";
  for (size_t j = 0; j < r.kl_per_dim.size(); ++j) {
    std::snprintf(buf, sizeof(buf), "%s%.9g", j > 0 ? ", " : "", r.kl_per_dim[j]);
    s += buf;
  }
  s += "]\n";
  if (!r.kl_groups.empty()) {  // hierarchical: per latent group, top first
    const auto list = [&](const char* key, auto&& item) {
      s += key;
      s += ": [";
      for (size_t l = 0; l < r.kl_groups.size(); ++l) {
        s += l > 0 ? ", " : "";
        s += item(l);
      }
      s += "]\n";
    };
    list("kl_groups", [&](size_t l) {
      std::snprintf(buf, sizeof(buf), "%.9g", r.kl_groups[l]);
      return std::string(buf);
    });
    list("active_groups", [&](size_t l) { return std::to_string(r.active_groups[l]); });
    list("group_sizes", [&](size_t l) { return std::to_string(r.group_sizes[l]); });
  }
  return s;
}

}  // namespace elbo
