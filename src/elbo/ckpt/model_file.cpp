// HDF5 model file write/read with validation against the stored spec.
#include "elbo/ckpt/model_file.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "elbo/util/checksum.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"

namespace elbo {

namespace {
constexpr const char* kFormat = "elbo-model";
// Checksums came as attributes without a version change: an older elbo still reads
// newer files, and files without them are read as unverified.
constexpr int64_t kFormatVersion = 1;
// On the root (all parameters, as in checkpoints) and on each /params/<name> dataset
// (that array alone, so that an error can name it).
constexpr const char* kChecksumAttr = "checksum_fnv1a64";

std::string view_checksum(const float* flat, const ParamView& v) {
  Fnv1a64 h;
  h.update(flat + v.offset, v.numel() * sizeof(float));
  return h.hex();
}

std::string attr_on(hid_t file, const std::string& object, const std::string& attr) {
  h5::Id obj(ELBO_CHECK_H5(H5Oopen(file, object.c_str(), H5P_DEFAULT)), H5Oclose);
  return h5::has_attr(obj, attr) ? h5::read_attr_string(obj, attr) : std::string();
}

// Every array against its own checksum first (the error names it), then the whole set.
void verify_params(hid_t file, const std::string& path, const ModelLayout& layout, const std::vector<float>& flat) {
  for (const auto& v : layout.views()) {
    const std::string name = "params/" + v.name;
    const std::string stored = attr_on(file, name, kChecksumAttr);
    if (stored.empty())
      throw model_error(path + ": '" + name + "' has no checksum while the file has one: the model file is damaged");
    const std::string computed = view_checksum(flat.data(), v);
    if (stored != computed)
      throw model_error(path + ": '" + name + "': checksum mismatch (stored " + stored + ", computed " + computed +
                        "): the model file is corrupted");
  }
  const std::string stored = h5::read_attr_string(file, kChecksumAttr);
  const std::string computed = detail::checksum_views({flat.data()}, layout);
  if (stored != computed)
    throw model_error(path + ": checksum mismatch over all parameters (stored " + stored + ", computed " + computed +
                      "): the model file is corrupted");
}

}  // namespace

namespace detail {

void write_param_views(int64_t file, const std::string& group, const ModelLayout& layout, const float* flat) {
  h5::Id g = h5::ensure_group(file, group);
  for (const auto& v : layout.views()) {
    std::vector<hsize_t> shape(v.shape.begin(), v.shape.end());
    h5::write_dataset<float>(g, v.name, shape, flat + v.offset);
  }
}

void read_param_views(int64_t file, const std::string& group, const ModelLayout& layout, const std::string& path,
                      std::vector<float>* flat) {
  flat->assign(layout.num_params(), 0.0f);
  for (const auto& v : layout.views()) {
    const std::string name = group + "/" + v.name;
    if (!h5::exists(file, name)) throw model_error(path + ": '" + name + "' is missing");
    std::vector<hsize_t> shape;
    std::vector<float> data = h5::read_dataset<float>(file, name, &shape);
    std::vector<hsize_t> want(v.shape.begin(), v.shape.end());
    if (shape != want)
      throw model_error(path + ": '" + name + "' has shape " + shape_string(shape) + " but the stored spec needs " +
                        shape_string(want));
    std::copy(data.begin(), data.end(), flat->begin() + static_cast<std::ptrdiff_t>(v.offset));
  }
}

void write_input_shape(int64_t file, const std::vector<int>& input_shape) {
  h5::write_attr_int(file, "input_channels", input_shape.at(0));
  h5::write_attr_int(file, "input_height", input_shape.at(1));
  h5::write_attr_int(file, "input_width", input_shape.at(2));
}

std::string checksum_views(std::initializer_list<const float*> arrays, const ModelLayout& layout) {
  // In buffer order (the views list mu's weight and bias before logvar's).
  std::vector<ParamView> views = layout.views();
  std::sort(views.begin(), views.end(), [](const ParamView& a, const ParamView& b) { return a.offset < b.offset; });
  Fnv1a64 h;
  for (const float* a : arrays)
    for (const ParamView& v : views) h.update(a + v.offset, v.numel() * sizeof(float));
  return h.hex();
}

std::vector<int> read_input_shape(int64_t file) {
  return {static_cast<int>(h5::read_attr_int(file, "input_channels")),
          static_cast<int>(h5::read_attr_int(file, "input_height")),
          static_cast<int>(h5::read_attr_int(file, "input_width"))};
}

}  // namespace detail

void write_model_file(const std::string& path, const ExperimentSpec& spec, const std::vector<int>& input_shape,
                      const ModelLayout& layout, const float* params, int64_t step, int64_t epochs_completed,
                      const ModelFileExtras& extras) {
  const std::string tmp = path + ".tmp";
  try {
    h5::Id file = h5::create_memory_file();
    h5::write_attr_string(file, "format", kFormat);
    h5::write_attr_int(file, "format_version", kFormatVersion);
    h5::write_attr_string(file, "spec", dump_spec(spec));
    detail::write_input_shape(file, input_shape);
    // Latent values per sample: the Vae's L, the sum of a hierarchical model's groups.
    h5::write_attr_int(file, "latent", static_cast<int64_t>(layout.eps_per_row()));
    h5::write_attr_string(file, "likelihood", choice_name(layout.spec().likelihood));
    h5::write_attr_string(file, "activation", choice_name(layout.spec().activation));
    h5::write_attr_int(file, "step", step);
    h5::write_attr_int(file, "epochs_completed", epochs_completed);
    detail::write_param_views(file, "params", layout, params);
    h5::write_attr_string(file, kChecksumAttr, detail::checksum_views({params}, layout));
    // The root checksum covers /params only (what every reader loads); each array,
    // /params_raw's too, carries its own.
    const auto array_checksums = [&](const std::string& group, const float* flat) {
      for (const auto& v : layout.views()) {
        h5::Id ds(ELBO_CHECK_H5(H5Dopen2(file, (group + "/" + v.name).c_str(), H5P_DEFAULT)), H5Dclose);
        h5::write_attr_string(ds, kChecksumAttr, view_checksum(flat, v));
      }
    };
    array_checksums("params", params);
    if (extras.raw_params != nullptr) {
      h5::write_attr_double(file, "ema", extras.ema);
      detail::write_param_views(file, "params_raw", layout, extras.raw_params);
      array_checksums("params_raw", extras.raw_params);
    }
    if (extras.has_bound) {
      h5::write_attr_double(file, "test_neg_elbo", extras.bound);
      h5::write_attr_int(file, "eval_samples", extras.eval_samples);
    }
    // Built in memory (see checkpoint.cpp): a full disk fails our write, not HDF5's close.
    h5::save_memory_file(std::move(file), tmp);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  rename_into_place(tmp, path);
}

ModelFile read_model_file(const std::string& path) {
  if (!std::filesystem::exists(path)) throw model_error(path + ": model file does not exist");
  ModelFile mf;
  try {
    h5::Id file = h5::open_file(path);
    if (!h5::has_attr(file, "format") || h5::read_attr_string(file, "format") != kFormat)
      throw model_error(path + ": not an elbo model file (attribute format != '" + kFormat + "')");
    int64_t version = h5::read_attr_int(file, "format_version");
    if (version != kFormatVersion)
      throw model_error(path + ": model format version " + std::to_string(version) + " is not supported (expected " +
                        std::to_string(kFormatVersion) + ")");
    mf.spec = parse_spec(h5::read_attr_string(file, "spec"), path + " (stored spec)");
    mf.input_shape = detail::read_input_shape(file);
    mf.step = h5::read_attr_int(file, "step");
    mf.epochs_completed = h5::read_attr_int(file, "epochs_completed");
    const std::unique_ptr<ModelLayout> layout_holder = make_layout(mf.spec.model, mf.input_shape);
    const ModelLayout& layout = *layout_holder;
    detail::read_param_views(file, "params", layout, path, &mf.params);
    mf.verified = h5::has_attr(file, kChecksumAttr);
    if (mf.verified) verify_params(file, path, layout, mf.params);
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Model) throw;
    throw model_error(path + ": cannot read model file: " + e.what());
  }
  return mf;
}

}  // namespace elbo
