// Training loop. Every rank runs the same code on its slice of each global batch;
// the order of samples and every eps are functions of (seed, step, position), so
// N ranks reproduce one rank up to float summation order.
#include "elbo/train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <ostream>
#include <span>
#include <thread>

#include "elbo/ckpt/model_file.hpp"
#include "elbo/data/sampler.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/dist/grad_sync.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/optim/adam.hpp"
#include "elbo/util/files.hpp"

namespace elbo {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

std::string hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--:--";
  auto s = static_cast<long long>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%02lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

// Files of a finished or running job; refusing to reuse the directory protects them.
const char* const kRunFiles[] = {"model.h5", "metrics.csv", "spec.yaml", "eval.yaml"};

void prepare_output_dir(const OutputSpec& out) {
  fs::path dir(out.dir);
  if (fs::exists(dir) && !fs::is_directory(dir))
    throw config_error("output.dir: '" + out.dir + "' exists and is not a directory");
  if (!out.overwrite) {
    for (const char* f : kRunFiles)
      if (fs::exists(dir / f))
        throw config_error("output.dir: '" + out.dir + "' already holds a run (" + f +
                           "); choose another output.dir or pass --set output.overwrite=true");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw io_error("cannot create output directory '" + out.dir + "': " + ec.message());
}

// Interval statistics for the progress line, summed over the global batch.
struct Interval {
  double rec = 0, kl = 0, samples = 0, grad_norm = 0;
  int64_t steps = 0;
  Clock::time_point start = Clock::now();
};

// The samples a run trains on: the split, or its first data.max_samples.
int64_t training_samples(const ExperimentSpec& spec, const data::ShardSet& set) {
  return spec.data.max_samples > 0 ? std::min(spec.data.max_samples, set.size()) : set.size();
}

}  // namespace

int threads_per_rank(int requested, int local_ranks) {
  if (requested > 0) return requested;
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return std::max(1, static_cast<int>(hw) / std::max(1, local_ranks));
}

TrainResult train(const ExperimentSpec& spec, Communicator& comm, std::ostream& log) {
  const int world = comm.size(), rank = comm.rank();
  const bool root = comm.is_root();
  comm.set_timeout(spec.dist.timeout_s);

  // --- setup, each phase agreed by all ranks so a bad input stops the job everywhere ---
  collectively(comm, [&] {
    if (spec.train.batch_size % world != 0)
      throw config_error(spec.source + ": train.batch_size: " + std::to_string(spec.train.batch_size) +
                         " is not divisible by the number of ranks (" + std::to_string(world) +
                         "); the global batch is split evenly over the ranks");
    if (root) prepare_output_dir(spec.output);
  });

  std::optional<data::ShardSet> train_set, test_set;
  collectively(comm, [&] {
    train_set.emplace(data::ShardSet::open(spec.data.train));
    std::vector<int> shape = {train_set->channels(), train_set->height(), train_set->width()};
    if (!spec.data.shape.empty() && spec.data.shape != shape)
      throw data_error(spec.data.train + ": shards hold samples of shape " + shape_string(shape, "[]") +
                       " but the spec (" + spec.source + ", data.shape) says " + shape_string(spec.data.shape, "[]"));
    if (!spec.data.test.empty() && spec.eval.at_end) {
      test_set.emplace(data::ShardSet::open(spec.data.test));
      std::vector<int> tshape = {test_set->channels(), test_set->height(), test_set->width()};
      if (tshape != shape)
        throw data_error(spec.data.test + ": test shards hold samples of shape " + shape_string(tshape, "[]") +
                         " but the training shards (" + spec.data.train + ") hold " + shape_string(shape, "[]"));
    }
    const int64_t n = training_samples(spec, *train_set);
    if (n == 0) throw data_error(spec.data.train + ": the training split is empty");
    if (spec.train.drop_last && n < spec.train.batch_size)
      throw config_error(spec.source + ": train.batch_size " + std::to_string(spec.train.batch_size) +
                         " exceeds the " + std::to_string(n) + " training samples with train.drop_last: true");
  });

  const std::vector<int> input_shape = {train_set->channels(), train_set->height(), train_set->width()};
  const int64_t n = training_samples(spec, *train_set);
  const int D = static_cast<int>(train_set->sample_dim());
  const VaeLayout layout(spec.model, D);
  const int L = layout.latent();
  const int64_t B = spec.train.batch_size;
  const int local_rows = static_cast<int>(B / world);
  const int threads = threads_per_rank(spec.train.threads, comm.world().local_size);
  Placement place;
  std::unique_ptr<Backend<float>> backend;
  collectively(comm, [&] {
    place = resolve_placement(spec, comm.world(), probe_backends());
    backend = make_backend<float>(place.device, threads, place.gpu);
  });
  Backend<float>& be = *backend;

  // --- the replica: one flat parameter buffer, one flat gradient buffer ---
  const size_t P = layout.num_params();
  Buffer<float> params(be, P), grads(be, P);
  const auto bucket_elems = static_cast<size_t>(spec.dist.bucket_mb * 1e6 / sizeof(float));
  std::unique_ptr<GradientSync> sync;
  collectively(comm, [&] { sync = make_gradient_sync(place.communicator, comm, be, grads.data(), P, bucket_elems); });
  const auto grads_ready = [&](size_t offset) { sync->ready_from(offset); };
  {
    std::vector<double> init = layout.init_params(spec.seed);
    std::vector<float> host(init.begin(), init.end());
    // Every rank computes the same init; the broadcast makes "identical replicas" a
    // guarantee rather than an assumption about libm on heterogeneous nodes.
    comm.broadcast(host.data(), host.size() * sizeof(float), 0);
    be.upload(params.data(), host.data(), P);
  }
  Vae<float> model(layout, be, local_rows);
  Adam<float> optim(spec.optim, be, P);
  Buffer<float> x(be, static_cast<size_t>(local_rows) * D), eps(be, static_cast<size_t>(local_rows) * L);
  std::vector<uint8_t> pixels(static_cast<size_t>(local_rows) * D);
  std::vector<float> xh(static_cast<size_t>(local_rows) * D), rec(local_rows), kl(local_rows);

  const int64_t per_epoch = data::batches_per_epoch(n, B, spec.train.drop_last);
  int64_t total_steps = per_epoch * spec.train.epochs;
  if (spec.train.max_steps > 0) total_steps = std::min(total_steps, spec.train.max_steps);

  fs::path out_dir(spec.output.dir);
  std::ofstream csv;
  if (root) {
    std::string resolved = dump_spec(spec);
    log << "elbo train: " << spec.name << " | " << world << " rank(s) | backend " << be.name()
        << (place.device == DeviceKind::Cpu ? " x " + std::to_string(threads) + " BLAS thread(s)"
                                            : " (GPU " + std::to_string(place.gpu) + " on rank 0)")
        << " (" << place.why << ")\n"
        << "gradients: " << sync->describe() << "\n"
        << "data: " << n << " training samples of shape " << shape_string(input_shape, "[]") << " from " << spec.data.train
        << "\nmodel: " << P << " parameters | " << total_steps << " steps (" << per_epoch << " per epoch)\n"
        << "resolved spec:\n" << resolved << std::flush;
    write_text_file_atomic((out_dir / "spec.yaml").string(), resolved);
    csv.open(out_dir / "metrics.csv", std::ios::trunc);
    if (!csv) throw io_error("cannot write " + (out_dir / "metrics.csv").string());
    csv << "step,epoch,samples,neg_elbo,rec,kl,beta,lr,grad_norm,samples_per_s,elapsed_s\n";
  }
  if (world > 1 && spec.dist.self_test) {
    // A startup figure for the interconnect, comparable with nccl-tests' busbw.
    const AllreduceRate r = measure_allreduce(*sync, be, grads.data(), P, world, 20);
    if (root) {
      char line[200];
      std::snprintf(line, sizeof(line), "all-reduce self-test: %.2f MB gradient buffer in %.3f ms | algbw %.2f GB/s | "
                    "busbw %.2f GB/s\n", static_cast<double>(P) * sizeof(float) / 1e6, r.seconds * 1e3, r.algbw_gbs,
                    r.busbw_gbs);
      log << line << std::flush;
    }
  }

  // --- the loop ---
  TrainResult result;
  const auto t0 = Clock::now();
  Interval iv;
  int64_t step = 0, samples_seen = 0;
  int64_t epoch = 0;
  for (; epoch < spec.train.epochs && step < total_steps; ++epoch) {
    const std::vector<int64_t> order = data::epoch_order(n, spec.seed, epoch, spec.data.shuffle);
    for (int64_t b = 0; b < per_epoch && step < total_steps; ++b) {
      const int64_t g_begin = b * B;
      const int64_t g_rows = std::min(B, n - g_begin);
      const data::Slice sl = data::rank_slice(g_rows, rank, world);
      const int rows = static_cast<int>(sl.count);
      const double beta = kl_weight(spec.loss, step);

      be.fill(grads.data(), 0.0f, P);
      sync->begin(step);
      double local[2] = {0, 0};
      if (rows > 0) {
        const int64_t* idx = order.data() + g_begin + sl.begin;
        train_set->gather(std::span<const int64_t>(idx, sl.count), pixels.data());
        data::pixels_to_input<float>(pixels.data(), idx, rows, D, spec.data.binarize, spec.seed,
                                     static_cast<uint32_t>(epoch), xh.data());
        be.upload(x.data(), xh.data(), static_cast<size_t>(rows) * D);
        // eps keyed by the sample's position in the global batch: the same for any world size.
        be.normal(spec.seed, RngStream::Eps, static_cast<uint32_t>(step), static_cast<uint64_t>(sl.begin), rows, L,
                  eps.data());
        model.forward(params.data(), x.data(), eps.data(), rows);
        const float w = 1.0f / static_cast<float>(g_rows);
        model.backward(params.data(), grads.data(), x.data(), eps.data(), rows, w, static_cast<float>(beta) * w,
                       grads_ready);
        be.download(rec.data(), model.rec(), rows);
        be.download(kl.data(), model.kl(), rows);
        for (int r = 0; r < rows; ++r) {
          local[0] += rec[r];
          local[1] += kl[r];
        }
      }
      sync->finish();  // a rank without rows this step still joins every bucket's all-reduce
      comm.allreduce_sum(local, 2);
      if (!std::isfinite(local[0]) || !std::isfinite(local[1]))
        throw AgreedError(ErrorKind::Numeric, "step " + std::to_string(step + 1) + ": the loss is not finite (rec sum " +
                            std::to_string(local[0]) + ", KL sum " + std::to_string(local[1]) +
                            "); lower optim.lr or set optim.grad_clip");
      const double lr = learning_rate(spec.optim, step, total_steps);
      const double gnorm = optim.step(params.data(), grads.data(), lr);
      ++step;
      samples_seen += g_rows;
      iv.rec += local[0];
      iv.kl += local[1];
      iv.samples += static_cast<double>(g_rows);
      iv.grad_norm += gnorm;
      ++iv.steps;

      const bool epoch_end = b + 1 == per_epoch || step == total_steps;
      if (step % spec.train.log_every == 0 || epoch_end) {
        const double secs = std::chrono::duration<double>(Clock::now() - iv.start).count();
        const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
        const double rate = iv.samples / std::max(secs, 1e-9);
        const double eta = elapsed / static_cast<double>(step) * static_cast<double>(total_steps - step);
        const double r = iv.rec / iv.samples, k = iv.kl / iv.samples;
        result.last_neg_elbo = r + k;
        if (root) {
          char line[320];
          std::snprintf(line, sizeof(line),
                        "epoch %lld/%lld step %lld/%lld | -elbo %.3f (rec %.3f, kl %.3f) | beta %.3g | lr %.3e | "
                        "|g| %.3g | %.0f samples/s | eta %s\n",
                        static_cast<long long>(epoch + 1), static_cast<long long>(spec.train.epochs),
                        static_cast<long long>(step), static_cast<long long>(total_steps), r + k, r, k, beta, lr,
                        iv.grad_norm / static_cast<double>(iv.steps), rate, hms(eta).c_str());
          log << line << std::flush;
          char row[320];
          std::snprintf(row, sizeof(row), "%lld,%lld,%lld,%.6f,%.6f,%.6f,%.6g,%.6g,%.6g,%.1f,%.3f\n",
                        static_cast<long long>(step), static_cast<long long>(epoch + 1),
                        static_cast<long long>(samples_seen), r + k, r, k, beta, lr,
                        iv.grad_norm / static_cast<double>(iv.steps), rate, elapsed);
          csv << row << std::flush;
        }
        iv = Interval{};
      }
    }
  }
  result.steps = step;
  result.epochs_completed = epoch;

  // --- outputs: rank 0 writes, everyone agrees it worked ---
  result.model_path = (out_dir / "model.h5").string();
  collectively(comm, [&] {
    if (!root) return;
    std::vector<float> host(P);
    be.download(host.data(), params.data(), P);
    write_model_file(result.model_path, spec, input_shape, layout, host.data(), step, epoch);
    log << "wrote " << result.model_path << " (" << P << " parameters, step " << step << ")\n" << std::flush;
  });

  if (test_set) {
    EvalOptions eo;
    eo.iw_samples = spec.eval.iw_samples;
    eo.batch_size = spec.eval.batch_size;
    eo.seed = spec.seed;
    eo.binarize = spec.data.binarize;
    result.eval = evaluate(layout, be, params.data(), *test_set, comm, eo);
    result.evaluated = true;
    collectively(comm, [&] {
      if (!root) return;
      log << format_eval(result.eval) << "\n" << std::flush;
      write_text_file_atomic((out_dir / "eval.yaml").string(), eval_yaml(result.eval, result.model_path, spec.data.test));
    });
  }
  return result;
}

}  // namespace elbo
