// Checkpoint write/read/verify, the checkpoint directory (latest pointer, keep-K),
// and the resume compatibility rules.
#include "elbo/ckpt/checkpoint.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <regex>

#include "elbo/ckpt/model_file.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"

namespace elbo {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "elbo-checkpoint";
constexpr int64_t kFormatVersion = 1;

// "model.latent" -> "20" for every leaf of the resolved spec.
void flatten(const YAML::Node& n, const std::string& prefix, std::map<std::string, std::string>* out) {
  if (n.IsMap()) {
    for (const auto& kv : n) flatten(kv.second, prefix.empty() ? kv.first.as<std::string>() : prefix + "." + kv.first.as<std::string>(), out);
  } else {
    YAML::Emitter e;
    e << YAML::Flow << n;
    (*out)[prefix] = e.c_str();
  }
}

}  // namespace

std::string checkpoint_file_name(int64_t step) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "ckpt-%09lld.h5", static_cast<long long>(step));
  return buf;
}

void write_checkpoint(const std::string& path, const ExperimentSpec& spec, const std::vector<int>& input_shape,
                      const ModelLayout& layout, const float* params, const float* exp_avg, const float* exp_avg_sq,
                      const float* ema, const TrainState& st) {
  const std::string tmp = path + ".tmp";
  try {
    {
      h5::Id file = h5::create_memory_file();
      h5::write_attr_string(file, "format", kFormat);
      h5::write_attr_int(file, "format_version", kFormatVersion);
      h5::write_attr_string(file, "spec", dump_spec(spec));
      detail::write_input_shape(file, input_shape);
      h5::write_attr_int(file, "step", st.step);
      h5::write_attr_int(file, "epoch", st.epoch);
      h5::write_attr_int(file, "batch_in_epoch", st.batch_in_epoch);
      h5::write_attr_int(file, "samples_seen", st.samples_seen);
      h5::write_attr_int(file, "adam_steps", st.adam_steps);
      h5::write_attr_int(file, "skipped_steps", st.skipped_steps);
      h5::write_attr_int(file, "total_steps", st.total_steps);
      h5::write_attr_int(file, "world_size", st.world_size);
      h5::write_attr_int(file, "train_samples", st.train_samples);
      h5::write_attr_string(file, "seed", std::to_string(st.seed));  // uint64 does not fit int64 attrs
      if (st.best_step >= 0) {  // only runs that evaluate during training have a best
        h5::write_attr_double(file, "best_bound", st.best_bound);
        h5::write_attr_int(file, "best_step", st.best_step);
        h5::write_attr_int(file, "evals_since_best", st.evals_since_best);
      }
      h5::write_attr_string(file, "checksum_fnv1a64",
                            ema != nullptr ? detail::checksum_views({params, exp_avg, exp_avg_sq, ema}, layout)
                                           : detail::checksum_views({params, exp_avg, exp_avg_sq}, layout));
      detail::write_param_views(file, "params", layout, params);
      detail::write_param_views(file, "optim/exp_avg", layout, exp_avg);
      detail::write_param_views(file, "optim/exp_avg_sq", layout, exp_avg_sq);
      if (ema != nullptr) detail::write_param_views(file, "optim/ema", layout, ema);
      // Built in memory, so a full disk fails our own write, and the temporary file is
      // removed only after HDF5 has let go of everything.
      h5::save_memory_file(std::move(file), tmp);
    }
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  rename_into_place(tmp, path);
  fsync_directory(fs::path(path).parent_path().string());
}

Checkpoint read_checkpoint(const std::string& path) {
  if (!fs::exists(path)) throw model_error(path + ": checkpoint does not exist");
  Checkpoint c;
  c.path = path;
  try {
    h5::Id file = h5::open_file(path);
    if (!h5::has_attr(file, "format") || h5::read_attr_string(file, "format") != kFormat)
      throw model_error(path + ": not an elbo checkpoint (attribute format != '" + kFormat + "')");
    const int64_t version = h5::read_attr_int(file, "format_version");
    if (version != kFormatVersion)
      throw model_error(path + ": checkpoint format version " + std::to_string(version) +
                        " is not supported (this elbo reads " + std::to_string(kFormatVersion) + ")");
    c.spec = parse_spec(h5::read_attr_string(file, "spec"), path + " (stored spec)");
    c.input_shape = detail::read_input_shape(file);
    TrainState& st = c.state;
    st.step = h5::read_attr_int(file, "step");
    st.epoch = h5::read_attr_int(file, "epoch");
    st.batch_in_epoch = h5::read_attr_int(file, "batch_in_epoch");
    st.samples_seen = h5::read_attr_int(file, "samples_seen");
    st.adam_steps = h5::read_attr_int(file, "adam_steps");
    st.skipped_steps = h5::read_attr_int(file, "skipped_steps");
    st.total_steps = h5::read_attr_int(file, "total_steps");
    st.world_size = h5::read_attr_int(file, "world_size");
    st.train_samples = h5::read_attr_int(file, "train_samples");
    st.seed = std::stoull(h5::read_attr_string(file, "seed"));
    const std::unique_ptr<ModelLayout> layout_holder = make_layout(c.spec.model, c.input_shape);
    const ModelLayout& layout = *layout_holder;
    detail::read_param_views(file, "params", layout, path, &c.params);
    detail::read_param_views(file, "optim/exp_avg", layout, path, &c.exp_avg);
    detail::read_param_views(file, "optim/exp_avg_sq", layout, path, &c.exp_avg_sq);
    if (h5::has_attr(file, "best_step")) {
      st.best_bound = h5::read_attr_double(file, "best_bound");
      st.best_step = h5::read_attr_int(file, "best_step");
      st.evals_since_best = h5::read_attr_int(file, "evals_since_best");
    }
    const bool has_ema = h5::exists(file, "optim/ema");
    if (has_ema) detail::read_param_views(file, "optim/ema", layout, path, &c.ema);
    const std::string sum =
        has_ema ? detail::checksum_views({c.params.data(), c.exp_avg.data(), c.exp_avg_sq.data(), c.ema.data()}, layout)
                : detail::checksum_views({c.params.data(), c.exp_avg.data(), c.exp_avg_sq.data()}, layout);
    const std::string stored = h5::read_attr_string(file, "checksum_fnv1a64");
    if (stored != sum)
      throw model_error(path + ": checksum mismatch (stored " + stored + ", computed " + sum +
                        "): the checkpoint is corrupted");
    if (st.step < 0 || st.epoch < 0 || st.batch_in_epoch < 0 || st.adam_steps < 0 || st.world_size < 1 ||
        st.best_step > st.step || st.evals_since_best < 0)
      throw model_error(path + ": inconsistent loop counters in the checkpoint");
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Model) throw;
    throw model_error(path + ": cannot read checkpoint: " + e.what());
  } catch (const std::exception& e) {
    throw model_error(path + ": cannot read checkpoint: " + e.what());
  }
  return c;
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return names;
  static const std::regex pattern(R"(ckpt-\d{9}\.h5)");
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (std::regex_match(n, pattern)) names.push_back(n);
  }
  std::sort(names.rbegin(), names.rend());  // zero-padded step: lexical order is step order
  return names;
}

