// Step counts with overflow checks and the memory estimate of a run, checked before
// anything is allocated.
#include "elbo/train/footprint.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include "elbo/train/evaluate.hpp"

namespace elbo {

namespace {

constexpr double kFloat = sizeof(float);

std::string num(int64_t v) { return std::to_string(v); }

}  // namespace

StepPlan plan_steps(const ExperimentSpec& spec, int64_t n, int world) {
  const TrainSpec& t = spec.train;
  const int64_t B = t.batch_size, rows = B / std::max(1, world);
  if (rows > std::numeric_limits<int>::max())
    throw config_error(spec_origin(spec, "train.batch_size") + ": train.batch_size: " + num(B) + " over " +
                       std::to_string(world) + " rank(s) is " + num(rows) + " rows per rank, more than one pass "
                       "holds (" + std::to_string(std::numeric_limits<int>::max()) + ")");
  StepPlan p;
  // n / B rounded up without forming n + B - 1 (B may be near INT64_MAX).
  p.per_epoch = t.drop_last ? n / B : n / B + (n % B != 0 ? 1 : 0);
  int64_t total = 0;
  const bool overflow = __builtin_mul_overflow(p.per_epoch, t.epochs, &total);
  if (overflow && t.max_steps == 0)
    throw config_error(spec_origin(spec, "train.epochs") + ": train.epochs: " + num(t.epochs) + " epochs of " +
                       num(p.per_epoch) + " steps (" + num(n) + " samples / train.batch_size " + num(B) +
                       ") are more steps than a 64-bit counter holds; lower train.epochs or set train.max_steps");
  // A cap below an overflowing product is the product's minimum anyway.
  p.total = overflow ? t.max_steps : t.max_steps > 0 ? std::min(total, t.max_steps) : total;
  // The samples seen (checkpointed, logged) must fit too: at most total x min(B, n).
  int64_t samples = 0;
  if (__builtin_mul_overflow(p.total, std::min(B, n), &samples)) {
    const std::string key = t.max_steps > 0 && t.max_steps == p.total ? "train.max_steps" : "train.epochs";
    throw config_error(spec_origin(spec, key) + ": " + key + ": " + num(p.total) + " steps of up to " +
                       num(std::min(B, n)) + " samples (train.batch_size) are more samples than a 64-bit counter "
                       "holds; lower train.epochs or train.max_steps");
  }
  return p;
}

double MemoryEstimate::device_bytes() const {
  double s = 0;
  for (const auto& i : items) s += i.device ? i.bytes : 0;
  return s;
}

double MemoryEstimate::host_bytes() const {
  double s = 0;
  for (const auto& i : items) s += i.device ? 0 : i.bytes;
  return s;
}

double vae_activation_bytes(const VaeLayout& layout, int64_t rows, int iw_samples) {
  const double k = std::max(1, iw_samples);  // samples per input after the encoder
  double per_row = 0;  // floats
  for (const auto* list : {&layout.encoder(), &layout.decoder()})
    for (const Layer& l : *list) {
      double n = static_cast<double>(l.out.size()) * (l.act != Activation::Identity ? 2 : 1);
      if (l.kind == LayerKind::GroupNorm) n += 2.0 * l.groups;
      per_row += list == &layout.decoder() ? k * n : n;
    }
  per_row += k * (layout.latent() + 1) + 1;                      // z, rec; kl
  per_row += k * 2.0 * static_cast<double>(layout.max_width());  // activation gradients, ping-pong
  // Importance-weighted passes: repeated inputs, log-ratios and weights per sample,
  // bound and mean nll per input, and the k-vector of 1/k.
  if (iw_samples > 0) per_row += k * (layout.input_dim() + 2) + 2 + k / static_cast<double>(std::max<int64_t>(rows, 1));
  return per_row * static_cast<double>(rows) * kFloat;
}

double hvae_activation_bytes(const HvaeLayout& layout, int64_t rows) {
  const auto branch = [](const HvaeBranch& b) {  // a0, p1, a1, p2, a2, out
    return static_cast<double>(b.c1.in.size() + 2 * b.c1.out.size() + 2 * b.c2.out.size() + b.c3.out.size());
  };
  double per_row = static_cast<double>(layout.stages().front().outer.size());  // the stem's output
  for (const HvaeStage& st : layout.stages()) {
    const double here = static_cast<double>(st.shape.size());
    // W_{s-1} channels at this resolution: the pooled stream, and the decoder's resized one.
    const double mixed = static_cast<double>(st.outer.c) * st.shape.h * st.shape.w;
    per_row += here;  // d(e_s)
    if (st.learned)
      per_row += here + static_cast<double>(st.outer.size());  // down_conv's and up_conv's outputs
    else if (st.down > 1)
      per_row += mixed + static_cast<double>(st.outer.size());  // pooled, unpooled
    if (st.resizes()) per_row += here + mixed;                  // resized both ways
  }
  for (const auto* blocks : {&layout.encoder_blocks(), &layout.decoder_blocks()})
    for (const HvaeBlock& b : *blocks) per_row += branch(b.branch) + b.branch.c3.out.size();
  per_row += static_cast<double>(layout.top_shape().size());
  double max_q = 0, max_p = 0, max_z = 0, max_qin = 0;
  for (const HvaeGroup& g : layout.groups()) {
    const double sz = static_cast<double>(g.shape.size()), pos = static_cast<double>(g.shape.h) * g.shape.w;
    per_row += 2 * sz + branch(g.q) + branch(g.prior) + branch(g.resnet) + 4 * sz + static_cast<double>(g.numel());
    max_q = std::max(max_q, 2.0 * g.numel());
    max_p = std::max(max_p, (2.0 * g.zc + g.shape.c) * pos);
    max_z = std::max(max_z, static_cast<double>(g.numel()));
    max_qin = std::max(max_qin, 2 * sz);
  }
  const double G = layout.num_groups();
  per_row += layout.output_width() + 3 + 2 * G;              // output, rec, KL, log-ratio; per-group KL and ratio
  per_row += 2.0 * static_cast<double>(layout.max_width());  // branch gradients, ping-pong
  // Stream gradients (ping-pong) and the pooling's, the heads' gradients.
  per_row += 3 * static_cast<double>(layout.max_stream()) + max_q + max_p + max_z + max_qin;
  return per_row * static_cast<double>(rows) * kFloat;
}

double activation_bytes(const ModelLayout& layout, int64_t rows, int iw_samples) {
  if (const auto* h = dynamic_cast<const HvaeLayout*>(&layout)) return hvae_activation_bytes(*h, rows);
  return vae_activation_bytes(dynamic_cast<const VaeLayout&>(layout), rows, iw_samples);
}

namespace {

// Every layer of the model, for the convolution scratch.
std::vector<const Layer*> all_layers(const ModelLayout& layout) {
  std::vector<const Layer*> out;
  if (const auto* v = dynamic_cast<const VaeLayout*>(&layout)) {
    for (const auto* list : {&v->encoder(), &v->decoder()})
      for (const Layer& l : *list) out.push_back(&l);
  } else if (const auto* h = dynamic_cast<const HvaeLayout*>(&layout)) {
    const auto add = [&](const HvaeBranch& b) { out.insert(out.end(), {&b.c1, &b.c2, &b.c3}); };
    out.push_back(&h->stem());
    for (const HvaeBlock& b : h->encoder_blocks()) add(b.branch);
    for (const HvaeGroup& g : h->groups()) {
      add(g.q);
      add(g.prior);
      add(g.resnet);
      out.push_back(&g.z_proj);
    }
    for (const HvaeBlock& b : h->decoder_blocks()) add(b.branch);
    for (const HvaeStage& st : h->stages())
      if (st.learned) out.insert(out.end(), {&st.down_conv, &st.up_conv});
    out.push_back(&h->out());
  }
  return out;
}

// The CPU convolutions' im2col columns and GEMM output for one chunk of samples (about
// 2^24 floats of columns, or one sample's when that is larger), per the largest layer.
double conv_scratch_bytes(const ModelLayout& layout, int64_t rows) {
  double worst = 0;
  for (const Layer* lp : all_layers(layout)) {
    const Layer& l = *lp;
    if (l.kind != LayerKind::Conv2d && l.kind != LayerKind::ConvTranspose2d) continue;
    const ConvShape s = l.conv(1);
    const double cols = static_cast<double>(s.c) * s.r * s.s * s.out_h() * s.out_w();
    const double out = static_cast<double>(s.k) * s.out_h() * s.out_w();
    const double chunk = std::clamp(std::floor(double(1 << 24) / std::max(cols, 1.0)), 1.0, double(rows));
    worst = std::max(worst, chunk * (cols + out) * kFloat);
  }
  return worst;
}

}  // namespace

MemoryEstimate estimate_train_memory(const ModelLayout& layout, int64_t rows, DeviceKind device, int optimizer_shards,
                                     int64_t micro_rows, int iw_samples) {
  const double P = static_cast<double>(layout.num_params()), R = static_cast<double>(rows);
  // The model's buffers hold one micro-batch (train.accumulate); the host batch all of the rank's rows.
  const int64_t pass = micro_rows > 0 ? micro_rows : rows;
  const double M = static_cast<double>(pass);
  const double D = layout.input_dim(), L = static_cast<double>(layout.eps_per_row());
  const std::string rows_keys = "train.batch_size, or spread it over more ranks or micro-batches (train.accumulate)";
  MemoryEstimate e;
  if (optimizer_shards <= 1)
    e.items.push_back({"parameters, gradients and Adam's two moments (4 x " + num(static_cast<int64_t>(P)) + " floats)",
                       "model.encoder, model.decoder or model.latent", 4 * P * kFloat, true});
  else  // a rank's slice: about P / N elements (one more per bucket at most)
    e.items.push_back({"parameters, gradients (2 x " + num(static_cast<int64_t>(P)) + " floats) and Adam's two moments "
                       "for 1/" + std::to_string(optimizer_shards) + " of them (dist.shard_optimizer)",
                       "model.encoder, model.decoder or model.latent",
                       (2 * P + 2 * std::ceil(P / optimizer_shards)) * kFloat, true});
  e.items.push_back({"activations for " + num(pass) + " rows per rank", rows_keys,
                     activation_bytes(layout, pass, iw_samples) + M * (D + L * std::max(1, iw_samples)) * kFloat,
                     true});
  if (device == DeviceKind::Cpu && conv_scratch_bytes(layout, pass) > 0)
    e.items.push_back({"convolution scratch (im2col)", rows_keys, conv_scratch_bytes(layout, pass), true});
  // Two prepared batches, the pixels they come from, the per-sample losses.
  e.items.push_back({"host batch buffers for " + num(rows) + " rows per rank",
                     "train.batch_size, or spread it over more ranks", R * (2 * D * kFloat + D + 2 * kFloat), false});
  // Checkpoints copy parameters and moments to the host; a resume holds the file's and
  // the broadcast copies at once.
  e.items.push_back({"host copies of the parameters and Adam's moments (checkpoints, resume)",
                     "model.encoder, model.decoder or model.latent", 6 * P * kFloat, false});
  return e;
}

MemoryItem ema_memory(const ModelLayout& layout) {
  return {"moving average of the parameters (" + num(static_cast<int64_t>(layout.num_params())) + " floats)",
          "optim.ema (0 = off), model.encoder, model.decoder or model.latent",
          static_cast<double>(layout.num_params()) * kFloat, true};
}

void add_ema_memory(MemoryEstimate& e, const ModelLayout& layout) {
  e.items.push_back(ema_memory(layout));
  // A checkpoint's copy, and at resume the file's and the broadcast copies.
  e.items.push_back({"host copies of the moving average (checkpoints, resume)", "optim.ema (0 = off)",
                     3 * static_cast<double>(layout.num_params()) * kFloat, false});
}

void add_eval_memory(MemoryEstimate& e, const ModelLayout& layout, int64_t rank_samples, int K, int64_t batch_size,
                     const std::string& keys) {
  const EvalChunks c = eval_chunks(K, batch_size, rank_samples);
  const double cap = static_cast<double>(c.cap), xb = c.xb;
  const double D = layout.input_dim(), L = static_cast<double>(layout.eps_per_row());
  double dev = activation_bytes(layout, c.cap) + (xb * D + cap * L) * kFloat;
  if (K > 0) dev += cap * (D + 3 * L + 3) * kFloat;  // repeated inputs and posteriors, z, three per-row results
  e.items.push_back({"evaluation buffers (" + num(c.cap) + " rows per pass)", keys, dev, true});
  const double host = xb * D + (xb * D + cap * std::max(D, 2 * L) + 2 * cap + xb + xb * 2 * L) * kFloat +
                      xb * (2 * sizeof(double) + sizeof(int64_t));
  e.items.push_back({"evaluation host buffers", keys, host, false});
}

double host_memory_per_rank(int local_ranks) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  double limit = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0;
  // A container's or SLURM job's cgroup limit (v2, then v1) is what the kernel enforces.
  for (const char* f : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(f);
    double v = 0;
    if (in >> v && v > 0 && (limit == 0 || v < limit)) limit = v;  // "max" fails to parse: no limit
  }
  return limit / std::max(1, local_ranks);
}

