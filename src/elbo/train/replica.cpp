// One data-parallel replica and its training step (see replica.hpp).
#include "elbo/train/replica.hpp"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <vector>

namespace elbo {

namespace {

std::unique_ptr<GradientSync> make_sync(const ExperimentSpec& spec, Communicator& comm, const Placement& place,
                                        Backend<float>& be, float* grads, float* params, size_t n) {
  const auto bucket_elems = static_cast<size_t>(spec.dist.bucket_mb * 1e6 / sizeof(float));
  std::unique_ptr<GradientSync> sync;
  collectively(comm, [&] {
    sync = spec.dist.shard_optimizer ? make_sharded_sync(place.communicator, comm, be, grads, params, n, bucket_elems)
                                     : make_gradient_sync(place.communicator, comm, be, grads, n, bucket_elems);
  });
  return sync;
}

// Sharded (dist.shard_optimizer): moments for this rank's slice, clipping with the
// global norm (the slices' squared norms summed over the ranks).
Adam<float> make_optimizer(const OptimSpec& spec, Backend<float>& be, size_t n, const GradientSync& sync,
                           Communicator& comm) {
  const ShardPlan* shards = sync.shard_plan();
  if (shards == nullptr) return Adam<float>(spec, be, n);
  return Adam<float>(spec, be, n, shards->owned(comm.rank()), [&comm](double s) {
    comm.allreduce_sum(&s, 1);
    return s;
  });
}

// Rows per forward/backward pass; the loop refuses a batch that does not divide first.
int micro_rows(int local_rows, int64_t accumulate) {
  if (accumulate < 1 || local_rows % accumulate != 0)
    throw internal_error(std::to_string(local_rows) + " rows per rank do not split into " + std::to_string(accumulate) +
                         " micro-batches");
  return static_cast<int>(local_rows / accumulate);
}

// The model for the layout's type; the Vae keeps its importance-weighted workspaces
// (loss.type iwae), which only it has.
std::unique_ptr<Model<float>> make_train_model(const ModelLayout& layout, Backend<float>& be, int rows, int iw) {
  if (const auto* v = dynamic_cast<const VaeLayout*>(&layout)) return std::make_unique<Vae<float>>(*v, be, rows, iw);
  return make_model<float>(layout, be, rows);
}

}  // namespace

Replica::Replica(const ExperimentSpec& spec, Communicator& comm, Backend<float>& be, const ModelLayout& layout,
                 const Placement& place, const MemoryEstimate& need, int local_rows, int dim,
                 std::function<void(const std::string&)> warn)
    : m_spec(spec),
      m_comm(comm),
      m_be(be),
      m_local_rows(local_rows),
      m_dim(dim),
      m_latent(static_cast<int>(layout.eps_per_row())),
      m_n(layout.num_params()),
      m_params(
          allocating(need.items[MemoryEstimate::kModelState], spec.source, [&] { return Buffer<float>(be, m_n); })),
      m_grads(allocating(need.items[MemoryEstimate::kModelState], spec.source, [&] { return Buffer<float>(be, m_n); })),
      m_sync(make_sync(spec, comm, place, be, m_grads.data(), m_params.data(), m_n)),
      m_micro_rows(micro_rows(local_rows, spec.train.accumulate)),
      m_model(allocating(need.items[MemoryEstimate::kActivations], spec.source,
                         [&] { return make_train_model(layout, be, m_micro_rows, iw_samples(spec.loss)); })),
      m_vae(dynamic_cast<Vae<float>*>(m_model.get())),
      m_hvae(dynamic_cast<Hvae<float>*>(m_model.get())),
      m_optim(allocating(need.items[MemoryEstimate::kModelState], spec.source,
                         [&] { return make_optimizer(spec.optim, be, m_n, *m_sync, comm); })),
      m_ema(spec.optim.ema > 0 ? allocating(ema_memory(layout), spec.source, [&] { return Buffer<float>(be, m_n); })
                               : Buffer<float>()),
      m_iwae(spec.loss.type == LossType::Iwae),
      m_eps_cols(m_latent * std::max(1, iw_samples(spec.loss))),
      m_x(be, static_cast<size_t>(m_micro_rows) * dim),
      m_eps(be, static_cast<size_t>(m_micro_rows) * m_eps_cols),
      m_free_bits(spec.loss.free_bits > 0),
      // Free bits: one KL weight per part (the Vae's latent dimensions, the Hvae's groups).
      m_kl_weights(be, m_free_bits ? static_cast<size_t>(layout.kl_parts()) : 0),
      m_mulv_host(m_free_bits && m_vae ? static_cast<size_t>(local_rows) * 2 * m_latent : 0),
      m_losses(be, 3 * static_cast<size_t>(local_rows)),
      m_kl_groups(be, m_hvae ? static_cast<size_t>(local_rows) * m_hvae->layout().num_groups() : 0),
      m_norm_with_losses(comm.size() == 1),
      m_squared_norm(be, 1),
      // auto: on for one GPU replica, where nothing overlaps with the backward pass and
      // launch overhead is what a small batch pays for; with several ranks the per-layer
      // bucketed all-reduce is worth more than the saved launches. Never with free bits:
      // the KL all-reduce sits between the forward and the backward pass. Accumulation
      // runs op by op: one recording per micro-batch, with the sync hook only in the
      // last, is not worth its complexity where the micro-batches are large anyway.
      m_use_graph(!m_free_bits && spec.train.accumulate == 1 &&
                  (spec.train.cuda_graph == GraphMode::On ||
                   (spec.train.cuda_graph == GraphMode::Auto && place.device == DeviceKind::Cuda && comm.size() == 1))),
      m_warn(std::move(warn)) {
  // The config refuses what only the Vae has (iwae training) for other models.
  if (m_iwae && m_vae == nullptr) throw internal_error("loss.type iwae needs an mlp or conv model");
  if (spec.train.accumulate > 1 && spec.train.cuda_graph == GraphMode::On)
    m_warn("train.cuda_graph: on is not used with train.accumulate: " + std::to_string(spec.train.accumulate) +
           " (micro-batches run op by op)");
  std::vector<double> init = layout.init_params(spec.seed);
  std::vector<float> host(init.begin(), init.end());
  // Every rank computes the same init; the broadcast makes "identical replicas" a
  // guarantee rather than an assumption about libm on heterogeneous nodes.
  comm.broadcast(host.data(), host.size() * sizeof(float), 0);
  be.upload(m_params.data(), host.data(), m_n);
  // The average starts at the initial parameters (no bias correction, as VDVAE and
  // timm do): with d near 1 it stays near them for about 1 / (1 - d) steps.
  if (has_ema()) be.upload(m_ema.data(), host.data(), m_n);
}

StepResult Replica::step(const BatchPrep::Batch& batch, int64_t step, double beta, double lr, bool stop_requested,
                         const std::function<void()>& while_device_runs) {
  Backend<float>& be = m_be;
  const int rows = batch.rows;
  const int64_t g_rows = batch.global_rows;
  const size_t P = m_n;
  // The steady-state step (a full batch, the KL weight at its final value) replays
  // one recorded forward/backward; other steps launch op by op. The first steady
  // step runs op by op too: it makes every lazily created resource (cuDNN plans and
  // workspace, reduction scratch), which must not be allocated while recording. The
  // recording holds the KL weight it was made with: under the cyclical schedule only
  // the steps at loss.beta replay it (after the warm-up, the linear one is always there).
  const bool steady = m_use_graph && rows == m_local_rows && g_rows == m_spec.train.batch_size &&
                      step >= m_spec.loss.kl_warmup_steps && beta == m_spec.loss.beta;
  const bool graph_step = steady && m_steady_warm;
  m_steady_warm = m_steady_warm || steady;
  if (!graph_step) be.fill(m_grads.data(), 0.0f, P);
  // A sharded optimizer's all-gather from the last step: the op-by-op forward pass waits
  // for each layer's parameters (the rest of the gather overlaps the earlier layers);
  // a recorded step has no per-layer hook.
  if (graph_step) m_sync->params_ready();
  StepResult result;
  if (rows == 0 && m_free_bits)
    result.kl_clamped_dims = exchange_kl(0, g_rows, 0.0f).clamped_dims;  // the collective, without rows
  m_sync->begin(step);
  // [rec sum, KL sum, ranks with a non-finite loss, ranks asked to stop, ranks whose
  // gradient norm is over train.skip_threshold, IWAE bound sum, then (hierarchical)
  // each latent group's KL sum]: one all-reduce for all of them.
  const int G = m_hvae ? m_hvae->layout().num_groups() : 0;
  std::vector<double> local(kStepSums + static_cast<size_t>(G), 0.0);
  local[3] = stop_requested ? 1.0 : 0.0;
  if (rows > 0) {
    float* const rec = m_losses.data();
    float* const kl = rec + m_local_rows;
    float* const bound = kl + m_local_rows;
    // Every micro-batch's losses are weighted by the whole global batch: their
    // gradients add up (+=) to the gradient of the full batch.
    const float w = 1.0f / static_cast<float>(g_rows), kw = static_cast<float>(beta) * w;
    const float b = static_cast<float>(beta);
    const bool dreg = m_spec.loss.dreg;
    // The one-pass results: rec and KL per row, and for iwae the bound (rec is then the
    // mean over the samples; the ELBO's pieces stay comparable with an elbo run's).
    const auto download_losses = [&](int first, int n) {
      be.download_async(rec + first, m_iwae ? m_vae->iw_rec() : m_model->rec(), n);
      be.download_async(kl + first, m_model->kl(), n);
      if (m_iwae) be.download_async(bound + first, m_vae->iw_bound(), n);
      if (m_hvae)
        be.download_async(m_kl_groups.data() + static_cast<size_t>(first) * m_hvae->layout().num_groups(),
                          m_hvae->kl_groups(), static_cast<size_t>(n) * m_hvae->layout().num_groups());
    };
    if (graph_step) {  // the recorded step reads the whole slice (no accumulation with graphs)
      be.upload_async(m_x.data(), batch.x, static_cast<size_t>(rows) * m_dim);
      be.normal(m_spec.seed, RngStream::Eps, static_cast<uint32_t>(step), static_cast<uint64_t>(batch.first), rows,
                m_eps_cols, m_eps.data());
    }
    if (graph_step && !m_graph) {
      try {
        m_graph = be.capture([&model = *m_model, vae = m_vae, &be = m_be, p = m_params.data(), g = m_grads.data(),
                              xp = m_x.data(), ep = m_eps.data(), rows, w, kw, b, dreg, iwae = m_iwae, P] {
          be.fill(g, 0.0f, P);
          if (iwae) {
            vae->forward_iw(p, xp, ep, rows, b);
            vae->backward_iw(p, g, xp, ep, rows, w, b, dreg);
          } else {
            model.forward(p, xp, ep, rows);
            model.backward(p, g, xp, ep, rows, w, kw);
          }
        });
      } catch (const Error& e) {
        // A driver or library that cannot record the step costs speed, not the run.
        m_use_graph = false;
        m_warn(std::string("the training step could not be recorded as a graph (") + e.what() +
               "); launching it op by op");
      }
    }
    if (graph_step && m_graph) {
      m_graph->launch();
      m_sync->ready_from(0);  // all buckets at once: a graph gives no per-layer hook for the overlap
      download_losses(0, rows);
    } else {
      if (graph_step) be.fill(m_grads.data(), 0.0f, P);  // the recording would have zeroed them
      // This rank's rows in micro-batches of m_micro_rows (train.accumulate), in order.
      // Each keeps its rows' positions in the global batch, so its eps are those of the
      // undivided batch. Only the last one's backward announces final buckets: the
      // reductions start there, once per update, never on a partial sum. The first
      // forward pass waits for a sharded optimizer's all-gather layer by layer; the
      // later ones find the parameters whole. Free bits run one micro-batch (the
      // config refuses accumulation with them): the floor needs the whole batch's KL.
      for (int first = 0; first < rows; first += m_micro_rows) {
        const int n = std::min(m_micro_rows, rows - first);
        const bool last = first + n == rows;
        be.upload_async(m_x.data(), batch.x + static_cast<size_t>(first) * m_dim, static_cast<size_t>(n) * m_dim);
        // eps keyed by the sample's position in the global batch: the same for any world size.
        // iwae: the k samples of an input are columns of its row, keyed by its position too.
        be.normal(m_spec.seed, RngStream::Eps, static_cast<uint32_t>(step), static_cast<uint64_t>(batch.first + first),
                  n, m_eps_cols, m_eps.data());
        const auto needed = [this](size_t end) { m_sync->params_ready_until(end); };
        const auto ready = [this](size_t offset) { m_sync->ready_from(offset); };
        const auto no_hook = std::function<void(size_t)>();
        if (m_iwae) {
          m_vae->forward_iw(m_params.data(), m_x.data(), m_eps.data(), n, b, needed);
          m_vae->backward_iw(m_params.data(), m_grads.data(), m_x.data(), m_eps.data(), n, w, b, dreg,
                             last ? ready : no_hook);
        } else {
          m_model->forward(m_params.data(), m_x.data(), m_eps.data(), n, needed);
          if (m_free_bits) {
            result.kl_clamped_dims = exchange_kl(n, g_rows, kw).clamped_dims;
            m_model->backward(m_params.data(), m_grads.data(), m_x.data(), m_eps.data(), n, w, m_kl_weights.data(),
                              ready);
          } else {
            m_model->backward(m_params.data(), m_grads.data(), m_x.data(), m_eps.data(), n, w, kw,
                              last ? ready : no_hook);
          }
        }
        // Ordered before the next micro-batch's forward overwrites the losses.
        download_losses(first, n);
      }
    }
    if (m_norm_with_losses) be.sum_squares_async(P, m_grads.data(), m_squared_norm.data());
    if (while_device_runs) while_device_runs();
    be.synchronize();
    for (int r = 0; r < rows; ++r) {
      local[0] += rec[r];
      local[1] += kl[r];
      if (m_iwae) local[5] += bound[r];
    }
    if (!std::isfinite(local[0]) || !std::isfinite(local[1]) || !std::isfinite(local[5])) local[2] = 1;
  }
  // Hierarchical: each group's KL summed over this rank's rows (over the ranks with the rest).
  for (int r = 0; r < rows; ++r)
    for (int l = 0; l < G; ++l) local[kStepSums + l] += m_kl_groups.data()[static_cast<size_t>(r) * G + l];
  result.nonfinite_here = local[2] > 0;
  sync_and_update(lr, local, result);
  result.kl_groups.assign(local.begin() + kStepSums, local.end());
  // The update was applied (every loss and the norm finite, not over the threshold).
  if (has_ema() && std::isfinite(result.grad_norm) && !result.over_threshold) update_ema();
  result.rec = local[0];
  result.kl = local[1];
  result.iw_bound = local[5];
  result.nonfinite_ranks = static_cast<int>(local[2]);
  result.stop_ranks = static_cast<int>(local[3]);
  return result;
}

// The gradient sync finishes, the norm of the summed gradient (before clipping) is
// taken and each rank votes on train.skip_threshold, the ranks agree on the losses, the
// non-finite, stop and threshold flags in one all-reduce, and only when every loss is
// finite, the norm finite and no rank voted to skip does the optimizer clip and update.
// Every rank holds the same norm (replicated: the same reduced gradient; sharded: the
// slices' squared norms all-reduced), so the votes agree anyway; counting them makes
// the decision common by construction, also where the norms could differ in the last
// bit. Sharded (ZeRO-1, dist.shard_optimizer): the sync was a reduce-scatter, the
// optimizer updates this rank's slice, and the all-gather of the parameters starts
// here, finishing during the next forward pass (params_ready_until). A skipped update
// changes no slice, so nothing needs gathering.
void Replica::sync_and_update(double lr, std::vector<double>& sums, StepResult& result) {
  m_sync->finish();  // a rank without rows this step still joins every bucket's reduction
  const double squared = m_norm_with_losses ? *m_squared_norm.data() : m_optim.squared_norm(m_grads.data());
  const double norm = std::sqrt(squared), threshold = m_spec.train.skip_threshold;
  sums[4] = threshold > 0 && std::isfinite(norm) && norm > threshold ? 1.0 : 0.0;
  m_comm.allreduce_sum(sums.data(), sums.size());
  if (sums[2] != 0) return;  // a loss not finite: no norm, no update (grad_norm stays NaN)
  result.grad_norm = norm;
  result.over_threshold = sums[4] != 0;
  if (!std::isfinite(norm) || result.over_threshold) return;
  m_optim.step(m_params.data(), m_grads.data(), lr, squared);
  m_sync->gather_params();  // sharded: every rank's updated slice to every rank
}

FreeBits Replica::exchange_kl(int rows, int64_t global_rows, float kl_weight) {
  // A sharded optimizer's parameter all-gather is complete after a forward pass; a rank
  // without rows waits for it here, so that no collective overlaps this one.
  m_sync->params_ready();
  if (m_hvae) {
    // The groups' KL summed over this rank's rows (the model's own per-group KL, in
    // double), then over the ranks: the floor sees the global batch's mean.
    const HvaeLayout& hl = m_hvae->layout();
    const int G = hl.num_groups();
    std::vector<double> sums(static_cast<size_t>(G), 0.0);
    if (rows > 0) {
      m_be.download(m_kl_groups.data(), m_hvae->kl_groups(), static_cast<size_t>(rows) * G);
      for (int r = 0; r < rows; ++r)
        for (int l = 0; l < G; ++l) sums[static_cast<size_t>(l)] += m_kl_groups.data()[static_cast<size_t>(r) * G + l];
    }
    m_comm.allreduce_sum(sums.data(), sums.size());
    std::vector<int> sizes;
    for (const HvaeGroup& g : hl.groups()) sizes.push_back(static_cast<int>(g.numel()));
    FreeBits fb = free_bits_groups(m_spec.loss, sums.data(), sizes, global_rows);
    if (rows > 0) {
      const std::vector<float> w = fb.weights(kl_weight);
      m_be.upload(m_kl_weights.data(), w.data(), w.size());
    }
    return fb;
  }
  std::vector<double> sums(static_cast<size_t>(m_latent), 0.0);
  if (rows > 0) {
    // L sums in double from [mu | logvar]: the same closed form as the per-row KL, kept
    // per dimension. A few KB from the device; the step waits here anyway (the all-reduce).
    m_be.download(m_mulv_host.data(), m_vae->mulv(), static_cast<size_t>(rows) * 2 * m_latent);
    add_kl_per_dim(rows, m_latent, m_mulv_host.data(), sums.data());
  }
  m_comm.allreduce_sum(sums.data(), sums.size());
  FreeBits fb = free_bits(m_spec.loss, sums.data(), m_latent, global_rows);
  if (rows > 0) {
    const std::vector<float> w = fb.weights(kl_weight);
    m_be.upload(m_kl_weights.data(), w.data(), w.size());
  }
  return fb;
}

void Replica::update_ema() {
  const double d = m_spec.optim.ema;
  // Sharded (dist.shard_optimizer): the average is kept whole on every rank, so it waits
  // for the parameters' all-gather here, giving up its overlap with the next forward
  // pass; averaging each rank's own slice and gathering the average only when it is
  // read would keep it (left for when both are used together at scale).
  m_sync->params_ready();
  m_be.axpby(m_n, static_cast<float>(1.0 - d), m_params.data(), static_cast<float>(d), m_ema.data());
}

void Replica::download_ema(float* ema) { m_be.download(ema, m_ema.data(), m_n); }

void Replica::load_ema(const float* ema) { m_be.upload(m_ema.data(), ema, m_n); }

const float* Replica::params() {
  m_sync->params_ready();  // a sharded optimizer's all-gather may still be in flight
  return m_params.data();
}

void Replica::gather_state(float* params, float* exp_avg, float* exp_avg_sq) {
  m_sync->params_ready();
  if (const ShardPlan* shards = m_sync->shard_plan()) {
    // Every rank sends its slice of the moments; the file holds them whole, so any
    // world size resumes, sharded or not.
    std::vector<float> m(m_optim.owned_elems()), v(m_optim.owned_elems());
    m_optim.download_moments(m.data(), v.data());
    gather_slices_to_root(m_comm, *shards, m.data(), v.data(), exp_avg, exp_avg_sq);
  } else if (m_comm.is_root()) {
    m_optim.download_moments(exp_avg, exp_avg_sq);
  }
  if (m_comm.is_root()) m_be.download(params, m_params.data(), m_n);
}

void Replica::download_params(float* params) {
  m_sync->params_ready();
  m_be.download(params, m_params.data(), m_n);
}

void Replica::load_state(const float* params, const float* exp_avg, const float* exp_avg_sq, int64_t adam_steps) {
  m_sync->params_ready();  // nothing may still write the parameters
  m_be.upload(m_params.data(), params, m_n);
  m_optim.load_moments(exp_avg, exp_avg_sq);  // this rank's slice when sharded
  m_optim.set_steps_taken(adam_steps);
}

std::string Replica::describe_optimizer() const {
  const double whole = 2.0 * static_cast<double>(m_n) * sizeof(float);
  return std::string(choice_name(m_spec.optim.type)) + ", moments " + format_bytes(2.0 * static_cast<double>(m_optim.owned_elems()) *
                                                         sizeof(float)) + " per rank (" +
         (m_sync->shard_plan() != nullptr ? "sharded over " + std::to_string(m_comm.size()) +
                                                " rank(s), dist.shard_optimizer: true; whole: " + format_bytes(whole)
                                          : std::string("whole on every rank")) +
         ")";
}

AllreduceRate Replica::measure_allreduce(int iters) {
  return elbo::measure_allreduce(*m_sync, m_be, m_grads.data(), m_n, m_comm.size(), iters);
}

std::string SkipPolicy::skip(Communicator& comm, const StepResult& r, TrainState& st) {
  const int top = comm.allreduce_max(r.nonfinite_here ? -comm.rank() : INT_MIN);
  std::string what = "step " + std::to_string(st.step) + ": ";
  if (r.over_threshold) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "the gradient norm %.6g exceeds train.skip_threshold %.6g", r.grad_norm,
                  m_train.skip_threshold);
    what += buf;
  } else {
    what += top == INT_MIN ? "the gradient is not finite (every rank's loss is finite)"
                           : "the loss is not finite on rank " + std::to_string(-top) +
                                 (r.nonfinite_ranks > 1
                                      ? " (and " + std::to_string(r.nonfinite_ranks - 1) + " other rank(s))"
                                      : "");
    if (m_train.on_nonfinite == NonfinitePolicy::Abort)
      throw AgreedError(ErrorKind::Numeric, what + "; lower optim.lr, set optim.grad_clip, or set "
                                                   "train.on_nonfinite: skip");
  }
  ++st.skipped_steps;
  ++m_in_a_row;
  const int64_t done = st.step - m_first_step;
  const int64_t skipped = st.skipped_steps - m_skipped_before;  // the share counts this job's steps
  const bool too_many_in_a_row = m_in_a_row >= m_train.max_consecutive_skips;
  const bool too_large_a_share = st.skipped_steps > m_train.max_consecutive_skips &&
                                 static_cast<double>(skipped) > m_train.max_skip_fraction * static_cast<double>(done);
  // Once a large norm skips, the next batches often skip too (nothing changed the
  // parameters): the limits end such a run instead of letting it skip forever.
  const std::string advice =
      r.over_threshold
          ? "raise train.skip_threshold (the progress lines show the norms as |g|; 0 turns it off), lower "
            "optim.lr or set optim.grad_clip"
          : "lower optim.lr, set optim.grad_clip, or check the data for NaN/Inf";
  if (too_many_in_a_row || too_large_a_share)
    throw AgreedError(
        ErrorKind::Numeric,
        what + "; " +
            (too_many_in_a_row
                 ? std::to_string(m_in_a_row) + " steps in a row skipped (train.max_consecutive_skips: " +
                       std::to_string(m_train.max_consecutive_skips) + ")"
                 : std::to_string(skipped) + " of " + std::to_string(done) +
                       " steps skipped (train.max_skip_fraction: " + std::to_string(m_train.max_skip_fraction) +
                       ")") +
            "; the run is not learning: " + advice);
  return what + (r.over_threshold ? "; skipping this step (train.skip_threshold)"
                                  : "; skipping this step (train.on_nonfinite: skip)");
}

}  // namespace elbo
