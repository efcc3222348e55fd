// The `elbo` command: train, eval, info here, the image commands in cli/images.cpp.
// This is the only place that turns errors into exit codes; in a multi-rank job an
// error that the ranks did not raise together aborts the whole job so that no rank
// waits forever.
#include <climits>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/ckpt/model_file.hpp"
#include "elbo/cli/args.hpp"
#include "elbo/cli/commands.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/data/stream.hpp"
#include "elbo/dist/comm.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/train/evaluate.hpp"
#include "elbo/train/stop_signal.hpp"
#include "elbo/train/trainer.hpp"
#include "elbo/util/files.hpp"

namespace elbo {
namespace {

constexpr const char* kVersion = "0.1.0";

const char* kUsage =
    "usage: elbo <command> [options]\n\n"
    "Data-parallel VAE training (run under mpirun -np N or srun for N replicas).\n\n"
    "commands:\n"
    "  train SPEC.yaml [--set key.path=value ...] [--resume auto|PATH]\n"
    "                                                train a VAE from an experiment spec\n"
    "  eval MODEL.h5 --data TEST_DIR [--iw-samples K]  test negative ELBO, IWAE bound, active units\n"
    "  sample MODEL.h5 [-n 64] [-o samples.png]      decode z ~ N(0, I) into a PNG grid\n"
    "  reconstruct MODEL.h5 --data DIR [-n 32] [-o recon.png]\n"
    "                                                inputs beside their reconstructions\n"
    "  interpolate MODEL.h5 --data DIR --from I --to J [--steps K] [-o interpolation.png]\n"
    "                                                decode the line between two inputs' latents\n"
    "  info                                          build, backends and MPI world\n\n"
    "Run 'elbo <command> --help' for the options of a command.\n";


int cmd_train(const std::vector<std::string>& args, Communicator& comm) {
  std::string spec_path;
  std::vector<std::string> overrides;
  cli::ArgParser p("elbo train", "Train a VAE from a YAML experiment spec; rank 0 writes OUTPUT_DIR/{spec.yaml,"
                                 "metrics.csv,model.h5,eval.yaml}.");
  p.positional("SPEC", &spec_path, "experiment spec (YAML)");
  p.repeated("--set", &overrides, "KEY=VALUE", "override a spec key, e.g. --set optim.lr=3e-4 (repeatable)");
  TrainOptions opts;
  p.string("--resume", &opts.resume, "auto|PATH",
           "continue from a checkpoint: 'auto' = the newest valid one in OUTPUT_DIR/checkpoints (a fresh start when "
           "there is none), or a checkpoint file");
  bool go = false;
  collectively(comm, [&] { go = p.parse(args); });
  if (!go) return 0;
  ExperimentSpec spec;
  collectively(comm, [&] { spec = load_spec(spec_path, overrides); });
  TrainResult r = train(spec, comm, std::cout, opts);
  // Exit codes for job scripts: 75 = stopped on a signal with a checkpoint (requeue and
  // --resume auto), 76 = forced stop without one, 3 = a peer rank failed, 2 = bad input.
  return r.stopped ? kExitStopped : kExitOk;
}

int cmd_eval(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_path, data_dir, out_path, device = "auto";
  int64_t iw = 0, batch = 500, seed = -1, threads = 0, max_samples = 0;
  cli::ArgParser p("elbo eval", "Evaluate a trained model on a test split: negative ELBO per sample (nats), its "
                                "reconstruction and KL parts, and the k-sample importance-weighted bound.");
  p.positional("MODEL", &model_path, "model file written by elbo train (model.h5)");
  p.string("--data", &data_dir, "DIR", "test split directory written by elbo-shard", true);
  p.integer("--iw-samples", &iw, "K", "importance samples for the IWAE bound (0 = skip)", 0);
  p.integer("--batch-size", &batch, "N", "rows per forward pass on each rank", 1);
  p.integer("--max-samples", &max_samples, "N", "evaluate the split's first N samples only (0 = all)", 0);
  p.integer("--seed", &seed, "S", "seed for eps (default: the model's training seed)", 0);
  p.integer("--threads", &threads, "T", "BLAS threads per rank (0 = cores / ranks on the node)", 0);
  p.string("--device", &device, "auto|cpu|cuda", "where to evaluate (auto: a GPU when one is visible)");
  p.string("--output", &out_path, "FILE", "also write the results as YAML to FILE (rank 0)");
  std::string loader = "auto";
  double cache_mb = 1024;
  p.string("--loader", &loader, "auto|memory|stream",
           "hold the split in every rank's memory, or read each rank's rows from the files on demand (auto: memory "
           "when the split fits --cache-mb)");
  p.number("--cache-mb", &cache_mb, "MB", "the split size up to which --loader auto holds it in memory (default 1024)");
  double max_hours = 24;
  p.number("--max-hours", &max_hours, "H",
           "refuse an IWAE bound estimated (from a timed pass) to take longer than H hours (default 24, 0 = no limit)");
  bool go = false;
  collectively(comm, [&] {
    go = p.parse(args);
    if (!go) return;
    if (iw > INT_MAX)
      throw usage_error("elbo eval: option --iw-samples must be <= " + std::to_string(INT_MAX) + " (got " +
                        std::to_string(iw) + ")");
    // The results are written after the whole evaluation: a path that cannot take them
    // is refused before any of it.
    if (!out_path.empty() && comm.is_root()) cli::check_output_file(out_path, "elbo eval --output");
    if (!parse_choice<Loader>(loader))
      throw usage_error("elbo eval: option --loader must be auto, memory or stream (got '" + loader + "')");
  });
  if (!go) return 0;

  cli::LoadedModel m = cli::load_model(comm, "elbo eval", model_path, device, threads);
  std::optional<data::ShardSet> set;
  collectively(comm, [&] {
    // A test split larger than memory is read on demand, each rank its own rows.
    const Loader how = data::resolve_loader(*parse_choice<Loader>(loader), cache_mb, data::split_bytes(data_dir));
    set.emplace(data::ShardSet::open(data_dir, data::OpenOptions{how == Loader::Memory, comm.rank(), comm.size()}));
    std::vector<int> shape = {set->channels(), set->height(), set->width()};
    if (shape != m.file.input_shape)
      throw data_error(data_dir + ": samples have shape " + shape_string(shape, "[]") + " but the model " + model_path +
                       " was trained on " + shape_string(m.file.input_shape, "[]"));
  });
  EvalOptions eo;
  eo.iw_samples = static_cast<int>(iw);
  eo.batch_size = batch;
  eo.max_samples = max_samples;
  eo.seed = seed >= 0 ? static_cast<uint64_t>(seed) : m.file.spec.seed;
  eo.binarize = m.file.spec.data.binarize;
  eo.max_seconds = max_hours * 3600;
  eo.source = "elbo eval";
  eo.batch_size_name = "--batch-size";
  eo.iw_samples_name = "--iw-samples";
  eo.max_samples_name = "--max-samples";
  eo.max_seconds_hint = "raise --max-hours (0 = no limit)";
  eo.error_kind = ErrorKind::Usage;
  EvalResult r = evaluate(*m.layout, *m.backend, m.params.data(), *set, comm, eo);
  collectively(comm, [&] {
    if (!comm.is_root()) return;
    std::cout << format_eval(r) << std::endl;
    if (!out_path.empty()) write_text_file_atomic(out_path, eval_yaml(r, model_path, data_dir));
  });
  return 0;
}

int cmd_info(const std::vector<std::string>& args, Communicator& comm) {
  cli::ArgParser p("elbo info", "Print the build configuration, the available backends and the MPI world.");
  bool go = false;
  collectively(comm, [&] { go = p.parse(args); });
  if (!go) return 0;
  BackendReport r = probe_backends();
  if (comm.is_root()) {
    std::cout << "elbo " << kVersion << "\n"
              << "backends: cpu (OpenBLAS)" << (r.cuda_compiled ? ", cuda (compiled)" : "") << "\n"
              << "cuda: " << (r.cuda_compiled ? std::to_string(r.cuda_devices) + " device(s)" : "not compiled")
              << (r.cuda_detail.empty() ? "" : " - " + r.cuda_detail) << "\n"
              << "mpi world: " << comm.size() << " rank(s) on " << comm.world().nodes << " node(s), started by "
              << launcher_description() << "; rank 0 on " << comm.world().host << " with "
              << comm.world().local_size << " local rank(s)\n";
    if (r.cuda_devices > 0)
      std::cout << "gpu mapping: local rank i uses GPU i % " << r.cuda_devices << " (rank 0 -> GPU "
                << comm.world().local_rank % r.cuda_devices << ")\n";
  }
  // Where every rank runs, node by node, as each rank sees itself: its local rank and
  // the GPU that local rank maps to on its node (what a multi-node launch must get right).
  const int n = comm.size();
  std::vector<double> local(static_cast<size_t>(2 * n), 0.0);
  local[static_cast<size_t>(comm.rank())] = comm.world().local_rank;
  local[static_cast<size_t>(n + comm.rank())] = r.cuda_devices;
  comm.allreduce_sum(local.data(), local.size());
  const std::vector<std::string> hosts = comm.rank_hosts();
  if (comm.is_root()) {
    std::cout << "ranks by node:\n";
    std::vector<bool> shown(static_cast<size_t>(n), false);
    for (int first = 0; first < n; ++first) {
      if (shown[static_cast<size_t>(first)]) continue;
      std::cout << "  " << hosts[static_cast<size_t>(first)] << ":";
      const char* sep = " ";
      for (int q = first; q < n; ++q) {
        if (hosts[static_cast<size_t>(q)] != hosts[static_cast<size_t>(first)]) continue;
        shown[static_cast<size_t>(q)] = true;
        const int lr = static_cast<int>(local[static_cast<size_t>(q)]);
        const int gpus = static_cast<int>(local[static_cast<size_t>(n + q)]);
        std::cout << sep << "rank " << q << " (local " << lr
                  << (gpus > 0 ? ", GPU " + std::to_string(lr % gpus) : std::string(", CPU")) << ")";
        sep = ", ";
      }
      std::cout << "\n";
    }
  }
  return 0;
}

int run(int argc, char** argv, Communicator& comm) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    if (comm.is_root()) std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    if (comm.is_root()) std::printf("elbo %s\n", kVersion);
    return 0;
  }
  std::string cmd = args[0];
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (cmd == "train") return cmd_train(rest, comm);
  if (cmd == "eval") return cmd_eval(rest, comm);
  if (cmd == "info") return cmd_info(rest, comm);
  if (cmd == "sample") return cli::cmd_sample(rest, comm);
  if (cmd == "reconstruct") return cli::cmd_reconstruct(rest, comm);
  if (cmd == "interpolate") return cli::cmd_interpolate(rest, comm);
  collectively(comm, [&] {
    throw usage_error("unknown command '" + cmd + "'; valid commands: train, eval, sample, reconstruct, interpolate, "
                      "info (see elbo --help)");
  });
  return kExitBadInput;
}

}  // namespace
}  // namespace elbo

