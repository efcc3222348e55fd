// The `elbo` command: train, eval, info here, the image commands in cli/images.cpp.
// This is the only place that turns errors into exit codes; in a multi-rank job an
// error that the ranks did not raise together aborts the whole job so that no rank
// waits forever.
#include <climits>
#include <cstdio>
#include <iostream>
#include <memory>
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

// `elbo train`: the spec and its overrides; the trainer does the rest.
cli::Command add_train(CLI::App& elbo) {
  struct Args {
    std::string spec;
    std::vector<std::string> overrides;
    TrainOptions options;
  };
  auto a = std::make_shared<Args>();
  CLI::App* c = elbo.add_subcommand("train", "train a VAE from an experiment spec");
  c->footer(
      "Rank 0 writes OUTPUT_DIR/{spec.yaml,metrics.csv,model.h5,eval.yaml}. Exit codes for job scripts: 75 = "
      "stopped on a signal with a checkpoint (requeue and --resume auto), 76 = forced stop without one, 3 = a "
      "peer rank failed, 2 = bad input.");
  cli::add_positional(*c, "SPEC", &a->spec, "experiment spec (YAML)");
  cli::add_repeated(*c, "--set", &a->overrides, "KEY=VALUE",
                    "override a spec key, e.g. --set optim.lr=3e-4 (repeatable)");
  cli::add_text(*c, "--resume", &a->options.resume, "auto|PATH",
                "continue from a checkpoint: 'auto' = the newest valid one in OUTPUT_DIR/checkpoints (a fresh start "
                "when there is none), or a checkpoint file");
  return {c, [a](Communicator& comm) {
            ExperimentSpec spec;
            collectively(comm, [&] { spec = load_spec(a->spec, a->overrides); });
            const TrainResult r = train(spec, comm, std::cout, a->options);
            return r.stopped ? kExitStopped : kExitOk;
          }};
}

// `elbo eval`: the bounds of a trained model on a test split, data-parallel.
struct EvalArgs {
  std::string model, data, output, device = "auto", loader = "auto";
  int64_t iw = 0, batch = 500, seed = -1, threads = 0, max_samples = 0;
  double cache_mb = 1024, max_hours = 24;
};

int run_eval(const EvalArgs& a, Communicator& comm) {
  collectively(comm, [&] {
    // The results are written after the whole evaluation: a path that cannot take them
    // is refused before any of it.
    if (!a.output.empty() && comm.is_root()) cli::check_output_file(a.output, "elbo eval --output");
  });
  cli::LoadedModel m = cli::load_model(comm, "elbo eval", a.model, a.device, a.threads);
  std::optional<data::ShardSet> set;
  collectively(comm, [&] {
    // A test split larger than memory is read on demand, each rank its own rows.
    // --loader offers only the names of Loader (add_choice below).
    const std::optional<Loader> loader = parse_choice<Loader>(a.loader);
    if (!loader) throw usage_error("elbo eval --loader: '" + a.loader + "' is not one of " + choice_list<Loader>());
    const Loader how = data::resolve_loader(*loader, a.cache_mb, data::split_bytes(a.data));
    set.emplace(data::ShardSet::open(a.data, data::OpenOptions{how == Loader::Memory, comm.rank(), comm.size()}));
    cli::check_model_input(*set, a.data, m, a.model);
  });
  EvalOptions eo;
  eo.iw_samples = static_cast<int>(a.iw);
  eo.batch_size = a.batch;
  eo.max_samples = a.max_samples;
  eo.seed = a.seed >= 0 ? static_cast<uint64_t>(a.seed) : m.file.spec.seed;
  eo.binarize = m.file.spec.data.binarize;
  eo.max_seconds = a.max_hours * 3600;
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
    if (!a.output.empty()) write_text_file_atomic(a.output, eval_yaml(r, a.model, a.data));
  });
  return 0;
}

cli::Command add_eval(CLI::App& elbo) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* c = elbo.add_subcommand("eval", "test negative ELBO, IWAE bound, active units");
  c->footer(
      "Evaluates a trained model on a test split: negative ELBO per sample (nats), its reconstruction and KL "
      "parts, and the k-sample importance-weighted bound.");
  cli::add_positional(*c, "MODEL", &a->model, "model file written by elbo train (model.h5)");
  cli::add_text(*c, "--data", &a->data, "DIR", "test split directory written by elbo-shard")->required();
  cli::add_integer(*c, "--iw-samples", &a->iw, "K", "importance samples for the IWAE bound (0 = skip)", 0, INT_MAX);
  cli::add_integer(*c, "--batch-size", &a->batch, "N", "rows per forward pass on each rank (default 500)", 1);
  cli::add_integer(*c, "--max-samples", &a->max_samples, "N", "evaluate the split's first N samples only (0 = all)", 0);
  cli::add_integer(*c, "--seed", &a->seed, "S", "seed for eps (default: the model's training seed)", 0);
  cli::add_integer(*c, "--threads", &a->threads, "T", "BLAS threads per rank (0 = cores / ranks on the node)", 0);
  cli::add_choice(*c, "--device", &a->device, {"auto", "cpu", "cuda"},
                  "where to evaluate (auto: a GPU when one is visible)");
  cli::add_text(*c, "--output", &a->output, "FILE", "also write the results as YAML to FILE (rank 0)");
  cli::add_choice(*c, "--loader", &a->loader, {"auto", "memory", "stream"},
                  "hold the split in every rank's memory, or read each rank's rows from the files on demand (auto: "
                  "memory when the split fits --cache-mb)");
  cli::add_number(*c, "--cache-mb", &a->cache_mb, "MB",
                  "the split size up to which --loader auto holds it in memory (default 1024)", 0);
  cli::add_number(*c, "--max-hours", &a->max_hours, "H",
                  "refuse an IWAE bound estimated (from a timed pass) to take longer than H hours (default 24, 0 = no "
                  "limit)",
                  0);
  return {c, [a](Communicator& comm) { return run_eval(*a, comm); }};
}

// `elbo info`: the build, the backends and where every rank runs.
int run_info(Communicator& comm) {
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

cli::Command add_info(CLI::App& elbo) {
  CLI::App* c = elbo.add_subcommand("info", "build, backends and MPI world");
  c->footer("Prints the build configuration, the available backends and, node by node, where every rank runs.");
  return {c, run_info};
}

int run(int argc, char** argv, Communicator& comm) {
  cli::CommandLine line("elbo", "Data-parallel VAE training (run under mpirun -np N or srun for N replicas).");
  line.set_version_flag("--version", std::string("elbo ") + kVersion);
  const std::vector<cli::Command> commands = {
      add_train(line), add_eval(line), cli::add_sample(line), cli::add_reconstruct(line), cli::add_interpolate(line),
      add_info(line)};
  line.footer("Run 'elbo <command> --help' for the options of a command.");  // after the commands: not theirs
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    // A bare `elbo` is a usage mistake: the overview on stderr, exit 2.
    if (comm.is_root()) std::fputs(line.help().c_str(), stderr);
    return kExitBadInput;
  }
  // Every rank parses the same line, so a mistake is agreed and printed once.
  std::optional<std::string> text;
  collectively(comm, [&] { text = line.parse_args(args); });
  if (text) {
    if (comm.is_root()) std::fputs(text->c_str(), stdout);
    return kExitOk;
  }
  for (const cli::Command& c : commands)
    if (c.app == line.chosen()) return c.run(comm);
  throw internal_error("elbo: the command line parsed without a command");
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
