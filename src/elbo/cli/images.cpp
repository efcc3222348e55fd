// elbo sample / reconstruct / interpolate: decode, then tile into a PNG grid. Rank 0
// does the work (a few hundred images take milliseconds); under mpirun the other
// ranks only load the model and wait, so errors stay collective.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <numeric>
#include <optional>

#include "elbo/cli/args.hpp"
#include "elbo/cli/commands.hpp"
#include "elbo/data/shards.hpp"
#include "elbo/dist/placement.hpp"
#include "elbo/model/generate.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/train/trainer.hpp"
#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/viz/image.hpp"

namespace elbo::cli {

LoadedModel load_model(Communicator& comm, const std::string& command, const std::string& path,
                       const std::string& device, int64_t threads) {
  LoadedModel m;
  collectively(comm, [&] {
    m.file = read_model_file(path);
    if (comm.is_root() && !m.file.verified)
      std::cerr << "note: " << path << " carries no checksums (written by an older elbo): its parameters are not "
                   "verified\n";
    const auto& s = m.file.input_shape;
    m.layout = make_layout(m.file.spec.model, s);
    ExperimentSpec where = m.file.spec;  // inference needs no gradient communicator
    where.source = command + " --device";
    // The command line offers only the names of Device (add_choice below).
    const std::optional<Device> wanted = parse_choice<Device>(device);
    if (!wanted) throw usage_error(command + " --device: '" + device + "' is not one of " + choice_list<Device>());
    where.device = *wanted;
    where.dist.communicator = CommKind::Auto;
    const Placement place = resolve_placement(where, comm.world(), probe_backends());
    m.backend = make_backend<float>(place.device, threads_per_rank(static_cast<int>(threads), comm.world().local_size),
                                    place.gpu);
  });
  m.params = Buffer<float>(*m.backend, m.layout->num_params());
  m.backend->upload(m.params.data(), m.file.params.data(), m.file.params.size());
  return m;
}

void check_model_input(const data::ShardSet& set, const std::string& dir, const LoadedModel& m,
                       const std::string& model_path) {
  if (set.shape() != m.file.input_shape)
    throw data_error(dir + ": samples have shape " + shape_string(set.shape(), "[]") + " but the model " + model_path +
                     " was trained on " + shape_string(m.file.input_shape, "[]"));
}

namespace {

// Options every image command has.
struct ImageOptions {
  std::string model, out, device = "auto";
  int64_t threads = 0, cols = 8;
  bool force = false;
};

void add_common(CLI::App& c, ImageOptions* o, const char* default_out) {
  o->out = default_out;
  add_positional(c, "MODEL", &o->model, "model file written by elbo train (model.h5)");
  add_text(c, "-o", &o->out, "FILE.png",
           std::string("where to write the grid (default ") + default_out +
               "); an existing file is replaced only with --force");
  c.add_flag("--force", o->force, "replace an existing -o file (never the model or the data this command reads)");
  add_integer(c, "--cols", &o->cols, "C", "images per grid row (default 8)", 1);
  add_choice(c, "--device", &o->device, {"auto", "cpu", "cuda"},
             "where to run the model (auto: a GPU when one is visible)");
  add_integer(c, "--threads", &o->threads, "T", "BLAS threads (0 = the node's cores / ranks)", 0);
}

data::ShardSet open_matching(const std::string& dir, const LoadedModel& m, const std::string& model_path) {
  // These commands read a few dozen samples: on demand, whatever the split's size.
  data::ShardSet set = data::ShardSet::open(dir, data::OpenOptions{false, 0, 1});
  check_model_input(set, dir, m, model_path);
  return set;
}

// Before writing: the grid must never replace what the command reads, and replaces
// another existing file only with --force. Inputs are compared by file identity, so
// "./model.h5", a hard link and a symbolic link to the model are the model; the
// temporary file the PNG goes through first is checked too.
void check_output(const ImageOptions& o, const std::string& data_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  auto same = [&](const fs::path& a, const fs::path& b) { return fs::equivalent(a, b, ec); };
  auto is_input = [&](const fs::path& f, std::string* what) {
    if (same(f, o.model)) {
      *what = "the model file " + o.model;
      return true;
    }
    if (data_dir.empty()) return false;
    // The split's directory itself, or a file in it (a shard, the manifest).
    bool in_split = same(f, data_dir);
    for (const auto& e : fs::directory_iterator(data_dir, ec)) in_split = in_split || same(f, e.path());
    if (in_split) *what = "a file of the data split " + data_dir;
    return in_split;
  };
  const std::string refused = ", which this command reads; refusing to overwrite it (choose another output file)";
  std::string what;
  if (is_input(o.out, &what)) throw usage_error("-o " + o.out + ": is " + what + refused);
  if (is_input(o.out + ".tmp", &what))
    throw usage_error("-o " + o.out + ": its temporary file " + o.out + ".tmp is " + what + refused);
  if (fs::is_directory(o.out, ec)) throw usage_error("-o " + o.out + ": is a directory; name the PNG file to write");
  if (fs::exists(fs::symlink_status(o.out, ec)) && !o.force)
    throw usage_error("-o " + o.out + ": the file exists; refusing to overwrite it (pass --force to replace it)");
}

void write_grid(const LoadedModel& m, const std::vector<float>& images, int n, int cols, const std::string& out) {
  const auto& s = m.file.input_shape;
  viz::write_png(out, viz::tile(images.data(), n, s[0], s[1], s[2], cols));
}

struct SampleArgs {
  ImageOptions o;
  int64_t n = 64, seed = -1;
};

int run_sample(const SampleArgs& a, Communicator& comm) {
  const ImageOptions& o = a.o;
  LoadedModel m = load_model(comm, "elbo sample", o.model, o.device, o.threads);
  collectively(comm, [&] {
    if (!comm.is_root()) return;
    const uint64_t s = a.seed >= 0 ? static_cast<uint64_t>(a.seed) : m.file.spec.seed;
    const auto images = sample_from_prior(*m.layout, *m.backend, m.params.data(), static_cast<int>(a.n), s);
    check_output(o, "");
    write_grid(m, images, static_cast<int>(a.n), static_cast<int>(o.cols), o.out);
    std::cout << "wrote " << o.out << ": " << a.n << " samples from " << o.model << " (seed " << s << ")\n";
  });
  return 0;
}

struct ReconstructArgs {
  ImageOptions o;
  std::string data;
  int64_t n = 32, first = 0;
};

int run_reconstruct(const ReconstructArgs& a, Communicator& comm) {
  const ImageOptions& o = a.o;
  LoadedModel m = load_model(comm, "elbo reconstruct", o.model, o.device, o.threads);
  collectively(comm, [&] {
    if (!comm.is_root()) return;
    const data::ShardSet set = open_matching(a.data, m, o.model);
    std::vector<int64_t> items(static_cast<size_t>(a.n));
    std::iota(items.begin(), items.end(), a.first);
    const std::vector<float> x = gray_inputs(set, items, a.data);
    const std::vector<float> r = reconstruct(*m.layout, *m.backend, m.params.data(), x.data(), static_cast<int>(a.n));
    const auto& sh = m.file.input_shape;
    check_output(o, a.data);
    viz::write_png(o.out, viz::tile_pairs(x.data(), r.data(), static_cast<int>(a.n), sh[0], sh[1], sh[2],
                                          static_cast<int>(o.cols)));
    std::cout << "wrote " << o.out << ": " << a.n << " inputs from " << a.data << " (from " << a.first
              << ") and their reconstructions\n";
  });
  return 0;
}

struct InterpolateArgs {
  ImageOptions o;
  std::string data;
  int64_t from = 0, to = 1, steps = 10;
};

int run_interpolate(const InterpolateArgs& a, Communicator& comm) {
  const ImageOptions& o = a.o;
  LoadedModel m = load_model(comm, "elbo interpolate", o.model, o.device, o.threads);
  collectively(comm, [&] {
    // A hierarchical model's latents are groups at several resolutions, each group's
    // posterior conditioned on the groups sampled above it: there is no one posterior
    // mean per input to draw a line between, so the command says so instead of
    // choosing a convention (such as the top group only) behind the user's back.
    if (dynamic_cast<const VaeLayout*>(m.layout.get()) == nullptr)
      throw usage_error("elbo interpolate: " + o.model + " is a " + choice_name(m.file.spec.model.type) +
                        " model, whose latents are groups conditioned on one another, with no single latent "
                        "vector to interpolate; interpolate works with mlp and conv models (use elbo sample or "
                        "elbo reconstruct)");
    if (!comm.is_root()) return;
    const data::ShardSet set = open_matching(a.data, m, o.model);
    const std::vector<float> x = gray_inputs(set, {a.from, a.to}, a.data);
    const VaeLayout& vae = dynamic_cast<const VaeLayout&>(*m.layout);
    const std::vector<float> mu = posterior_means(vae, *m.backend, m.params.data(), x.data(), 2);
    const int L = vae.latent();
    const int steps = static_cast<int>(a.steps);
    const std::vector<float> z = interpolate_latents(mu.data(), mu.data() + L, L, steps);
    const std::vector<float> dec = decode_means(vae, *m.backend, m.params.data(), z.data(), steps);
    const size_t D = set.sample_dim();
    std::vector<float> row(x.begin(), x.begin() + D);
    row.insert(row.end(), dec.begin(), dec.end());
    row.insert(row.end(), x.begin() + D, x.end());
    check_output(o, a.data);
    write_grid(m, row, steps + 2, steps + 2, o.out);
    std::cout << "wrote " << o.out << ": " << a.steps << " points from sample " << a.from << " to sample " << a.to
              << " of " << a.data << "\n";
  });
  return 0;
}

}  // namespace

Command add_sample(CLI::App& elbo) {
  auto a = std::make_shared<SampleArgs>();
  CLI::App* c = elbo.add_subcommand("sample", "decode z ~ N(0, I) into a PNG grid");
  c->footer("Decodes z ~ N(0, I) into a PNG grid of E[x|z] (Bernoulli probabilities or Gaussian means).");
  add_common(*c, &a->o, "samples.png");
  add_integer(*c, "-n", &a->n, "N", "number of samples (default 64)", 1);
  add_integer(*c, "--seed", &a->seed, "S", "seed for z (default: the model's training seed)", 0);
  return {c, [a](Communicator& comm) { return run_sample(*a, comm); }};
}

Command add_reconstruct(CLI::App& elbo) {
  auto a = std::make_shared<ReconstructArgs>();
  CLI::App* c = elbo.add_subcommand("reconstruct", "inputs beside their reconstructions");
  c->footer(
      "Inputs beside their reconstructions E[x | z = mu(x)]: each row of inputs is followed by a row of their "
      "reconstructions.");
  add_common(*c, &a->o, "recon.png");
  add_text(*c, "--data", &a->data, "DIR", "split directory written by elbo-shard (e.g. data/fmnist/test)")->required();
  add_integer(*c, "-n", &a->n, "N", "number of inputs (default 32)", 1);
  add_integer(*c, "--first", &a->first, "I", "index of the first input in the split (default 0)", 0);
  return {c, [a](Communicator& comm) { return run_reconstruct(*a, comm); }};
}

Command add_interpolate(CLI::App& elbo) {
  auto a = std::make_shared<InterpolateArgs>();
  CLI::App* c = elbo.add_subcommand("interpolate", "decode the line between two inputs' latents");
  c->footer(
      "Decodes the straight line between the posterior means of two inputs: one row [input A, steps decoded "
      "points from mu(A) to mu(B), input B].");
  add_common(*c, &a->o, "interpolation.png");
  add_text(*c, "--data", &a->data, "DIR", "split directory written by elbo-shard (e.g. data/fmnist/test)")->required();
  add_integer(*c, "--from", &a->from, "I", "index of input A in the split (default 0)", 0);
  add_integer(*c, "--to", &a->to, "J", "index of input B in the split (default 1)", 0);
  add_integer(*c, "--steps", &a->steps, "K", "decoded points including both ends (default 10)", 2);
  return {c, [a](Communicator& comm) { return run_interpolate(*a, comm); }};
}

}  // namespace elbo::cli
