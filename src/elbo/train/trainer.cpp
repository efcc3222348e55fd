// Training loop. Every rank runs the same code on its slice of each global batch;
// the order of samples and every eps are functions of (seed, step, position), so
// N ranks reproduce one rank up to float summation order.
#include "elbo/train/trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <ostream>
#include <span>
#include <thread>

#include "elbo/ckpt/checkpoint.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/data/sampler.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/data/stream.hpp"
#include "elbo/dist/grad_sync.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/model/generate.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/optim/adam.hpp"
#include "elbo/train/footprint.hpp"
#include "elbo/train/stop_signal.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/progress.hpp"
#include "elbo/util/run_lock.hpp"
#include "elbo/viz/image.hpp"

#include <climits>
#include <exception>
#include <functional>
#include <mutex>
#include <sstream>

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
const char* const kRunFiles[] = {"model.h5", "metrics.csv", "spec.yaml", "eval.yaml", "samples.png", "recon.png"};
// Directories a run fills; output.overwrite removes them with the files above.
const char* const kRunDirs[] = {"checkpoints", "images"};

// The first thing in `dir` that belongs to a run, or "" when it holds none.
std::string run_evidence(const fs::path& dir) {
  std::error_code ec;
  for (const char* f : kRunFiles)
    if (fs::exists(dir / f, ec)) return f;
  for (const auto& e : fs::directory_iterator(dir / "checkpoints", ec))
    if (e.path().extension() == ".h5") return "checkpoints/" + e.path().filename().string();
  return "";
}

// Whether `file` lies inside `dir` (by file system identity, so links and relative
// spellings do not fool it).
bool inside(const fs::path& file, const fs::path& dir) {
  std::error_code ec;
  for (fs::path p = fs::absolute(file, ec).parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path())
    if (fs::equivalent(p, dir, ec)) return true;
  return false;
}

// Makes output.dir ready for this job (rank 0, under the run lock). A directory holds
// one run: a fresh start refuses a directory with a run in it unless output.overwrite,
// which then removes that run's files first (never a mix of two runs' checkpoints);
// --resume PATH may only continue the run already there (or start in an empty
// directory); overwrite and --resume contradict each other.
void prepare_output_dir(const ExperimentSpec& spec, const std::string& resume) {
  const OutputSpec& out = spec.output;
  const fs::path dir(out.dir);
  if (!resume.empty() && out.overwrite)
    throw config_error(spec.source + ": output.overwrite: true asks for a fresh run in '" + out.dir +
                       "', --resume " + resume + " for continuing one; drop one of them (job scripts pass "
                       "--resume auto: give a new run a new output.dir instead)");
  const std::string evidence = run_evidence(dir);
  if (!evidence.empty()) {
    if (resume.empty() && !out.overwrite)
      throw config_error("output.dir: '" + out.dir + "' already holds a run (" + evidence +
                         "); choose another output.dir, continue it with --resume auto, or pass "
                         "--set output.overwrite=true");
    if (!resume.empty() && resume != "auto" && !inside(resume, dir / "checkpoints"))
      throw config_error("output.dir: '" + out.dir + "' holds another run (" + evidence + "); --resume " + resume +
                         " would replace it: continue from that checkpoint into an empty output.dir");
    if (out.overwrite) {
      std::error_code ec;
      for (const char* f : kRunFiles) fs::remove(dir / f, ec);
      for (const char* d : kRunDirs) fs::remove_all(dir / d, ec);
      if (ec) throw io_error("output.overwrite: cannot remove the earlier run in '" + out.dir + "': " + ec.message());
    }
  }
  std::error_code ec;
  fs::create_directories(dir / "checkpoints", ec);
  if (ec) throw io_error("cannot create output directory '" + out.dir + "/checkpoints': " + ec.message());
  // A writer killed mid-checkpoint leaves its temporary file; it was never published.
  for (const auto& e : fs::directory_iterator(dir / "checkpoints", ec))
    if (e.path().extension() == ".tmp") fs::remove(e.path(), ec);
}

