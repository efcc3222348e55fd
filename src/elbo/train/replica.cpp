// One data-parallel replica and its training step (see replica.hpp).
#include "elbo/train/replica.hpp"

#include <climits>
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

}  // namespace

Replica::Replica(const ExperimentSpec& spec, Communicator& comm, Backend<float>& be, const VaeLayout& layout,
                 const Placement& place, const MemoryEstimate& need, int local_rows, int dim,
                 std::function<void(const std::string&)> warn)
    : m_spec(spec), m_comm(comm), m_be(be), m_local_rows(local_rows), m_dim(dim), m_latent(layout.latent()),
      m_n(layout.num_params()),
      m_params(allocating(need.items[MemoryEstimate::kModelState], spec.source, [&] { return Buffer<float>(be, m_n); })),
      m_grads(allocating(need.items[MemoryEstimate::kModelState], spec.source, [&] { return Buffer<float>(be, m_n); })),
      m_sync(make_sync(spec, comm, place, be, m_grads.data(), m_params.data(), m_n)),
      m_model(allocating(need.items[MemoryEstimate::kActivations], spec.source,
                         [&] { return Vae<float>(layout, be, local_rows); })),
      m_optim(allocating(need.items[MemoryEstimate::kModelState], spec.source,
                         [&] { return make_optimizer(spec.optim, be, m_n, *m_sync, comm); })),
      m_ema(spec.optim.ema > 0 ? allocating(ema_memory(layout), spec.source, [&] { return Buffer<float>(be, m_n); })
                               : Buffer<float>()),
      m_x(be, static_cast<size_t>(local_rows) * dim),
      m_eps(be, static_cast<size_t>(local_rows) * m_latent),
      m_losses(be, 2 * static_cast<size_t>(local_rows)),
      m_norm_with_losses(comm.size() == 1),
      m_squared_norm(be, 1),
      // auto: on for one GPU replica, where nothing overlaps with the backward pass and
      // launch overhead is what a small batch pays for; with several ranks the per-layer
      // bucketed all-reduce is worth more than the saved launches.
      m_use_graph(spec.train.cuda_graph == GraphMode::On ||
                  (spec.train.cuda_graph == GraphMode::Auto && place.device == DeviceKind::Cuda && comm.size() == 1)),
      m_warn(std::move(warn)) {
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
  // workspace, reduction scratch), which must not be allocated while recording.
  const bool steady = m_use_graph && rows == m_local_rows && g_rows == m_spec.train.batch_size &&
                      step >= m_spec.loss.kl_warmup_steps;
  const bool graph_step = steady && m_steady_warm;
  m_steady_warm = m_steady_warm || steady;
  if (!graph_step) be.fill(m_grads.data(), 0.0f, P);
  // A sharded optimizer's all-gather from the last step: the op-by-op forward pass waits
  // for each layer's parameters (the rest of the gather overlaps the earlier layers);
  // a recorded step has no per-layer hook.
  if (graph_step) m_sync->params_ready();
  m_sync->begin(step);
  // [rec sum, KL sum, ranks with a non-finite loss, ranks asked to stop]
  double local[4] = {0, 0, 0, stop_requested ? 1.0 : 0.0};
  if (rows > 0) {
    float* const rec = m_losses.data();
    float* const kl = rec + m_local_rows;
    be.upload_async(m_x.data(), batch.x, static_cast<size_t>(rows) * m_dim);
    // eps keyed by the sample's position in the global batch: the same for any world size.
    be.normal(m_spec.seed, RngStream::Eps, static_cast<uint32_t>(step), static_cast<uint64_t>(batch.first), rows,
              m_latent, m_eps.data());
    const float w = 1.0f / static_cast<float>(g_rows), kw = static_cast<float>(beta) * w;
    if (graph_step && !m_graph) {
      try {
        m_graph = be.capture([&model = m_model, &be = m_be, p = m_params.data(), g = m_grads.data(), xp = m_x.data(),
                              ep = m_eps.data(), rows, w, kw, P] {
          be.fill(g, 0.0f, P);
          model.forward(p, xp, ep, rows);
          model.backward(p, g, xp, ep, rows, w, kw);
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
    } else {
      if (graph_step) be.fill(m_grads.data(), 0.0f, P);  // the recording would have zeroed them
      m_model.forward(m_params.data(), m_x.data(), m_eps.data(), rows,
                      [this](size_t end) { m_sync->params_ready_until(end); });
      m_model.backward(m_params.data(), m_grads.data(), m_x.data(), m_eps.data(), rows, w, kw,
                       [this](size_t offset) { m_sync->ready_from(offset); });
    }
    be.download_async(rec, m_model.rec(), rows);
    be.download_async(kl, m_model.kl(), rows);
    if (m_norm_with_losses) be.sum_squares_async(P, m_grads.data(), m_squared_norm.data());
    if (while_device_runs) while_device_runs();
    be.synchronize();
    for (int r = 0; r < rows; ++r) {
      local[0] += rec[r];
      local[1] += kl[r];
    }
    if (!std::isfinite(local[0]) || !std::isfinite(local[1])) local[2] = 1;
  }
  StepResult result;
  result.nonfinite_here = local[2] > 0;
  result.grad_norm = sync_and_update(lr, local);
  if (has_ema() && std::isfinite(result.grad_norm)) update_ema();  // a finite norm: the update was applied
  result.rec = local[0];
  result.kl = local[1];
  result.nonfinite_ranks = static_cast<int>(local[2]);
  result.stop_ranks = static_cast<int>(local[3]);
  return result;
}

// The gradient sync finishes, the ranks agree on the losses (one all-reduce, which
// also carries the non-finite and stop flags), and only when every rank's loss is
// finite does the optimizer take the norm, clip and update. Sharded (ZeRO-1,
// dist.shard_optimizer): the sync was a reduce-scatter, the optimizer updates this
// rank's slice, and the all-gather of the parameters starts here, finishing during
// the next forward pass (params_ready_until).
double Replica::sync_and_update(double lr, double sums[4]) {
  m_sync->finish();  // a rank without rows this step still joins every bucket's all-reduce
  m_comm.allreduce_sum(sums, 4);
  if (sums[2] != 0) return std::numeric_limits<double>::quiet_NaN();  // not applied if non-finite
  const double norm = m_norm_with_losses ? m_optim.step(m_params.data(), m_grads.data(), lr, *m_squared_norm.data())
                                         : m_optim.step(m_params.data(), m_grads.data(), lr);
  m_sync->gather_params();  // sharded: every rank's updated slice to every rank
  return norm;
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
  what += top == INT_MIN ? "the gradient is not finite (every rank's loss is finite)"
                         : "the loss is not finite on rank " + std::to_string(-top) +
                               (r.nonfinite_ranks > 1
                                    ? " (and " + std::to_string(r.nonfinite_ranks - 1) + " other rank(s))"
                                    : "");
  if (m_train.on_nonfinite == NonfinitePolicy::Abort)
    throw AgreedError(ErrorKind::Numeric, what + "; lower optim.lr, set optim.grad_clip, or set "
                                                 "train.on_nonfinite: skip");
  ++st.skipped_steps;
  ++m_in_a_row;
  const int64_t done = st.step - m_first_step;
  const int64_t skipped = st.skipped_steps - m_skipped_before;  // the share counts this job's steps
  const bool too_many_in_a_row = m_in_a_row >= m_train.max_consecutive_skips;
  const bool too_large_a_share = st.skipped_steps > m_train.max_consecutive_skips &&
                                 static_cast<double>(skipped) > m_train.max_skip_fraction * static_cast<double>(done);
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
            "; the run is not learning: lower optim.lr, set optim.grad_clip, or check the data for NaN/Inf");
  return what + "; skipping this step (train.on_nonfinite: skip)";
}

}  // namespace elbo