int main(int argc, char** argv) {
  using namespace elbo;
  std::optional<MpiRuntime> mpi;
  std::optional<MpiCommunicator> comm;
  // A job scheduler may signal a training job at any moment, start-up included: from
  // here on SIGTERM/SIGUSR1/SIGINT are stop requests (see train/stop_signal.hpp).
  if (argc > 1 && std::string(argv[1]) == "train") install_stop_handlers();
  try {
    mpi.emplace(&argc, &argv);
    comm.emplace();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "elbo: cannot start MPI: %s\n", e.what());
    return kExitFailure;
  }
  try {
    int rc = run(argc, argv, *comm);
    comm.reset();
    mpi.reset();
    return rc;
  } catch (const AgreedError& e) {
    // Every rank raised it together: one message, clean exit everywhere.
    if (comm->is_root()) std::fprintf(stderr, "elbo: %s: %s\n", error_kind_name(e.kind()), e.what());
    comm.reset();
    mpi.reset();
    return exit_code(e.kind());
  } catch (const Error& e) {
    std::fprintf(stderr, "elbo: rank %d: %s: %s\n", comm->rank(), error_kind_name(e.kind()), e.what());
    if (comm->size() > 1) comm->abort(exit_code(e.kind()));
    return exit_code(e.kind());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "elbo: rank %d: unexpected error: %s\n", comm->rank(), e.what());
    if (comm->size() > 1) comm->abort(kExitFailure);
    return kExitFailure;
  }
}