// Writes checkpoints on a thread of rank 0, so that the other ranks wait only for
// the copy of the state to host memory, not for the file system. One write in
// flight at a time; a failure surfaces at the next submit() or wait().
class CheckpointWriter {
 public:
  ~CheckpointWriter() {
    if (m_thread.joinable()) m_thread.join();
  }
  void submit(std::function<void()> job) {
    wait();
    m_thread = std::thread([this, job = std::move(job)] {
      try {
        job();
      } catch (...) {
        m_error = std::current_exception();
      }
    });
  }
  void wait() {
    if (m_thread.joinable()) m_thread.join();
    if (m_error) {
      std::exception_ptr e = m_error;
      m_error = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  std::thread m_thread;
  std::exception_ptr m_error;
};

// metrics.csv's columns; new ones go at the end so that column numbers stay valid.
constexpr const char* kMetricsHeader =
    "step,epoch,samples,neg_elbo,rec,kl,beta,lr,grad_norm,samples_per_s,elapsed_s,test_neg_elbo,test_rec,test_kl,"
    "skipped_steps";

// metrics.csv of a resumed run: the rows up to the checkpoint's step stay, later
// ones (logged after the checkpoint by the interrupted run) are dropped. A file from
// an earlier version with fewer columns gets the current header and empty cells.
void truncate_metrics(const fs::path& csv, int64_t step) {
  std::ifstream in(csv);
  if (!in) return;
  std::ostringstream kept;
  std::string line, header;
  std::getline(in, header);
  const std::string current = kMetricsHeader;
  const bool older = header != current && current.compare(0, header.size(), header) == 0;
  const std::string pad(older ? std::count(current.begin(), current.end(), ',') -
                                    std::count(header.begin(), header.end(), ',')
                              : 0,
                        ',');
  kept << (older ? current : header) << "\n";
  while (std::getline(in, line))
    if (!line.empty() && std::stoll(line.substr(0, line.find(','))) <= step) kept << line << pad << "\n";
  write_text_file_atomic(csv.string(), kept.str());
}

// Rank 0's pictures of the model at this point: 64 samples from the prior (the same
// z every time, so successive grids show the model learning) and the first 32 test
// inputs beside their reconstructions; DIR/samplesTAG.png and DIR/reconTAG.png.
void write_grids(const fs::path& dir, const std::string& tag, const VaeLayout& layout, Backend<float>& be,
                 const float* params, const ExperimentSpec& spec, const data::ShardSet& test,
                 const std::vector<int>& shape) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw io_error("cannot create " + dir.string() + ": " + ec.message());
  const std::vector<float> samples = sample_from_prior(layout, be, params, 64, spec.seed);
  viz::write_png((dir / ("samples" + tag + ".png")).string(),
                 viz::tile(samples.data(), 64, shape[0], shape[1], shape[2], 8));
  const int n = static_cast<int>(std::min<int64_t>(32, test.size()));
  std::vector<int64_t> items(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) items[i] = i;
  const std::vector<float> x = gray_inputs(test, items, spec.data.test);
  const std::vector<float> r = reconstruct(layout, be, params, x.data(), n);
  viz::write_png((dir / ("recon" + tag + ".png")).string(),
                 viz::tile_pairs(x.data(), r.data(), n, shape[0], shape[1], shape[2], 8));
}

// Interval statistics for the progress line, summed over the global batch.
struct Interval {
  double rec = 0, kl = 0, samples = 0, grad_norm = 0;
  int64_t steps = 0;
  int64_t skipped = 0;  // steps dropped by train.on_nonfinite: skip
  double data_s = 0;    // rank 0's time spent getting batches ready (the step waits for it)
  Clock::time_point start = Clock::now();
};

// The host side of a batch: dataset indices -> pixels -> model input in pinned
// memory, for this rank's slice. Two buffers, so that the next batch is prepared while
// the device still runs the current one (its upload reads the other buffer).
class BatchPrep {
 public:
  // `stream`: the streaming reader that hands over this rank's rows (nullptr: gather
  // them from the set held in memory).
  BatchPrep(Backend<float>& be, const data::ShardSet& set, const ExperimentSpec& spec, const data::OrderSpec& order,
            data::StreamReader* stream, int rank, int world, int local_rows, int dim)
      : m_set(set), m_spec(spec), m_order(order), m_stream(stream), m_n(order.n), m_rank(rank), m_world(world),
        m_dim(dim), m_pixels(static_cast<size_t>(local_rows) * dim), m_idx(static_cast<size_t>(local_rows)) {
    for (auto& b : m_bufs) b.host = std::make_unique<HostBuffer<float, float>>(be, static_cast<size_t>(local_rows) * dim);
  }

  struct Batch {
    const float* x = nullptr;  // (rows, dim) in pinned memory
    int rows = 0;              // this rank's rows
    int64_t global_rows = 0;   // the whole batch's (the last one of an epoch may be short)
    int64_t first = 0;         // this rank's first row's position in the global batch
  };

  // Batch b of `epoch` (prepared now unless prefetched).
  Batch get(int64_t epoch, int64_t b) {
    Buf* ready = nullptr;
    for (auto& buf : m_bufs)
      if (buf.epoch == epoch && buf.batch == b) ready = &buf;
    if (ready == nullptr) ready = &fill(m_bufs[m_last == &m_bufs[0] ? 1 : 0], epoch, b);
    m_last = ready;
    return ready->batch_info;
  }

  // Prepares batch b of `epoch` into the buffer get() did not just hand out.
  void prefetch(int64_t epoch, int64_t b) { fill(m_bufs[m_last == &m_bufs[0] ? 1 : 0], epoch, b); }

 private:
  struct Buf {
    std::unique_ptr<HostBuffer<float, float>> host;
    int64_t epoch = -1, batch = -1;
    Batch batch_info;
  };

  const std::vector<int64_t>& order(int64_t epoch) {
    for (auto& [e, o] : m_orders)
      if (e == epoch) return o;
    // Two epochs at most are in play: the current one and the next.
    auto& slot = m_orders[m_orders[0].first <= m_orders[1].first ? 0 : 1];
    slot = {epoch, data::epoch_order(m_order, epoch)};
    return slot.second;
  }

