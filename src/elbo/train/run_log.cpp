// The run's log, metrics, pictures and output files (see run_log.hpp).
#include "elbo/train/run_log.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "elbo/ckpt/model_file.hpp"
#include "elbo/model/generate.hpp"
#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/viz/image.hpp"
#include "elbo/viz/tensorboard.hpp"

namespace elbo {

namespace fs = std::filesystem;

namespace {

// metrics.csv's columns; new ones go at the end so that column numbers stay valid.
// kl_groups (hierarchical models; empty for the others) is one cell holding each
// latent group's KL per sample, top group first, separated by ';' (a group count that
// depends on the model does not fit fixed columns); TensorBoard gets train/kl_group_L.
constexpr const char* kMetricsHeader =
    "step,epoch,samples,neg_elbo,rec,kl,beta,lr,grad_norm,samples_per_s,elapsed_s,test_neg_elbo,test_rec,test_kl,"
    "skipped_steps,kl_clamped_dims,neg_iwae,kl_groups";

// Appended for a likelihood of 8-bit pixels: the interval's and the test -ELBO in bits/dim.
constexpr const char* kBitsPerDimColumns = ",neg_elbo_bpd,test_neg_elbo_bpd";

std::string hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--:--";
  auto s = static_cast<long long>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%02lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

// Files of a finished or running job; refusing to reuse the directory protects them.
const char* const kRunFiles[] = {"model.h5",    "metrics.csv", "spec.yaml", "eval.yaml",
                                 "samples.png", "recon.png",   "best.h5"};
// Directories a run fills; output.overwrite removes them with the files above.
const char* const kRunDirs[] = {"checkpoints", "images", "tensorboard"};

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

// Rank 0's pictures of the model at this point: 64 samples from the prior (the same
// z every time, so successive grids show the model learning) and the first 32 test
// inputs beside their reconstructions; DIR/samplesTAG.png and DIR/reconTAG.png, and
// the same images at `step` in TensorBoard when `tb` is given.
void write_grids(const fs::path& dir, const std::string& tag, const ModelLayout& layout, Backend<float>& be,
                 const float* params, const ExperimentSpec& spec, const data::ShardSet& test, int64_t step,
                 viz::EventWriter* tb) {
  const std::vector<int> shape = {test.channels(), test.height(), test.width()};  // the training shape (checked)
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw io_error("cannot create " + dir.string() + ": " + ec.message());
  const std::vector<float> samples = sample_from_prior(layout, be, params, 64, spec.seed);
  const viz::Image sample_grid = viz::tile(samples.data(), 64, shape[0], shape[1], shape[2], 8);
  viz::write_png((dir / ("samples" + tag + ".png")).string(), sample_grid);
  const int n = static_cast<int>(std::min<int64_t>(32, test.size()));
  std::vector<int64_t> items(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) items[i] = i;
  const std::vector<float> x = gray_inputs(test, items, spec.data.test);
  const std::vector<float> r = reconstruct(layout, be, params, x.data(), n);
  const viz::Image recon_grid = viz::tile_pairs(x.data(), r.data(), n, shape[0], shape[1], shape[2], 8);
  viz::write_png((dir / ("recon" + tag + ".png")).string(), recon_grid);
  if (tb != nullptr) {
    tb->image("images/samples", step, sample_grid);
    tb->image("images/recon", step, recon_grid);
    tb->flush();
  }
}

// metrics.csv of a resumed run: the rows up to the checkpoint's step stay, later
// ones (logged after the checkpoint by the interrupted run) are dropped. A file from
// an earlier version with fewer columns gets the current header and empty cells.
void truncate_metrics(const std::string& csv, int64_t step, const std::string& current) {
  std::ifstream in(csv);
  if (!in) return;
  std::ostringstream kept;
  std::string line, header;
  std::getline(in, header);
  const bool older = header != current && current.compare(0, header.size(), header) == 0;
  const std::string pad(older ? std::count(current.begin(), current.end(), ',') -
                                    std::count(header.begin(), header.end(), ',')
                              : 0,
                        ',');
  kept << (older ? current : header) << "\n";
  while (std::getline(in, line))
    if (!line.empty() && std::stoll(line.substr(0, line.find(','))) <= step) kept << line << pad << "\n";
  write_text_file_atomic(csv, kept.str());
}

}  // namespace

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

RunLog::RunLog(const ExperimentSpec& spec, std::ostream& log, bool root)
    : m_spec(spec), m_log(log), m_root(root), m_header(kMetricsHeader) {}

void RunLog::start(const Communicator& comm, const Backend<float>& be, const Placement& place, int threads,
                   const Replica& replica, const TrainingData& data, const BatchPrep& batches,
                   const ModelLayout& layout, const StepPlan& plan, const ResumePoint& resumed) {
  m_latent_values = static_cast<int>(layout.eps_per_row());
  if (layout.likelihood().is_dlm()) {
    m_bpd_dim = layout.input_dim();
    m_header = std::string(kMetricsHeader) + kBitsPerDimColumns;
  }
  if (!m_root) return;
  const ExperimentSpec& spec = m_spec;
  const int world = comm.size();
  const fs::path out_dir(spec.output.dir);
  std::string resolved = dump_spec(spec);
  m_log << "elbo train: " << spec.name << " | " << world << " rank(s) on " << comm.world().nodes << " node(s) via "
        << launcher_description() << " | backend " << be.name()
        << (place.device == DeviceKind::Cpu ? " x " + std::to_string(threads) + " BLAS thread(s)"
                                            : " (GPU " + std::to_string(place.gpu) + " on rank 0)")
        << " (" << place.why << ")\n"
        << "gradients: " << replica.describe_gradient_sync() << "\n"
        << "optimizer: " << replica.describe_optimizer() << "\n"
        << "step graph: "
        << (replica.uses_graph() ? "on (steady-state forward/backward replayed as one recorded graph)"
            : spec.loss.free_bits > 0 && spec.train.cuda_graph != GraphMode::Off
                ? "off (loss.free_bits: the KL all-reduce sits between forward and backward)"
            : spec.train.accumulate > 1 ? "off (train.accumulate)"
                                        : "off")
        << "\n"
        << (spec.train.accumulate > 1
                ? "batch: " + std::to_string(spec.train.batch_size) + " per update = " + std::to_string(world) +
                      " rank(s) x " + std::to_string(spec.train.accumulate) + " micro-batches of " +
                      std::to_string(spec.train.batch_size / world / spec.train.accumulate) +
                      " rows (train.accumulate), one gradient reduction per update\n"
                : std::string())
        << "data: " << data.n << " training samples of shape " << shape_string(data.input_shape, "[]") << " from "
        << spec.data.train << "\n";
  const int64_t block = batches.order().block;
  char mb[64];
  std::snprintf(mb, sizeof(mb), "%.1f MB", static_cast<double>(data.train->bytes()) / 1e6);
  m_log << "data: loader " << data.train_loader << " (data.loader: " << spec.data.loader << ", split " << mb
        << ", data.cache_mb: " << spec.data.cache_mb << ")"
        << (data.train_loader == Loader::Stream ? (spec.data.shuffle == Shuffle::Blocks
                                                 ? " | order: shuffled blocks of " + std::to_string(block) +
                                                       " samples, each rank reads about 1/" + std::to_string(world) +
                                                       " of the split per epoch"
                                                 : std::string(" | order: ") +
                                                       (spec.data.shuffle == Shuffle::Global ? "a global permutation: each rank reads "
                                                                            "its samples one by one (data.shuffle: "
                                                                            "blocks reads runs)"
                                                                          : "sequential"))
                                           : std::string())
        << "\n";
  if (data.train_loader == Loader::Stream && spec.data.shuffle == Shuffle::Blocks) {
    // A rank's working set: the current windows of its canonical streams (sampler.hpp).
    const int64_t streams = (data::kCanonicalStreams + world - 1) / world + (data::kCanonicalStreams % world ? 2 : 0);
    const double need = static_cast<double>(streams * (data::kShuffleWindow + 1) * block) * data.dim;
    if (spec.data.cache_mb * 1048576.0 < need)
      m_log << "warning: data.cache_mb: " << spec.data.cache_mb << " is below a rank's working set of about "
            << need / 1048576.0 << " MiB: blocks will be read more than once per epoch\n";
  }
  for (const auto* set : {&*data.train, data.test ? &*data.test : nullptr})
    if (set != nullptr && !set->verification_note().empty()) m_log << "data: " << set->verification_note() << "\n";
  m_log << "model: " << layout.num_values() << " parameters | " << plan.total << " steps (" << plan.per_epoch
        << " per epoch)\n"
        << resumed.notes;
  if (spec.optim.ema > 0)
    m_log << "ema: evaluations, image grids, model.h5 and best.h5 use the moving average of the parameters "
             "(optim.ema: "
          << spec.optim.ema << "); model.h5 keeps the parameters themselves under /params_raw\n";
  if (spec.train.patience > 0)
    m_log << "patience: training stops after " << spec.train.patience << " evaluation(s) (every " << spec.eval.every
          << " steps) without a better test -ELBO than the best so far\n";
  m_log << "resolved spec:\n" << resolved << std::flush;
  write_text_file_atomic((out_dir / "spec.yaml").string(), resolved);
  const fs::path csv_path = out_dir / "metrics.csv";
  if (resumed.resumed && fs::exists(csv_path)) {
    truncate_metrics(csv_path.string(), resumed.state.step, m_header);
    m_csv.open(csv_path, std::ios::app);
  } else {
    m_csv.open(csv_path, std::ios::trunc);
    if (m_csv) m_csv << m_header << "\n";
  }
  if (!m_csv) throw io_error("cannot write " + csv_path.string());
  // Event files live in their own directory (output.overwrite removes it whole). A
  // resumed run drops the interrupted run's events after the checkpoint, as from
  // metrics.csv, and appends a new file, so no step appears twice.
  const fs::path tb_dir = out_dir / "tensorboard";
  if (resumed.resumed) viz::truncate_event_files(tb_dir.string(), resumed.state.step);
  if (m_spec.output.tensorboard) m_tb = std::make_unique<viz::EventWriter>(tb_dir.string());
}

void RunLog::write_row(const std::string& row) {
  m_csv << row << std::flush;
  if (m_tb) {
    const viz::MetricsRow m = viz::metrics_row(m_header, row);
    m_tb->scalars(m.step, m.scalars);
    m_tb->flush();
  }
}

void RunLog::clear_bar() {
  if (m_bar) m_bar->clear();
}

void RunLog::line(const std::string& text) {
  if (!m_root) return;
  clear_bar();
  m_log << text << "\n" << std::flush;
}

void RunLog::warning(const std::string& text) { line("warning: " + text); }

void RunLog::begin_training(int64_t first_step, int64_t total_steps) {
  m_t0 = Clock::now();
  m_iv = Interval{};
  m_first_step = first_step;
  m_total_steps = total_steps;
}

void RunLog::begin_epoch(int64_t epoch, int64_t per_epoch) {
  // On a terminal, a bar for the epoch under the log lines (elsewhere the lines suffice).
  m_bar.emplace("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(m_spec.train.epochs), per_epoch, m_root,
                false);
}

void RunLog::batch_done(int64_t batches_done) {
  if (m_bar) m_bar->update(batches_done);
}

void RunLog::end_epoch() { m_bar.reset(); }

void RunLog::count(const StepResult& r, int64_t global_rows, double data_wait_s) {
  m_iv.data_s += data_wait_s;
  if (!r.applied()) {
    ++m_iv.skipped;
    return;
  }
  m_iv.rec += r.rec;
  m_iv.kl += r.kl;
  m_iv.iw_bound += r.iw_bound;
  m_iv.samples += static_cast<double>(global_rows);
  m_iv.grad_norm += r.grad_norm;
  if (r.kl_clamped_dims >= 0) m_iv.kl_clamped_dims += r.kl_clamped_dims;
  m_iv.kl_groups.resize(r.kl_groups.size(), 0.0);
  for (size_t l = 0; l < r.kl_groups.size(); ++l) m_iv.kl_groups[l] += r.kl_groups[l];
  ++m_iv.steps;
}

void RunLog::end_interval(const TrainState& st, int64_t epoch, double beta, double lr, const EvalResult* eval) {
  const int64_t step = st.step;
  if (m_iv.steps == 0 && m_iv.skipped > 0) {
    // Nothing trained in this interval: a row that says so (no losses to average).
    if (m_root) {
      std::ostringstream row;
      row << step << "," << epoch + 1 << "," << st.samples_seen << ",,,," << beta << "," << lr << ",,,"
          << std::chrono::duration<double>(Clock::now() - m_t0).count() << ",,,," << st.skipped_steps << ",,,"
          << (m_bpd_dim > 0 ? ",," : "") << "\n";
      write_row(row.str());
    }
    m_iv = Interval{};
  }
  if (m_iv.steps == 0) return;
  const double secs = std::chrono::duration<double>(Clock::now() - m_iv.start).count();
  const double elapsed = std::chrono::duration<double>(Clock::now() - m_t0).count();
  const double rate = m_iv.samples / std::max(secs, 1e-9);
  const double eta = elapsed / static_cast<double>(std::max<int64_t>(1, step - m_first_step)) *
                     static_cast<double>(m_total_steps - step);
  const double r = m_iv.rec / m_iv.samples, k = m_iv.kl / m_iv.samples;
  m_last_neg_elbo = r + k;
  // Free bits: the mean number of latent dimensions clamped per step (the logged kl
  // stays the true KL, so this says how much of it the objective floored).
  const bool free_bits = m_spec.loss.free_bits > 0;
  const double clamped = m_iv.kl_clamped_dims / static_cast<double>(m_iv.steps);
  // loss.type iwae: the bound it trains (at the step's beta), per sample; rec and kl stay
  // the ELBO's (mean nll over the samples, closed-form KL), comparable with an elbo run.
  const bool iwae = m_spec.loss.type == LossType::Iwae;
  const double neg_iwae = m_iv.iw_bound / m_iv.samples;
  if (m_root) {
    char note[64] = "", bpd_note[48] = "";
    if (free_bits) std::snprintf(note, sizeof(note), " | clamped %.3g/%d", clamped, m_latent_values);
    if (iwae) std::snprintf(note, sizeof(note), " | -iwae(k=%d) %.3f", m_spec.loss.samples, neg_iwae);
    if (m_bpd_dim > 0) std::snprintf(bpd_note, sizeof(bpd_note), " = %.4f bits/dim", bits_per_dim(r + k, m_bpd_dim));
    char line[440];
    std::snprintf(line, sizeof(line),
                  "epoch %lld/%lld step %lld/%lld | -elbo %.3f%s (rec %.3f, kl %.3f) | beta %.3g%s | lr %.3e | "
                  "|g| %.3g | %.0f samples/s | eta %s | data wait %.0f%%\n",
                  static_cast<long long>(epoch + 1), static_cast<long long>(m_spec.train.epochs),
                  static_cast<long long>(step), static_cast<long long>(m_total_steps), r + k, bpd_note, r, k, beta,
                  note, lr, m_iv.grad_norm / static_cast<double>(m_iv.steps), rate, hms(eta).c_str(),
                  100.0 * std::min(1.0, m_iv.data_s / std::max(secs, 1e-9)));
    clear_bar();
    m_log << line << std::flush;
    char row[400];
    int len = std::snprintf(row, sizeof(row), "%lld,%lld,%lld,%.6f,%.6f,%.6f,%.6g,%.6g,%.6g,%.1f,%.3f,",
                            static_cast<long long>(step), static_cast<long long>(epoch + 1),
                            static_cast<long long>(st.samples_seen), r + k, r, k, beta, lr,
                            m_iv.grad_norm / static_cast<double>(m_iv.steps), rate, elapsed);
    if (eval != nullptr)
      len += std::snprintf(row + len, sizeof(row) - len, "%.6f,%.6f,%.6f,", eval->neg_elbo, eval->rec, eval->kl);
    else
      len += std::snprintf(row + len, sizeof(row) - len, ",,,");
    len += std::snprintf(row + len, sizeof(row) - len, "%lld,", static_cast<long long>(st.skipped_steps));
    if (free_bits) len += std::snprintf(row + len, sizeof(row) - len, "%.6g", clamped);
    if (iwae)
      len += std::snprintf(row + len, sizeof(row) - len, ",%.6f,", neg_iwae);
    else
      len += std::snprintf(row + len, sizeof(row) - len, ",,");
    std::string full(row, static_cast<size_t>(len));
    for (size_t l = 0; l < m_iv.kl_groups.size(); ++l) {
      char cell[32];
      std::snprintf(cell, sizeof(cell), "%s%.6f", l > 0 ? ";" : "", m_iv.kl_groups[l] / m_iv.samples);
      full += cell;
    }
    if (m_bpd_dim > 0) {
      char cells[64];
      int n = std::snprintf(cells, sizeof(cells), ",%.6f,", bits_per_dim(r + k, m_bpd_dim));
      if (eval != nullptr) std::snprintf(cells + n, sizeof(cells) - n, "%.6f", bits_per_dim(eval->neg_elbo, m_bpd_dim));
      full += cells;
    }
    write_row(full + "\n");
  }
  m_iv = Interval{};
}

void RunLog::periodic_eval(int64_t step, const EvalResult& r, const ModelLayout& layout, Backend<float>& be,
                           const float* params, const data::ShardSet& test) {
  if (!m_root) return;
  m_log << "eval at step " << step << ": " << format_eval(r) << "\n" << std::flush;
  if (m_spec.eval.images) {
    char tag[32];
    std::snprintf(tag, sizeof(tag), "-%09lld", static_cast<long long>(step));
    write_grids(fs::path(m_spec.output.dir) / "images", tag, layout, be, params, m_spec, test, step, m_tb.get());
  }
}

void RunLog::stream_summary(Communicator& comm, const data::StreamStats& ss, double epochs_run, double split_bytes) {
  double mine[3] = {static_cast<double>(ss.bytes_read), static_cast<double>(ss.cache_peak_bytes),
                    static_cast<double>(ss.reads)};
  double most[3];
  for (int k = 0; k < 3; ++k)  // KiB for the byte counts: allreduce_max takes an int
    most[k] = comm.allreduce_max(static_cast<int>(std::min(mine[k] / (k < 2 ? 1024.0 : 1.0), 2e9)));
  if (!m_root) return;
  char line[320];
  std::snprintf(line, sizeof(line),
                "data: stream read at most %.1f%% of the split per rank per epoch (%.2f MB in %.0f reads over "
                "%.2f epoch(s)); block cache peak %.2f MB (data.cache_mb: %g)\n",
                100.0 * most[0] * 1024.0 / split_bytes / std::max(epochs_run, 1e-9), most[0] * 1024.0 / 1e6, most[2],
                epochs_run, most[1] * 1024.0 / 1e6, m_spec.data.cache_mb);
  m_log << line << std::flush;
}

void RunLog::write_model(const std::string& path, const std::vector<int>& input_shape, const ModelLayout& layout,
                         const float* host_params, int64_t step, int64_t epoch, const ModelFileExtras& extras) {
  if (!m_root) return;
  write_model_file(path, m_spec, input_shape, layout, host_params, step, epoch, extras);
  m_log << "wrote " << path << " (" << layout.num_values() << " parameters, step " << step
        << (extras.raw_params != nullptr ? "; /params: their moving average, /params_raw: the parameters" : "") << ")\n"
        << std::flush;
}

void RunLog::write_best(const std::vector<int>& input_shape, const ModelLayout& layout, const float* host_params,
                        const TrainState& st, const TrainState& previous, const ModelFileExtras& extras) {
  if (!m_root) return;
  const std::string path = (fs::path(m_spec.output.dir) / "best.h5").string();
  write_model_file(path, m_spec, input_shape, layout, host_params, st.best_step, st.epoch, extras);
  char text[240];
  if (previous.best_step >= 0)
    std::snprintf(text, sizeof(text), "best: test -ELBO %.4f at step %lld improves on %.4f at step %lld", st.best_bound,
                  static_cast<long long>(st.best_step), previous.best_bound,
                  static_cast<long long>(previous.best_step));
  else
    std::snprintf(text, sizeof(text), "best: test -ELBO %.4f at step %lld", st.best_bound,
                  static_cast<long long>(st.best_step));
  line(std::string(text) + ": wrote " + path);
}

void RunLog::final_eval(int64_t step, const EvalResult& r, const std::string& model_path, const ModelLayout& layout,
                        Backend<float>& be, const float* params, const data::ShardSet& test) {
  if (!m_root) return;
  const fs::path out_dir(m_spec.output.dir);
  m_log << format_eval(r) << "\n" << format_kl_per_dim(r) << "\n" << std::flush;
  write_text_file_atomic((out_dir / "eval.yaml").string(), eval_yaml(r, model_path, m_spec.data.test));
  if (m_spec.eval.images) {
    write_grids(out_dir, "", layout, be, params, m_spec, test, step, m_tb.get());
    m_log << "wrote " << (out_dir / "samples.png").string() << " and " << (out_dir / "recon.png").string() << "\n"
          << std::flush;
  }
}

}  // namespace elbo
