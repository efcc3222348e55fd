// The training loop. Every rank runs the same code on its slice of each global batch;
// the order of samples and every eps are functions of (seed, step, position), so N
// ranks reproduce one rank up to float summation order. The parts it drives:
// batch_prep (where batches come from), replica (one step on the flat buffers), resume
// (checkpoints in and out) and run_log (what the run shows and writes).
#include "elbo/train/trainer.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "elbo/train/batch_prep.hpp"
#include "elbo/train/best_model.hpp"
#include "elbo/train/footprint.hpp"
#include "elbo/train/replica.hpp"
#include "elbo/train/resume.hpp"
#include "elbo/train/run_log.hpp"
#include "elbo/train/stop_signal.hpp"
#include "elbo/util/run_lock.hpp"

namespace elbo {

namespace {

// Held-out evaluation: during training quietly on the first eval.max_samples test
// samples; at the end on all of them, with the IWAE bound.
EvalOptions eval_options(const ExperimentSpec& spec, bool at_end) {
  EvalOptions eo;
  eo.batch_size = spec.eval.batch_size;
  eo.seed = spec.seed;
  eo.binarize = spec.data.binarize;
  if (at_end) {
    eo.iw_samples = spec.eval.iw_samples;
    eo.source = spec.source;
  } else {
    eo.max_samples = spec.eval.max_samples;
    eo.progress = false;
  }
  return eo;
}

// Rank 0: the arrays of a model file (model.h5, best.h5). With optim.ema, /params is
// the moving average (what eval and sample load) and the parameters go beside it.
void model_arrays(Replica& replica, double ema, std::vector<float>& params, std::vector<float>& raw,
                  ModelFileExtras& extras) {
  params.resize(replica.num_params());
  if (!replica.has_ema()) {
    replica.download_params(params.data());
    return;
  }
  replica.download_ema(params.data());
  raw.resize(replica.num_params());
  replica.download_params(raw.data());
  extras.raw_params = raw.data();
  extras.ema = ema;
}

}  // namespace

int threads_per_rank(int requested, int local_ranks) {
  if (requested > 0) return requested;
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return std::max(1, static_cast<int>(hw) / std::max(1, local_ranks));
}

TrainResult train(const ExperimentSpec& spec, Communicator& comm, std::ostream& log, const TrainOptions& options) {
  const int world = comm.size(), rank = comm.rank();
  const bool root = comm.is_root();
  comm.set_timeout(spec.dist.timeout_s);
  comm.set_min_link_mbps(spec.dist.min_link_mbps);

  // Stop requests count from here (the handlers went in before MPI started): one during
  // start-up ends the job at the first agreement point with kExitStopped.
  StopSignals stop(spec.checkpoint.grace_s, "rank " + std::to_string(rank) + " on " + comm.world().host);
  TrainResult result;
  // Whether any rank was asked to stop; a collective, so every rank takes the same branch.
  const auto stop_agreed = [&] { return comm.allreduce_max(stop.requested() ? 1 : 0) > 0; };
  if (const char* marker = std::getenv("ELBO_STOP_FILE"); marker != nullptr && root) stop.set_marker(marker);
  // A stop stuck in a collective (a stalled peer) gives up just before the grace
  // period ends, naming the ranks that do not answer, rather than dying unexplained.
  comm.set_stop_deadline([&stop] { return stop.grace_left(); }, kExitForced);
  struct ClearStopDeadline {
    Communicator& comm;
    ~ClearStopDeadline() { comm.set_stop_deadline(nullptr, 0); }
  } clear_stop_deadline{comm};

  // --- setup, each phase agreed by all ranks so a bad input stops the job everywhere ---
  RunLock run_lock;  // rank 0: this job owns output.dir until it returns
  collectively(comm, [&] {
    if (spec.train.batch_size % world != 0)
      throw config_error(spec.source + ": train.batch_size: " + std::to_string(spec.train.batch_size) +
                         " is not divisible by the number of ranks (" + std::to_string(world) +
                         "); the global batch is split evenly over the ranks");
    // Accumulation divides each rank's slice into equal micro-batches (a short last
    // batch of an epoch is cut into micro-batches of the same size, the last one shorter).
    if (spec.train.batch_size % (world * spec.train.accumulate) != 0)
      throw config_error(spec.source + ": train.batch_size: " + std::to_string(spec.train.batch_size) +
                         " is not divisible by the number of ranks (" + std::to_string(world) +
                         ") times train.accumulate (" + std::to_string(spec.train.accumulate) +
                         "); each rank's share of the batch is split into train.accumulate equal micro-batches");
    if (!root) return;
    if (std::filesystem::exists(spec.output.dir) && !std::filesystem::is_directory(spec.output.dir))
      throw config_error("output.dir: '" + spec.output.dir + "' exists and is not a directory");
    run_lock = RunLock(spec.output.dir);
    prepare_output_dir(spec, options.resume);
  });
  TrainingData data;
  open_training_data(spec, comm, data);
  std::unique_ptr<ModelLayout> layout_holder;
  collectively(comm,
               [&] { layout_holder = make_layout(spec.model, data.input_shape); });  // shape errors name the layer
  const ModelLayout& layout = *layout_holder;
  const int local_rows = static_cast<int>(spec.train.batch_size / world);
  const int threads = threads_per_rank(spec.train.threads, comm.world().local_size);
  Placement place;
  std::unique_ptr<Backend<float>> backend;
  collectively(comm, [&] {
    place = resolve_placement(spec, comm.world(), probe_backends());
    backend = make_backend<float>(place.device, threads, place.gpu);
    backend->set_deterministic(spec.train.deterministic);
  });
  Backend<float>& be = *backend;
  // Refuse what cannot run (more steps than int64 holds, buffers beyond the memory)
  // before allocating any of it.
  StepPlan plan;
  MemoryEstimate need;
  collectively(comm, [&] {
    plan = plan_steps(spec, data.n, world);
    need = estimate_train_memory(layout, local_rows, place.device, spec.dist.shard_optimizer ? world : 1,
                                 local_rows / spec.train.accumulate, iw_samples(spec.loss));
    if (spec.optim.ema > 0) add_ema_memory(need, layout);
    if (data.test)
      add_eval_memory(need, layout, data::rank_slice(data.test->size(), rank, world).count, spec.eval.iw_samples,
                      spec.eval.batch_size, "eval.batch_size or eval.iw_samples");
    check_memory(need, place.device, host_memory_per_rank(comm.world().local_size), spec.source);
  });
  const int64_t per_epoch = plan.per_epoch, total_steps = plan.total;

  RunLog run_log(spec, log, root);
  Replica replica(spec, comm, be, layout, place, need, local_rows, data.dim,
                  [&run_log](const std::string& warning) { run_log.warning(warning); });
  BatchPrep batches(be, data, spec, rank, world, local_rows);
  Checkpoints checkpoints(spec, root, data.input_shape, layout, replica);
  TrainState fresh;
  fresh.total_steps = total_steps;
  fresh.world_size = world;
  fresh.train_samples = data.n;
  fresh.seed = spec.seed;
  const ResumePoint resumed = resume_run(options.resume, spec, comm, data, fresh, replica);
  TrainState st = resumed.state;
  run_log.start(comm, be, place, threads, replica, data, batches, layout, plan, resumed);
  if (world > 1 && spec.dist.self_test) {
    // A startup figure for the interconnect, comparable with nccl-tests' busbw.
    const AllreduceRate r = replica.measure_allreduce(20);
    char line[200];
    std::snprintf(line, sizeof(line), "%s self-test: %.2f MB gradient buffer in %.3f ms | algbw %.2f GB/s | "
                  "busbw %.2f GB/s", replica.sharded() ? "reduce-scatter + all-gather" : "all-reduce",
                  static_cast<double>(replica.num_params()) * sizeof(float) / 1e6, r.seconds * 1e3, r.algbw_gbs,
                  r.busbw_gbs);
    run_log.line(line);
  }
  // A stop asked for during start-up (data loading, the self-test): nothing new to
  // save, so no checkpoint; the next start does the same work again.
  if (stop_agreed()) {
    run_log.line("stop requested before the first step (at step " + std::to_string(st.step) +
                 "): no checkpoint needed; continue with --resume auto");
    result.stopped = true;
    result.stop_signal = stop.signal_number();
    result.steps = st.step;
    stop.write_marker();
    return result;
  }

  // --- the loop ---
  const int64_t first_step = st.step;
  SkipPolicy skips(spec.train, first_step, st.skipped_steps);
  // A run that stopped early continues as a finished one: no more training, the final
  // checkpoint, model.h5 and evaluation again (unless train.patience was raised).
  bool early_stop = data.test && patience_exhausted(spec.train, st);
  result.early_stopped = early_stop;
  if (early_stop)
    run_log.line("train.patience (" + std::to_string(spec.train.patience) + ") was exhausted at step " +
                 std::to_string(st.step) + " (best test -ELBO at step " + std::to_string(st.best_step) +
                 "): no further training");
  run_log.begin_training(first_step, total_steps);
  int64_t step = st.step;
  int64_t epoch = st.epoch;
  for (; epoch < spec.train.epochs && step < total_steps && !result.stopped && !early_stop; ++epoch) {
    const int64_t first_batch = epoch == st.epoch ? st.batch_in_epoch : 0;
    run_log.begin_epoch(epoch, per_epoch);
    for (int64_t b = first_batch; b < per_epoch && step < total_steps; ++b) {
      const BatchPrep::Batch batch = batches.get(epoch, b);
      const double beta = kl_weight(spec.loss, step, total_steps), lr = learning_rate(spec.optim, step, total_steps);
      const bool last_in_epoch = b + 1 == per_epoch;
      const StepResult r = replica.step(batch, step, beta, lr, stop.requested(), [&] {
        // While the device works: the next batch on the host.
        if (step + 1 < total_steps && !(last_in_epoch && epoch + 1 >= spec.train.epochs))
          batches.prefetch(last_in_epoch ? epoch + 1 : epoch, last_in_epoch ? 0 : b + 1);
      });
      ++step;
      st.step = step;
      st.samples_seen += batch.global_rows;
      st.epoch = last_in_epoch ? epoch + 1 : epoch;
      st.batch_in_epoch = last_in_epoch ? 0 : b + 1;
      if (r.applied()) {
        skips.applied();
        st.adam_steps = replica.adam_steps();
      } else {
        run_log.warning(skips.skip(comm, r, st));
      }
      run_log.count(r, batch.global_rows, batches.take_busy_seconds());

      // Held-out metrics and pictures every eval.every steps (all ranks evaluate their
      // part of the first eval.max_samples test samples; nothing here touches the
      // training state, so resumed runs stay bit-identical).
      const bool eval_now = data.test && spec.eval.every > 0 && step % spec.eval.every == 0 && step < total_steps;
      EvalResult test_now;
      run_log.batch_done(b + 1);
      if (eval_now)
        run_log.untimed([&] {
          test_now = evaluate(layout, be, replica.eval_params(), *data.test, comm, eval_options(spec, false));
          collectively(comm,
                       [&] { run_log.periodic_eval(step, test_now, layout, be, replica.eval_params(), *data.test); });
          // Rank 0's bound decides, so that every rank takes the same branch even if the
          // all-reduced sums were to differ in the last bit between ranks.
          double bound = test_now.neg_elbo;
          comm.broadcast(&bound, sizeof(bound), 0);
          const TrainState before = st;
          if (record_evaluation(st, step, bound))
            collectively(comm, [&] {  // best.h5 before any checkpoint that names this step as the best
              if (!root) return;
              // Model files and checkpoints are built as an in-memory HDF5 file of one
              // name, one at a time: a checkpoint still being written goes first.
              checkpoints.wait();
              std::vector<float> host, raw;
              ModelFileExtras extras;
              model_arrays(replica, spec.optim.ema, host, raw, extras);
              extras.has_bound = true;
              extras.bound = bound;
              extras.eval_samples = test_now.samples;
              run_log.write_best(data.input_shape, layout, host.data(), st, before, extras);
            });
        });
      if (step % spec.train.log_every == 0 || last_in_epoch || step == total_steps || eval_now)
        run_log.end_interval(st, epoch, beta, lr, eval_now ? &test_now : nullptr);

      if (r.stop_ranks > 0) {  // some rank was asked to stop: all stop here, after a checkpoint
        collectively(comm, [&] { checkpoints.save(st, true); });
        result.stopped = true;
        result.stop_signal = stop.signal_number();
        run_log.line("stop requested (signal on " + std::to_string(r.stop_ranks) + " rank(s)) at step " +
                     std::to_string(step) + ": wrote " + checkpoints.last_path() + "; continue with --resume auto");
        break;
      }
      if (eval_now && patience_exhausted(spec.train, st)) {  // ends like a finished run, below
        early_stop = true;
        result.early_stopped = true;
        char best[32];
        std::snprintf(best, sizeof(best), "%.4f", st.best_bound);
        run_log.line("early stop at step " + std::to_string(step) + ": " + std::to_string(st.evals_since_best) +
                     " evaluation(s) without a better test -ELBO than " + best + " at step " +
                     std::to_string(st.best_step) + " (train.patience: " + std::to_string(spec.train.patience) +
                     "); best.h5 holds that model");
        break;
      }
      if (spec.checkpoint.every > 0 && step % spec.checkpoint.every == 0 && step < total_steps)
        checkpoints.save(st, false);
    }
    run_log.end_epoch();
  }
  if (world > 1 && step > first_step) {
    // Timing-free evidence that accumulation reduces once per update, not per micro-batch.
    const GradientSync::Counts c = replica.gradient_sync_counts();
    run_log.line("gradient sync: " + std::to_string(c.rounds) + " reduction round(s), " + std::to_string(c.buckets) +
                 " bucket reduction(s), for " + std::to_string(step - first_step) + " update(s) of " +
                 std::to_string(spec.train.accumulate) + " micro-batch(es) each");
  }
  result.steps = step;
  result.epochs_completed = epoch;
  result.checkpoint_path = checkpoints.last_path();
  result.last_neg_elbo = run_log.last_neg_elbo();
  if (batches.stream() != nullptr && step > first_step)
    run_log.stream_summary(comm, batches.stream()->stats(),
                           static_cast<double>(step - first_step) / static_cast<double>(per_epoch),
                           static_cast<double>(data.n) * data.dim);
  if (result.stopped) {
    stop.write_marker();
    return result;
  }
  // The final checkpoint: the run can be extended later (more epochs) with --resume.
  // (save() waits for the previous write, and its failure surfaces there, after every
  // rank took part in the moments gather.)
  collectively(comm, [&] { checkpoints.save(st, true); });
  result.checkpoint_path = checkpoints.last_path();

  // --- outputs: rank 0 writes, everyone agrees it worked ---
  result.model_path = (std::filesystem::path(spec.output.dir) / "model.h5").string();
  collectively(comm, [&] {
    if (!root) return;
    std::vector<float> host, raw;
    ModelFileExtras extras;
    model_arrays(replica, spec.optim.ema, host, raw, extras);
    run_log.write_model(result.model_path, data.input_shape, layout, host.data(), step, epoch, extras);
  });

  // Everything the run must keep is on disk now. A stop from here on (the final
  // evaluation can take long) ends the job at once as resumable: --resume auto finds
  // the final checkpoint, trains no further, and evaluates again.
  stop.exit_at_once("elbo: rank " + std::to_string(rank) + ": stop requested after training: model.h5 and the final "
                    "checkpoint are written; the final evaluation did not finish (continue with --resume auto to "
                    "run it, or run elbo eval)");
  if (data.test && spec.eval.at_end && stop_agreed()) {
    run_log.line("stop requested after training: " + result.model_path + " and the final checkpoint are written; "
                 "the final evaluation is left for --resume auto");
    result.stopped = true;
    result.stop_signal = stop.signal_number();
    stop.write_marker();
    return result;
  }
  if (data.test && spec.eval.at_end) {
    result.eval = evaluate(layout, be, replica.eval_params(), *data.test, comm, eval_options(spec, true));
    result.evaluated = true;
    collectively(comm, [&] {
      run_log.final_eval(result.steps, result.eval, result.model_path, layout, be, replica.eval_params(), *data.test);
    });
  }
  return result;
}

}  // namespace elbo