  Buf& fill(Buf& buf, int64_t epoch, int64_t b) {
    const int64_t B = m_spec.train.batch_size, g_begin = b * B, g_rows = std::min(B, m_n - g_begin);
    const data::Slice sl = data::rank_slice(g_rows, m_rank, m_world);
    buf.epoch = epoch;
    buf.batch = b;
    buf.batch_info = Batch{buf.host->data(), static_cast<int>(sl.count), g_rows, sl.begin};
    const int64_t* idx = m_idx.data();
    if (m_stream != nullptr) {
      m_stream->fetch(epoch, b, m_pixels.data(), m_idx.data());  // also for no rows: it keeps the reader in step
    } else if (sl.count > 0) {
      idx = order(epoch).data() + g_begin + sl.begin;
      m_set.gather(std::span<const int64_t>(idx, sl.count), m_pixels.data());
    }
    if (sl.count > 0) {
      data::pixels_to_input<float>(m_pixels.data(), idx, sl.count, m_dim, m_spec.data.binarize, m_spec.seed,
                                   static_cast<uint32_t>(epoch), buf.host->data());
    }
    return buf;
  }

  const data::ShardSet& m_set;
  const ExperimentSpec& m_spec;
  data::OrderSpec m_order;
  data::StreamReader* m_stream;
  int64_t m_n;
  int m_rank, m_world, m_dim;
  std::vector<uint8_t> m_pixels;
  std::vector<int64_t> m_idx;
  Buf m_bufs[2];
  Buf* m_last = nullptr;
  std::pair<int64_t, std::vector<int64_t>> m_orders[2] = {{-1, {}}, {-2, {}}};
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

TrainResult train(const ExperimentSpec& spec, Communicator& comm, std::ostream& log, const TrainOptions& options) {
  const int world = comm.size(), rank = comm.rank();
  const bool root = comm.is_root();
  comm.set_timeout(spec.dist.timeout_s);

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
    if (!root) return;
    if (fs::exists(spec.output.dir) && !fs::is_directory(spec.output.dir))
      throw config_error("output.dir: '" + spec.output.dir + "' exists and is not a directory");
    run_lock = RunLock(spec.output.dir);
    prepare_output_dir(spec, options.resume);
  });