void publish_checkpoint(const std::string& dir, const std::string& file_name, int keep) {
  write_text_file_atomic((fs::path(dir) / "latest").string(), file_name + "\n");
  fsync_directory(dir);
  if (keep <= 0) return;
  std::vector<std::string> all = list_checkpoints(dir);
  for (size_t i = static_cast<size_t>(keep); i < all.size(); ++i) {
    std::error_code ec;
    fs::remove(fs::path(dir) / all[i], ec);  // best effort: a leftover old file harms nothing
  }
}

bool find_resume_checkpoint(const std::string& dir, Checkpoint* out, std::vector<std::string>* skipped) {
  // By step alone: `latest` is a convenience pointer for people and scripts, and a
  // stale one (an older checkpoint written back, a hand edit) must not win over a
  // newer checkpoint that verifies.
  for (const auto& n : list_checkpoints(dir)) {
    const std::string path = (fs::path(dir) / n).string();
    try {
      *out = read_checkpoint(path);
      return true;
    } catch (const Error& e) {
      skipped->push_back(e.what());
    }
  }
  return false;
}

std::vector<std::string> check_resume_compatible(const ExperimentSpec& stored, const ExperimentSpec& now,
                                                 const std::string& checkpoint_path) {
  // Which keys must keep their values is the spec's key table's to say (fixed_on_resume).
  std::map<std::string, std::string> a, b;
  flatten(YAML::Load(dump_spec(stored)), "", &a);
  flatten(YAML::Load(dump_spec(now)), "", &b);
  std::vector<std::string> changes;
  for (const auto& [key, old_value] : a) {
    auto it = b.find(key);
    const std::string new_value = it == b.end() ? "(absent)" : it->second;
    if (new_value == old_value) continue;
    if (fixed_on_resume(key))
      throw config_error(now.source + ": " + key + ": cannot change on resume (the checkpoint " + checkpoint_path +
                         " has " + old_value + ", the spec says " + new_value +
                         "); it changes the model or the sample sequence. Start a new run in another output.dir");
    changes.push_back(key + ": " + old_value + " -> " + new_value);
  }
  return changes;
}

}  // namespace elbo