std::string format_bytes(double b) {
  char buf[64];
  if (b >= 1e12) std::snprintf(buf, sizeof(buf), "%.3g TB", b / 1e12);
  else if (b >= 1e9) std::snprintf(buf, sizeof(buf), "%.3g GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof(buf), "%.3g MB", b / 1e6);
  else std::snprintf(buf, sizeof(buf), "%.3g kB", b / 1e3);
  return buf;
}

void check_memory(const MemoryEstimate& need, DeviceKind device, double host_limit, const std::string& source) {
  const double total = need.host_total(device);
  if (host_limit <= 0 || total <= host_limit) return;
  std::vector<const MemoryItem*> big;
  for (const auto& i : need.items)
    if (device == DeviceKind::Cpu || !i.device) big.push_back(&i);
  std::sort(big.begin(), big.end(), [](const MemoryItem* a, const MemoryItem* b) { return a->bytes > b->bytes; });
  std::string msg = source + ": the run needs about " + format_bytes(total) + " of memory per rank but has " +
                    format_bytes(host_limit) + " (the node's memory shared by its ranks); largest: ";
  for (size_t i = 0; i < big.size() && i < 2; ++i)
    msg += (i ? "; " : "") + big[i]->what + " " + format_bytes(big[i]->bytes) + " (reduce " + big[i]->keys + ")";
  throw config_error(msg);
}

}  // namespace elbo