  std::optional<data::ShardSet> train_set, test_set;
  // data.loader per split: memory (every rank loads and verifies all of it) or stream
  // (metadata only; the ranks share the checksum verification, each reads its part).
  const Loader train_loader =
      data::resolve_loader(spec.data.loader, spec.data.cache_mb, data::split_bytes(spec.data.train));
  const Loader test_loader = spec.data.test.empty() ? Loader::Memory
      : data::resolve_loader(spec.data.loader, spec.data.cache_mb, data::split_bytes(spec.data.test));
  const auto open_options = [&](Loader loader) {
    return data::OpenOptions{loader == Loader::Memory, rank, world};
  };
  collectively(comm, [&] {
    train_set.emplace(data::ShardSet::open(spec.data.train, open_options(train_loader)));
    std::vector<int> shape = {train_set->channels(), train_set->height(), train_set->width()};
    if (!spec.data.shape.empty() && spec.data.shape != shape)
      throw data_error(spec.data.train + ": shards hold samples of shape " + shape_string(shape, "[]") +
                       " but the spec (" + spec.source + ", data.shape) says " + shape_string(spec.data.shape, "[]"));
    if (!spec.data.test.empty() && (spec.eval.at_end || spec.eval.every > 0)) {
      test_set.emplace(data::ShardSet::open(spec.data.test, open_options(test_loader)));
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
  std::optional<VaeLayout> layout_holder;
  collectively(comm, [&] { layout_holder.emplace(spec.model, input_shape); });  // shape errors name the layer
  const VaeLayout& layout = *layout_holder;
  const int L = layout.latent();
  const int64_t B = spec.train.batch_size;
  const int local_rows = static_cast<int>(B / world);
  const int threads = threads_per_rank(spec.train.threads, comm.world().local_size);
  Placement place;
  std::unique_ptr<Backend<float>> backend;
  collectively(comm, [&] {
    place = resolve_placement(spec, comm.world(), probe_backends());
    backend = make_backend<float>(place.device, threads, place.gpu);
    backend->set_deterministic(spec.train.deterministic);
  });
  Backend<float>& be = *backend;
  // auto: on for one GPU replica, where nothing overlaps with the backward pass and
  // launch overhead is what a small batch pays for; with several ranks the per-layer
  // bucketed all-reduce is worth more than the saved launches.
  bool use_graph = spec.train.cuda_graph == GraphMode::On ||
                         (spec.train.cuda_graph == GraphMode::Auto && place.device == DeviceKind::Cuda && world == 1);

  // Refuse what cannot run (more steps than int64 holds, buffers beyond the memory)
  // before allocating any of it.
  StepPlan plan;
  MemoryEstimate need;
  collectively(comm, [&] {
    plan = plan_steps(spec, n, world);
    need = estimate_train_memory(layout, B / world, place.device);
    if (test_set)
      add_eval_memory(need, layout, data::rank_slice(test_set->size(), rank, world).count, spec.eval.iw_samples,
                      spec.eval.batch_size, "eval.batch_size or eval.iw_samples");
    check_memory(need, place.device, host_memory_per_rank(comm.world().local_size), spec.source);
  });

  // --- the replica: one flat parameter buffer, one flat gradient buffer ---
  const size_t P = layout.num_params();
  const MemoryItem& state_mem = need.items[MemoryEstimate::kModelState];  // a failed allocation names its buffer
  Buffer<float> params = allocating(state_mem, spec.source, [&] { return Buffer<float>(be, P); });
  Buffer<float> grads = allocating(state_mem, spec.source, [&] { return Buffer<float>(be, P); });
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
  Vae<float> model = allocating(need.items[MemoryEstimate::kActivations], spec.source,
                                [&] { return Vae<float>(layout, be, local_rows); });
  Adam<float> optim = allocating(state_mem, spec.source, [&] { return Adam<float>(spec.optim, be, P); });
  Buffer<float> x(be, static_cast<size_t>(local_rows) * D), eps(be, static_cast<size_t>(local_rows) * L);
  // The batch on the host, in pinned memory on a GPU so that its upload need not wait:
  // every step that uploads also downloads its losses (a synchronization) before the
  // next step writes here again.
  data::OrderSpec order_spec;
  order_spec.n = n;
  order_spec.batch_size = B;
  order_spec.seed = spec.seed;
  order_spec.shuffle = spec.data.shuffle != Shuffle::Off;
  order_spec.blocks = spec.data.shuffle == Shuffle::Blocks;
  order_spec.block = data::shuffle_block_samples(D);
  std::unique_ptr<data::StreamReader> stream;
  if (train_loader == Loader::Stream) {
    data::StreamOptions so;
    so.order = order_spec;
    so.rank = rank;
    so.world = world;
    so.drop_last = spec.train.drop_last;
    so.end_epoch = spec.train.epochs;
    so.cache_bytes = static_cast<uint64_t>(spec.data.cache_mb * 1048576.0);
    stream = std::make_unique<data::StreamReader>(*train_set, so);
  }
  BatchPrep batches(be, *train_set, spec, order_spec, stream.get(), rank, world, local_rows, D);
  // The per-sample losses come back the same way: two copies, one wait.
  HostBuffer<float, float> loss_buf(be, 2 * static_cast<size_t>(local_rows));
  float* const rec = loss_buf.data();
  float* const kl = rec + local_rows;
  // With one rank the gradients are final when backward ends: their norm comes back
  // with the losses, and the optimizer step needs no wait of its own.
  const bool norm_with_losses = world == 1;
  HostBuffer<double, float> norm_buf(be, 1);
  double* const squared_norm = norm_buf.data();

  const int64_t per_epoch = plan.per_epoch;
  int64_t total_steps = plan.total;

  fs::path out_dir(spec.output.dir);
  const fs::path ckpt_dir = out_dir / "checkpoints";

  // --- resume: rank 0 finds and verifies the checkpoint, every rank receives it ---
  TrainState st;
  st.total_steps = total_steps;
  st.world_size = world;
  st.train_samples = n;
  st.seed = spec.seed;
  std::ostringstream resume_log;
  int resumed = 0;
  if (!options.resume.empty()) {
    Checkpoint ck;
    collectively(comm, [&] {
      if (!root) return;
      if (options.resume == "auto") {
        std::vector<std::string> skipped;
        const bool found = find_resume_checkpoint(ckpt_dir.string(), &ck, &skipped);
        for (const auto& why : skipped) resume_log << "resume: skipping an unusable checkpoint: " << why << "\n";
        if (!found) {
          // Starting over is right for a job that died before its first checkpoint,
          // never over a finished model or over checkpoints that merely fail to verify.
          if (fs::exists(out_dir / "model.h5") || !skipped.empty())
            throw config_error(
                "--resume auto: " + out_dir.string() + " holds " +
                (fs::exists(out_dir / "model.h5") ? std::string("a finished model (model.h5)") : "checkpoints") +
                " but no checkpoint that verifies" + (skipped.empty() ? "" : " (" + skipped.front() + ")") +
                "; nothing was changed. To train anew there pass --set output.overwrite=true without --resume; "
                "to keep it, give this run another output.dir");
          resume_log << "resume: no checkpoint in " << ckpt_dir.string() << "; starting from step 0\n";
          return;
        }
      } else {
        ck = read_checkpoint(options.resume);
      }
      if (ck.input_shape != input_shape)
        throw data_error(ck.path + ": the checkpoint was trained on samples of shape " + shape_string(ck.input_shape, "[]") +
                         " but " + spec.data.train + " holds " + shape_string(input_shape, "[]"));
      for (const auto& c : check_resume_compatible(ck.spec, spec, ck.path))
        resume_log << "resume: spec change accepted: " << c << "\n";
      if (ck.state.train_samples != n)
        throw config_error(spec.source + ": data.train: " + spec.data.train + " yields " + std::to_string(n) +
                           " training samples but the checkpoint " + ck.path + " was trained on " +
                           std::to_string(ck.state.train_samples) + "; the sample order would change");
      resume_log << "resume: continuing from " << ck.path << " at step " << ck.state.step << " (epoch "
                 << ck.state.epoch + 1 << ", batch " << ck.state.batch_in_epoch << "), written by "
                 << ck.state.world_size << " rank(s)\n";
      resumed = 1;
    });
    comm.broadcast(&resumed, sizeof(resumed), 0);
    if (resumed) {
      if (root) st = ck.state;
      comm.broadcast(&st, sizeof(st), 0);
      std::vector<float> host_p(P), host_m(P), host_v(P);
      if (root) {
        host_p = ck.params;
        host_m = ck.exp_avg;
        host_v = ck.exp_avg_sq;
      }
      comm.broadcast(host_p.data(), P * sizeof(float), 0);
      comm.broadcast(host_m.data(), P * sizeof(float), 0);
      comm.broadcast(host_v.data(), P * sizeof(float), 0);
      be.upload(params.data(), host_p.data(), P);
      be.upload(optim.first_moment().data(), host_m.data(), P);
      be.upload(optim.second_moment().data(), host_v.data(), P);
      optim.set_steps_taken(st.adam_steps);
      // The LR schedule's horizon follows the current spec (train.epochs/max_steps may grow).
      st.total_steps = total_steps;
      st.world_size = world;
    }
  }

  std::ofstream csv;
  if (root) {
    std::string resolved = dump_spec(spec);
    log << "elbo train: " << spec.name << " | " << world << " rank(s) on " << comm.world().nodes << " node(s) via "
        << launcher_description() << " | backend " << be.name()
        << (place.device == DeviceKind::Cpu ? " x " + std::to_string(threads) + " BLAS thread(s)"
                                            : " (GPU " + std::to_string(place.gpu) + " on rank 0)")
        << " (" << place.why << ")\n"
        << "gradients: " << sync->describe() << "\n"
        << "step graph: " << (use_graph ? "on (steady-state forward/backward replayed as one recorded graph)" : "off")
        << "\n"
        << "data: " << n << " training samples of shape " << shape_string(input_shape, "[]") << " from " << spec.data.train
        << "\n";
    char mb[64];
    std::snprintf(mb, sizeof(mb), "%.1f MB", static_cast<double>(train_set->bytes()) / 1e6);
    log << "data: loader " << train_loader << " (data.loader: " << spec.data.loader << ", split " << mb
        << ", data.cache_mb: " << spec.data.cache_mb << ")"
        << (train_loader == Loader::Stream ? (spec.data.shuffle == Shuffle::Blocks
                                            ? " | order: shuffled blocks of " + std::to_string(order_spec.block) +
                                                  " samples, each rank reads about 1/" + std::to_string(world) +
                                                  " of the split per epoch"
                                            : std::string(" | order: ") +
                                                  (spec.data.shuffle == Shuffle::Global ? "a global permutation: each rank reads its "
                                                                       "samples one by one (data.shuffle: blocks "
                                                                       "reads runs)"
                                                                     : "sequential"))
                                      : std::string())
        << "\n";
    if (train_loader == Loader::Stream && spec.data.shuffle == Shuffle::Blocks) {
      // A rank's working set: the current windows of its canonical streams (sampler.hpp).
      const int64_t streams = (data::kCanonicalStreams + world - 1) / world + (data::kCanonicalStreams % world ? 2 : 0);
      const double need = static_cast<double>(streams * (data::kShuffleWindow + 1) * order_spec.block) * D;
      if (spec.data.cache_mb * 1048576.0 < need)
        log << "warning: data.cache_mb: " << spec.data.cache_mb << " is below a rank's working set of about "
            << need / 1048576.0 << " MiB: blocks will be read more than once per epoch\n";
    }
    for (const auto* set : {&*train_set, test_set ? &*test_set : nullptr})
      if (set != nullptr && !set->verification_note().empty()) log << "data: " << set->verification_note() << "\n";
    log << "model: " << layout.num_values() << " parameters | " << total_steps << " steps (" << per_epoch << " per epoch)\n"
        << resume_log.str() << "resolved spec:\n" << resolved << std::flush;
    write_text_file_atomic((out_dir / "spec.yaml").string(), resolved);
    const fs::path csv_path = out_dir / "metrics.csv";
    if (resumed && fs::exists(csv_path)) {
      truncate_metrics(csv_path, st.step);
      csv.open(csv_path, std::ios::app);
    } else {
      csv.open(csv_path, std::ios::trunc);
      if (csv)
        csv << kMetricsHeader << "\n";
    }
    if (!csv) throw io_error("cannot write " + csv_path.string());
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

  // --- checkpoints: rank 0 copies the state to host memory, a thread writes it ---
  CheckpointWriter writer;
  auto save_checkpoint = [&](bool wait) {
    if (!root) return;
    auto hp = std::make_shared<std::vector<float>>(P), hm = std::make_shared<std::vector<float>>(P),
         hv = std::make_shared<std::vector<float>>(P);
    be.download(hp->data(), params.data(), P);
    be.download(hm->data(), optim.first_moment().data(), P);
    be.download(hv->data(), optim.second_moment().data(), P);
    const TrainState snap = st;
    const std::string name = checkpoint_file_name(snap.step);
    result.checkpoint_path = (ckpt_dir / name).string();
    writer.submit([=, &spec, &layout, &input_shape] {
      write_checkpoint((ckpt_dir / name).string(), spec, input_shape, layout, hp->data(), hm->data(), hv->data(), snap);
      publish_checkpoint(ckpt_dir.string(), name, spec.checkpoint.keep);
    });
    if (wait) writer.wait();
  };

  // A stop asked for during start-up (data loading, the self-test): nothing new to
  // save, so no checkpoint; the next start does the same work again.
  if (stop_agreed()) {
    if (root)
      log << "stop requested before the first step (at step " << st.step << "): no checkpoint needed; continue "
          << "with --resume auto\n" << std::flush;
    result.stopped = true;
    result.stop_signal = stop.signal_number();
    result.steps = st.step;
    stop.write_marker();
    return result;
  }

  // --- the loop ---
  std::unique_ptr<CapturedWork> graph;  // recorded at the second steady-state step
  bool steady_warm = false;             // a steady-state step has run op by op
  const auto t0 = Clock::now();
  const int64_t first_step = st.step;
  const int64_t skipped_before = st.skipped_steps;  // the share counts this job's steps
  int64_t consecutive_skips = 0;
  Interval iv;
  int64_t step = st.step;
  int64_t epoch = st.epoch;
  for (; epoch < spec.train.epochs && step < total_steps && !result.stopped; ++epoch) {
    const int64_t first_batch = epoch == st.epoch ? st.batch_in_epoch : 0;
    // On a terminal, a bar for the epoch under the log lines (elsewhere the lines suffice).
    Progress epoch_bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(spec.train.epochs), per_epoch,
                       root, false);
    for (int64_t b = first_batch; b < per_epoch && step < total_steps; ++b) {
      const auto data_t0 = Clock::now();
      const BatchPrep::Batch batch = batches.get(epoch, b);
      iv.data_s += std::chrono::duration<double>(Clock::now() - data_t0).count();
      const int rows = batch.rows;
      const int64_t g_rows = batch.global_rows;
      const double beta = kl_weight(spec.loss, step);

      // The steady-state step (a full batch, the KL weight at its final value) replays
      // one recorded forward/backward; other steps launch op by op. The first steady
      // step runs op by op too: it makes every lazily created resource (cuDNN plans and
      // workspace, reduction scratch), which must not be allocated while recording.
      const bool steady = use_graph && rows == local_rows && g_rows == B && step >= spec.loss.kl_warmup_steps;
      const bool graph_step = steady && steady_warm;
      steady_warm = steady_warm || steady;
      if (!graph_step) be.fill(grads.data(), 0.0f, P);
      sync->begin(step);
      // [rec sum, KL sum, ranks with a non-finite loss, ranks asked to stop]
      double local[4] = {0, 0, 0, stop.requested() ? 1.0 : 0.0};
      if (rows > 0) {
        be.upload_async(x.data(), batch.x, static_cast<size_t>(rows) * D);
        // eps keyed by the sample's position in the global batch: the same for any world size.
        be.normal(spec.seed, RngStream::Eps, static_cast<uint32_t>(step), static_cast<uint64_t>(batch.first), rows, L,
                  eps.data());
        const float w = 1.0f / static_cast<float>(g_rows), kw = static_cast<float>(beta) * w;
        if (graph_step && !graph) {
          try {
            graph = be.capture([&model, &be, p = params.data(), g = grads.data(), xp = x.data(), ep = eps.data(), rows,
                                w, kw, P] {
              be.fill(g, 0.0f, P);
              model.forward(p, xp, ep, rows);
              model.backward(p, g, xp, ep, rows, w, kw);
            });
          } catch (const Error& e) {
            // A driver or library that cannot record the step costs speed, not the run.
            use_graph = false;
            if (root) {
              epoch_bar.clear();
              log << "warning: the training step could not be recorded as a graph (" << e.what()
                  << "); launching it op by op\n" << std::flush;
            }
          }
        }
        if (graph_step && graph) {
          graph->launch();
          sync->ready_from(0);  // all buckets at once: a graph gives no per-layer hook for the overlap
        } else {
          if (graph_step) be.fill(grads.data(), 0.0f, P);  // the recording would have zeroed them
          model.forward(params.data(), x.data(), eps.data(), rows);
          model.backward(params.data(), grads.data(), x.data(), eps.data(), rows, w, kw, grads_ready);
        }
        be.download_async(rec, model.rec(), rows);
        be.download_async(kl, model.kl(), rows);
        if (norm_with_losses) be.sum_squares_async(P, grads.data(), squared_norm);
        // While the device works: the next batch on the host.
        const bool last_in_epoch = b + 1 == per_epoch;
        if (step + 1 < total_steps && !(last_in_epoch && epoch + 1 >= spec.train.epochs)) {
          const auto prefetch_t0 = Clock::now();
          batches.prefetch(last_in_epoch ? epoch + 1 : epoch, last_in_epoch ? 0 : b + 1);
          iv.data_s += std::chrono::duration<double>(Clock::now() - prefetch_t0).count();
        }
        be.synchronize();
        for (int r = 0; r < rows; ++r) {
          local[0] += rec[r];
          local[1] += kl[r];
        }
        if (!std::isfinite(local[0]) || !std::isfinite(local[1])) local[2] = 1;
      }
      const bool local_bad = local[2] > 0;
      sync->finish();  // a rank without rows this step still joins every bucket's all-reduce
      comm.allreduce_sum(local, 4);
      const double lr = learning_rate(spec.optim, step, total_steps);
      double gnorm = std::numeric_limits<double>::quiet_NaN();
      if (local[2] == 0)  // not applied if non-finite
        gnorm = norm_with_losses ? optim.step(params.data(), grads.data(), lr, *squared_norm)
                                 : optim.step(params.data(), grads.data(), lr);
      ++step;
      st.step = step;
      st.samples_seen += g_rows;
      st.epoch = b + 1 == per_epoch ? epoch + 1 : epoch;
      st.batch_in_epoch = b + 1 == per_epoch ? 0 : b + 1;
      if (local[2] > 0 || !std::isfinite(gnorm)) {
        // Every rank sees the same sums and the same reduced gradient, so all take this branch.
        const int top = comm.allreduce_max(local_bad ? -rank : INT_MIN);
        std::string what = "step " + std::to_string(step) + ": ";
        what += top == INT_MIN ? "the gradient is not finite (every rank's loss is finite)"
                               : "the loss is not finite on rank " + std::to_string(-top) +
                                     (local[2] > 1 ? " (and " + std::to_string(static_cast<int>(local[2]) - 1) +
                                                         " other rank(s))"
                                                   : "");
        if (spec.train.on_nonfinite == NonfinitePolicy::Abort)
          throw AgreedError(ErrorKind::Numeric, what + "; lower optim.lr, set optim.grad_clip, or set "
                                                       "train.on_nonfinite: skip");
        ++st.skipped_steps;
        ++consecutive_skips;
        ++iv.skipped;
        // A run that mostly skips trains nothing: past the limits it ends, saying so.
        const int64_t done = step - first_step;
        const bool too_many_in_a_row = consecutive_skips >= spec.train.max_consecutive_skips;
        const bool too_large_a_share = st.skipped_steps > spec.train.max_consecutive_skips &&
                                       static_cast<double>(st.skipped_steps - skipped_before) >
                                           spec.train.max_skip_fraction * static_cast<double>(done);
        if (too_many_in_a_row || too_large_a_share)
          throw AgreedError(
              ErrorKind::Numeric,
              what + "; " +
                  (too_many_in_a_row
                       ? std::to_string(consecutive_skips) + " steps in a row skipped (train.max_consecutive_skips: " +
                             std::to_string(spec.train.max_consecutive_skips) + ")"
                       : std::to_string(st.skipped_steps - skipped_before) + " of " + std::to_string(done) +
                             " steps skipped (train.max_skip_fraction: " +
                             std::to_string(spec.train.max_skip_fraction) + ")") +
                  "; the run is not learning: lower optim.lr, set optim.grad_clip, or check the data for NaN/Inf");
        if (root) {
          epoch_bar.clear();
          log << "warning: " << what << "; skipping this step (train.on_nonfinite: skip)\n" << std::flush;
        }
      } else {
        consecutive_skips = 0;
        st.adam_steps = optim.steps_taken();
        iv.rec += local[0];
        iv.kl += local[1];
        iv.samples += static_cast<double>(g_rows);
        iv.grad_norm += gnorm;
        ++iv.steps;
      }

      // Held-out metrics and pictures every eval.every steps (all ranks evaluate their
      // part of the first eval.max_samples test samples; nothing here touches the
      // training state, so resumed runs stay bit-identical).
      const bool eval_now = test_set && spec.eval.every > 0 && step % spec.eval.every == 0 && step < total_steps;
      EvalResult test_now;
      epoch_bar.update(b + 1);
      if (eval_now) {
        epoch_bar.clear();
        const auto eval_start = Clock::now();
        EvalOptions eo;
        eo.batch_size = spec.eval.batch_size;
        eo.seed = spec.seed;
        eo.binarize = spec.data.binarize;
        eo.max_samples = spec.eval.max_samples;
        eo.progress = false;
        test_now = evaluate(layout, be, params.data(), *test_set, comm, eo);
        collectively(comm, [&] {
          if (!root) return;
          log << "eval at step " << step << ": " << format_eval(test_now) << "\n" << std::flush;
          if (spec.eval.images) {
            char tag[32];
            std::snprintf(tag, sizeof(tag), "-%09lld", static_cast<long long>(step));
            write_grids(out_dir / "images", tag, layout, be, params.data(), spec, *test_set, input_shape);
          }
        });
        iv.start += Clock::now() - eval_start;  // the throughput figure counts training time only
      }

      const bool epoch_end = b + 1 == per_epoch || step == total_steps;
      if ((step % spec.train.log_every == 0 || epoch_end || eval_now) && iv.steps == 0 && iv.skipped > 0) {
        // Nothing trained in this interval: a row that says so (no losses to average).
        if (root)
          csv << step << "," << epoch + 1 << "," << st.samples_seen << ",,,," << beta << ","
              << lr << ",,,"
              << std::chrono::duration<double>(Clock::now() - t0).count() << ",,,," << st.skipped_steps << "\n"
              << std::flush;
        iv = Interval{};
      }
      if ((step % spec.train.log_every == 0 || epoch_end || eval_now) && iv.steps > 0) {
        const double secs = std::chrono::duration<double>(Clock::now() - iv.start).count();
        const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
        const double rate = iv.samples / std::max(secs, 1e-9);
        const double eta = elapsed / static_cast<double>(std::max<int64_t>(1, step - first_step)) *
                           static_cast<double>(total_steps - step);
        const double r = iv.rec / iv.samples, k = iv.kl / iv.samples;
        result.last_neg_elbo = r + k;
        if (root) {
          char line[320];
          std::snprintf(line, sizeof(line),
                        "epoch %lld/%lld step %lld/%lld | -elbo %.3f (rec %.3f, kl %.3f) | beta %.3g | lr %.3e | "
                        "|g| %.3g | %.0f samples/s | eta %s | data wait %.0f%%\n",
                        static_cast<long long>(epoch + 1), static_cast<long long>(spec.train.epochs),
                        static_cast<long long>(step), static_cast<long long>(total_steps), r + k, r, k, beta, lr,
                        iv.grad_norm / static_cast<double>(iv.steps), rate, hms(eta).c_str(),
                        100.0 * std::min(1.0, iv.data_s / std::max(secs, 1e-9)));
          epoch_bar.clear();
          log << line << std::flush;
          char row[400];
          int len = std::snprintf(row, sizeof(row), "%lld,%lld,%lld,%.6f,%.6f,%.6f,%.6g,%.6g,%.6g,%.1f,%.3f,",
                                  static_cast<long long>(step), static_cast<long long>(epoch + 1),
                                  static_cast<long long>(st.samples_seen), r + k, r, k, beta, lr,
                                  iv.grad_norm / static_cast<double>(iv.steps), rate, elapsed);
          if (eval_now)
            len += std::snprintf(row + len, sizeof(row) - len, "%.6f,%.6f,%.6f,", test_now.neg_elbo, test_now.rec,
                                 test_now.kl);
          else
            len += std::snprintf(row + len, sizeof(row) - len, ",,,");
          std::snprintf(row + len, sizeof(row) - len, "%lld\n", static_cast<long long>(st.skipped_steps));
          csv << row << std::flush;
        }
        iv = Interval{};
      }

      if (local[3] > 0) {  // some rank was asked to stop: all stop here, after a checkpoint
        collectively(comm, [&] { save_checkpoint(true); });
        result.stopped = true;
        result.stop_signal = stop.signal_number();
        epoch_bar.clear();
        if (root)
          log << "stop requested (signal on " << static_cast<int>(local[3]) << " rank(s)) at step " << step
              << ": wrote " << result.checkpoint_path << "; continue with --resume auto\n" << std::flush;
        break;
      }
      if (spec.checkpoint.every > 0 && step % spec.checkpoint.every == 0 && step < total_steps) save_checkpoint(false);
    }
  }
  result.steps = step;
  result.epochs_completed = epoch;
  if (stream && step > first_step) {
    // What streaming cost each rank: the most any rank read, per epoch, against the split.
    const data::StreamStats ss = stream->stats();
    double mine[3] = {static_cast<double>(ss.bytes_read), static_cast<double>(ss.cache_peak_bytes),
                      static_cast<double>(ss.reads)};
    double most[3];
    for (int k = 0; k < 3; ++k)  // KiB for the byte counts: allreduce_max takes an int
      most[k] = comm.allreduce_max(static_cast<int>(std::min(mine[k] / (k < 2 ? 1024.0 : 1.0), 2e9)));
    const double epochs_run = static_cast<double>(step - first_step) / static_cast<double>(per_epoch);
    const double split = static_cast<double>(n) * D;
    if (root) {
      char line[320];
      std::snprintf(line, sizeof(line),
                    "data: stream read at most %.1f%% of the split per rank per epoch (%.2f MB in %.0f reads over "
                    "%.2f epoch(s)); block cache peak %.2f MB (data.cache_mb: %g)\n",
                    100.0 * most[0] * 1024.0 / split / std::max(epochs_run, 1e-9), most[0] * 1024.0 / 1e6,
                    most[2], epochs_run, most[1] * 1024.0 / 1e6, spec.data.cache_mb);
      log << line << std::flush;
    }
  }
  if (result.stopped) {
    stop.write_marker();
    return result;
  }
  // The final checkpoint: the run can be extended later (more epochs) with --resume.
  collectively(comm, [&] {
    writer.wait();
    save_checkpoint(true);
  });

  // --- outputs: rank 0 writes, everyone agrees it worked ---
  result.model_path = (out_dir / "model.h5").string();
  collectively(comm, [&] {
    if (!root) return;
    std::vector<float> host(P);
    be.download(host.data(), params.data(), P);
    write_model_file(result.model_path, spec, input_shape, layout, host.data(), step, epoch);
    log << "wrote " << result.model_path << " (" << layout.num_values() << " parameters, step " << step << ")\n"
        << std::flush;
  });

  // Everything the run must keep is on disk now. A stop from here on (the final
  // evaluation can take long) ends the job at once as resumable: --resume auto finds
  // the final checkpoint, trains no further, and evaluates again.
  stop.exit_at_once("elbo: rank " + std::to_string(rank) + ": stop requested after training: model.h5 and the final "
                    "checkpoint are written; the final evaluation did not finish (continue with --resume auto to "
                    "run it, or run elbo eval)");
  if (test_set && spec.eval.at_end && stop_agreed()) {
    if (root)
      log << "stop requested after training: " << result.model_path << " and the final checkpoint are written; "
          << "the final evaluation is left for --resume auto\n" << std::flush;
    result.stopped = true;
    result.stop_signal = stop.signal_number();
    stop.write_marker();
    return result;
  }
  if (test_set && spec.eval.at_end) {
    EvalOptions eo;
    eo.iw_samples = spec.eval.iw_samples;
    eo.source = spec.source;
    eo.batch_size = spec.eval.batch_size;
    eo.seed = spec.seed;
    eo.binarize = spec.data.binarize;
    result.eval = evaluate(layout, be, params.data(), *test_set, comm, eo);
    result.evaluated = true;
    collectively(comm, [&] {
      if (!root) return;
      log << format_eval(result.eval) << "\n" << std::flush;
      write_text_file_atomic((out_dir / "eval.yaml").string(), eval_yaml(result.eval, result.model_path, spec.data.test));
      if (spec.eval.images) {
        write_grids(out_dir, "", layout, be, params.data(), spec, *test_set, input_shape);
        log << "wrote " << (out_dir / "samples.png").string() << " and " << (out_dir / "recon.png").string() << "\n"
            << std::flush;
      }
    });
  }
  return result;
}

}  // namespace elbo
