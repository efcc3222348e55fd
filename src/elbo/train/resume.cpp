// Resuming a run and writing the checkpoints it resumes from (see resume.hpp).
#include "elbo/train/resume.hpp"

#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"

namespace elbo {

namespace fs = std::filesystem;

namespace {

// best.h5 is the model at the checkpoint's best_step, unless the interrupted job wrote a
// newer one after the checkpoint, or the run continues in another directory: say so.
void best_h5_note(const fs::path& best, const Checkpoint& ck, std::ostream& notes) {
  if (ck.state.best_step < 0) return;
  int64_t step = -1;
  try {
    if (fs::exists(best)) step = h5::read_attr_int(h5::open_file(best.string()), "step");
  } catch (const Error&) {
    step = -2;  // unreadable: the next improvement replaces it
  }
  if (step == ck.state.best_step) return;
  char bound[32];
  std::snprintf(bound, sizeof(bound), "%.4f", ck.state.best_bound);
  notes << "resume: the best test -ELBO so far is " << bound << " at step " << ck.state.best_step << ", but "
        << (step == -1   ? best.string() + " does not exist (it is in the directory of the run that reached it)"
            : step == -2 ? best.string() + " cannot be read"
                         : best.string() + " holds step " + std::to_string(step) +
                               " (written after the checkpoint by the interrupted job)")
        << "; it is replaced at the next evaluation that improves on that bound\n";
}

}  // namespace

ResumePoint resume_run(const std::string& resume, const ExperimentSpec& spec, Communicator& comm,
                       const TrainingData& data, const TrainState& fresh, Replica& replica) {
  ResumePoint point;
  point.state = fresh;
  if (resume.empty()) return point;
  const bool root = comm.is_root();
  const fs::path out_dir(spec.output.dir);
  const fs::path ckpt_dir = out_dir / "checkpoints";
  std::ostringstream notes;
  Checkpoint ck;
  int resumed = 0;
  collectively(comm, [&] {
    if (!root) return;
    if (resume == "auto") {
      std::vector<std::string> skipped;
      const bool found = find_resume_checkpoint(ckpt_dir.string(), &ck, &skipped);
      for (const auto& why : skipped) notes << "resume: skipping an unusable checkpoint: " << why << "\n";
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
        notes << "resume: no checkpoint in " << ckpt_dir.string() << "; starting from step 0\n";
        return;
      }
    } else {
      ck = read_checkpoint(resume);
    }
    if (ck.input_shape != data.input_shape)
      throw data_error(ck.path + ": the checkpoint was trained on samples of shape " +
                       shape_string(ck.input_shape, "[]") + " but " + spec.data.train + " holds " +
                       shape_string(data.input_shape, "[]"));
    for (const auto& c : check_resume_compatible(ck.spec, spec, ck.path))
      notes << "resume: spec change accepted: " << c << "\n";
    if (ck.state.train_samples != data.n)
      throw config_error(spec.source + ": data.train: " + spec.data.train + " yields " + std::to_string(data.n) +
                         " training samples but the checkpoint " + ck.path + " was trained on " +
                         std::to_string(ck.state.train_samples) + "; the sample order would change");
    // optim.ema may change on resume: the average never feeds back into training, so
    // the parameters continue bit for bit whatever it is; only what it averages changes.
    if (replica.has_ema() && ck.ema.empty())
      notes << "resume: " << ck.path << " holds no moving average of the parameters; optim.ema (" << spec.optim.ema
            << ") starts from its parameters at step " << ck.state.step << "\n";
    else if (!replica.has_ema() && !ck.ema.empty())
      notes << "resume: optim.ema is 0: the moving average in " << ck.path << " is not used, and later "
            << "checkpoints, model.h5 and evaluations leave it out\n";
    best_h5_note(out_dir / "best.h5", ck, notes);
    notes << "resume: continuing from " << ck.path << " at step " << ck.state.step << " (epoch "
          << ck.state.epoch + 1 << ", batch " << ck.state.batch_in_epoch << "), written by "
          << ck.state.world_size << " rank(s)\n";
    resumed = 1;
  });
  point.notes = notes.str();
  comm.broadcast(&resumed, sizeof(resumed), 0);
  if (!resumed) return point;
  point.resumed = true;
  TrainState& st = point.state;
  if (root) st = ck.state;
  comm.broadcast(&st, sizeof(st), 0);
  const size_t P = replica.num_params();
  std::vector<float> host_p(P), host_m(P), host_v(P);
  if (root) {
    host_p = ck.params;
    host_m = ck.exp_avg;
    host_v = ck.exp_avg_sq;
  }
  comm.broadcast(host_p.data(), P * sizeof(float), 0);
  comm.broadcast(host_m.data(), P * sizeof(float), 0);
  comm.broadcast(host_v.data(), P * sizeof(float), 0);
  replica.load_state(host_p.data(), host_m.data(), host_v.data(), st.adam_steps);
  if (replica.has_ema()) {
    int stored = root && !ck.ema.empty() ? 1 : 0;
    comm.broadcast(&stored, sizeof(stored), 0);
    if (stored) {
      if (root) host_m = ck.ema;  // host_m's values are loaded: reuse its memory
      comm.broadcast(host_m.data(), P * sizeof(float), 0);
      replica.load_ema(host_m.data());
    } else {
      replica.load_ema(host_p.data());  // said in the notes: the average starts here
    }
  }
  // The LR schedule's horizon follows the current spec (train.epochs/max_steps may grow).
  st.total_steps = fresh.total_steps;
  st.world_size = fresh.world_size;
  return point;
}

Checkpoints::Checkpoints(const ExperimentSpec& spec, bool root, const std::vector<int>& input_shape,
                         const ModelLayout& layout, Replica& replica)
    : m_spec(spec),
      m_root(root),
      m_input_shape(input_shape),
      m_layout(layout),
      m_replica(replica),
      m_dir((fs::path(spec.output.dir) / "checkpoints").string()) {}

Checkpoints::~Checkpoints() {
  if (m_thread.joinable()) m_thread.join();
}

void Checkpoints::save(const TrainState& state, bool wait_for_it) {
  // Every rank: a sharded optimizer gathers its moments to rank 0 here.
  const size_t P = m_root ? m_replica.num_params() : 0;
  auto hp = std::make_shared<std::vector<float>>(P), hm = std::make_shared<std::vector<float>>(P),
       hv = std::make_shared<std::vector<float>>(P);
  m_replica.gather_state(hp->data(), hm->data(), hv->data());
  if (!m_root) return;
  std::shared_ptr<std::vector<float>> he;
  if (m_replica.has_ema()) {
    he = std::make_shared<std::vector<float>>(P);
    m_replica.download_ema(he->data());
  }
  const TrainState snap = state;
  const std::string name = checkpoint_file_name(snap.step);
  m_last_path = (fs::path(m_dir) / name).string();
  wait();
  m_thread = std::thread([this, hp, hm, hv, he, snap, name, path = m_last_path] {
    try {
      write_checkpoint(path, m_spec, m_input_shape, m_layout, hp->data(), hm->data(), hv->data(),
                       he ? he->data() : nullptr, snap);
      publish_checkpoint(m_dir, name, m_spec.checkpoint.keep);
    } catch (...) {
      m_error = std::current_exception();
    }
  });
  if (wait_for_it) wait();
}

void Checkpoints::wait() {
  if (m_thread.joinable()) m_thread.join();
  if (m_error) {
    std::exception_ptr e = m_error;
    m_error = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace elbo
