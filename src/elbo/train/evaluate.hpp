// Test-set evaluation: the negative ELBO per sample and its parts, and the
// importance-weighted bound (Burda et al. 2015) and the active latent units,
// data-parallel over the ranks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/model/hvae.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

struct EvalOptions {
  int iw_samples = 0;        // k for the IWAE bound; 0 = skip it
  int64_t batch_size = 500;  // rows per forward pass on each rank
  uint64_t seed = 1;         // keys eps (and binarization): results do not depend on the world size
  bool binarize = false;
  int64_t max_samples = 0;  // evaluate the split's first max_samples only (0 = all)
  bool progress = true;  // a progress bar (rank 0, stderr) over the rank's samples (x k with the IWAE bound)
  std::string progress_label = "eval";
  // An IWAE bound estimated (from a timed pass) to take longer than this is refused
  // before the work starts; 0 = no limit.
  double max_seconds = 24 * 3600.0;
  // For messages: where the options came from and what they are called there.
  std::string source = "eval";
  std::string batch_size_name = "eval.batch_size", iw_samples_name = "eval.iw_samples", max_samples_name = "";
  std::string max_seconds_hint = "";  // how to raise the time limit, when there is a way
  ErrorKind error_kind = ErrorKind::Config;
};

// How evaluate() cuts its work: the IWAE samples of each input go kc at a time, for xb
// inputs per pass, so a pass holds cap = xb * kc rows (at most max(batch_size, 1 input)).
struct EvalChunks {
  int kc = 1;        // IW samples per pass
  int xb = 1;        // inputs per pass
  int64_t cap = 1;   // rows per pass
};
EvalChunks eval_chunks(int iw_samples, int64_t batch_size, int64_t rank_samples);

// Burda et al. (2016): unit j is active when Var_x(E_q[z_j | x]) exceeds 0.01.
constexpr double kActiveUnitThreshold = 0.01;

struct EvalResult {
  int64_t samples = 0;
  double neg_elbo = 0;   // nats per sample, one posterior sample per x
  double rec = 0;        // E[-log p(x|z)] part
  double kl = 0;         // KL part
  int iw_samples = 0;
  double iwae_nll = 0;   // -log p(x) estimate: minus the k-sample IWAE bound, nats per sample
  int active_units = 0;  // latent units with Var_x(mu_j(x)) > kActiveUnitThreshold
  int latent = 0;
  // Bits per dimension for a likelihood of 8-bit pixels (the discretized logistic
  // mixture): bits/dim = nats / (D ln 2), the unit of PixelCNN++, NVAE, VDVAE. 0 = not
  // reported (a density or binarized data: not comparable).
  int dim = 0;  // D = C*H*W
  double bits_per_dim(double nats) const { return dim > 0 ? elbo::bits_per_dim(nats, dim) : 0.0; }
  // KL(q(z_j|x) || N(0, 1)) of each latent dimension, nats, mean over the samples: sums
  // to `kl` (up to float rounding); near 0 for a collapsed unit.
  std::vector<double> kl_per_dim;
  // Hierarchical models (empty for the others): each latent group's KL (nats, mean
  // over the samples; sums to `kl`), its active units (elements of the group with
  // Var_x(E_q[z | x, z_<l]) > kActiveUnitThreshold, the posterior mean given the
  // sampled groups above it) and its size (elements per sample).
  std::vector<double> kl_groups;
  std::vector<int> active_groups, group_sizes;
};

EvalResult evaluate(const ModelLayout& layout, Backend<float>& backend, const float* params, const data::ShardSet& set,
                    Communicator& comm, const EvalOptions& opt);

// The hierarchical model's evaluation (evaluate() calls it for an HvaeLayout): the
// ELBO from one pass per input, the IWAE bound from K full passes per input (log w =
// -(rec + log q(z|x) - log p(z))), chunked and keyed as the Vae's.
EvalResult evaluate_hierarchical(const HvaeLayout& layout, Backend<float>& backend, const float* params,
                                 const data::ShardSet& set, Communicator& comm, const EvalOptions& opt);

namespace detail {
// Shared by both evaluations: refuses buffers beyond this rank's memory (collective),
// and "3.2 hours" for the IWAE bound's time limit.
void check_eval_memory(const ModelLayout& layout, Backend<float>& be, Communicator& comm, int64_t rank_samples,
                       const EvalOptions& opt);
std::string duration_words(double seconds);

// The IWAE bound of a block of inputs accumulated over chunks of importance samples: a
// running log-sum-exp of log w = -(rec + log q - log p) in double (the largest log w so
// far and the sum scaled by it), so K samples never need to be held at once.
class IwBound {
 public:
  explicit IwBound(size_t max_rows) : m_max(max_rows), m_sum(max_rows) {}
  // Sample 0 of each of `rows` inputs.
  void start(int rows, const float* rec, const float* log_ratio);
  // kn more samples per input: sample j of input r at j * rows + r.
  void add(int rows, int kn, const float* rec, const float* log_ratio);
  // total += -log (1/K sum_k w_k) for each row in turn (added one by one, as before).
  void add_neg_bounds(int rows, int K, double& total) const;

 private:
  std::vector<double> m_max, m_sum;
};
}  // namespace detail

// "test -ELBO 101.23 nats (rec 90.1, KL 11.1) | IWAE(k=50) NLL 97.5 | 10000 samples"; with
// bits/dim: "test -ELBO 7000.1 nats = 3.2876 bits/dim (rec ...) | IWAE(k=50) NLL 6990.2 nats = 3.2830 bits/dim".
std::string format_eval(const EvalResult& r);
// "KL per latent dimension (nats): 0.0012 3.1416 ..." (printed under format_eval's line).
std::string format_kl_per_dim(const EvalResult& r);
// The same as YAML, for eval.yaml next to the model.
std::string eval_yaml(const EvalResult& r, const std::string& model, const std::string& data);

}  // namespace elbo
