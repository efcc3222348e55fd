// elbo-shard: datasets (IDX / IDX.gz files, ...) -> HDF5 shards + manifest, and the
// verification of a written split (--verify).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "elbo/cli/args.hpp"
#include "elbo/data/array_sources.hpp"
#include "elbo/data/idx.hpp"
#include "elbo/data/image_folder.hpp"
#include "elbo/data/shard_writer.hpp"
#include "elbo/util/error.hpp"

namespace fs = std::filesystem;
using namespace elbo;

namespace {

// Finds NAME or NAME.gz in dir.
std::string find_idx(const std::string& dir, const std::string& name) {
  for (const std::string& cand : {name, name + ".gz"}) {
    fs::path p = fs::path(dir) / cand;
    if (fs::exists(p)) return p.string();
  }
  throw data_error(dir + ": neither " + name + " nor " + name + ".gz exists (MNIST-style IDX naming expected)");
}

std::unique_ptr<data::SampleSource> idx_source(const std::string& images_path, const std::string& labels_path) {
  data::IdxArray images = data::read_idx(images_path);
  data::IdxArray labels;
  if (!labels_path.empty()) labels = data::read_idx(labels_path);
  std::string source = images_path + (labels_path.empty() ? "" : ", " + labels_path);
  return std::make_unique<data::ArraySource>(
      data::ArraySource::from_idx(images, labels_path.empty() ? nullptr : &labels, source));
}

void write_one(data::SampleSource& src, const std::string& dir, data::WriteOptions opt, const std::string& split) {
  opt.split = split;
  data::write_split(dir, src, opt);
  std::printf("%s: %lld samples -> %s\n", split.c_str(), static_cast<long long>(src.size()), dir.c_str());
}

// OUT/train and OUT/test together: both are read and written to temporaries before
// either replaces what is there.
void write_pair(data::SampleSource& train, data::SampleSource& test, const std::string& out,
                data::WriteOptions opt, data::WriteOptions test_opt) {
  const std::string train_dir = (fs::path(out) / "train").string(), test_dir = (fs::path(out) / "test").string();
  opt.split = "train";
  test_opt.split = "test";
  data::PreparedSplit a = data::prepare_split(train_dir, train, opt);
  data::PreparedSplit b = data::prepare_split(test_dir, test, test_opt);
  a.commit();
  b.commit();
  std::printf("train: %lld samples -> %s\ntest: %lld samples -> %s\n", static_cast<long long>(train.size()),
              train_dir.c_str(), static_cast<long long>(test.size()), test_dir.c_str());
}

// Two splits (train, test) are refused together, before either is written, when one
// already exists and --overwrite is not given: never a new train beside an old test.
void check_free(const std::string& out, bool overwrite) {
  if (overwrite) return;
  for (const char* split : {"train", "test"}) {
    const fs::path m = fs::path(out) / split / "manifest.yaml";
    if (fs::exists(m))
      throw data_error((fs::path(out) / split).string() +
                       ": already holds a split (manifest.yaml); pass --overwrite to replace it");
  }
}

// "deflate" or "deflate=L" -> L (default 4); "none" -> -1.
int parse_compress(const std::string& s) {
  if (s.empty() || s == "none") return -1;
  if (s == "deflate") return 4;
  if (s.rfind("deflate=", 0) == 0) {
    const std::string level = s.substr(8);
    if (level.size() == 1 && level[0] >= '0' && level[0] <= '9') return level[0] - '0';
  }
  throw usage_error("--compress expects none, deflate or deflate=0..9, got '" + s + "'");
}

int verify(const std::string& dir) {
  data::VerifyResult r = data::verify_split(dir);
  for (const std::string& p : r.problems) std::fprintf(stderr, "elbo-shard --verify: %s\n", p.c_str());
  if (!r.problems.empty()) {
    std::fprintf(stderr, "elbo-shard --verify: %s: %zu problem(s) in %lld shard(s)\n", dir.c_str(), r.problems.size(),
                 static_cast<long long>(r.shards));
    return 1;
  }
  std::printf("%s: %lld shard(s), %lld samples verified", dir.c_str(), static_cast<long long>(r.shards),
              static_cast<long long>(r.samples));
  if (r.without_checksum > 0)
    std::printf(" (%lld without a checksum in the manifest, an older split: shapes and counts checked only)",
                static_cast<long long>(r.without_checksum));
  std::printf("\n");
  return 0;
}

// --size H W (or HxW) -> (H, W); anything else is a usage error.
std::pair<int, int> parse_size(const std::vector<std::string>& values) {
  const std::string s = values.size() == 2 ? values[0] + "x" + values[1] : values.size() == 1 ? values[0] : "";
  const size_t x = s.find('x');
  try {
    size_t used_h = 0, used_w = 0;
    if (x != std::string::npos) {
      const int h = std::stoi(s.substr(0, x), &used_h), w = std::stoi(s.substr(x + 1), &used_w);
      if (used_h == x && used_w == s.size() - x - 1 && h > 0 && w > 0 && h <= 65535 && w <= 65535) return {h, w};
    }
  } catch (const std::exception&) {
  }
  std::string given;
  for (const auto& v : values) given += (given.empty() ? "" : " ") + v;
  throw usage_error("--size expects a height and a width (--size 64 64), got '" + given + "'");
}

int run(int argc, char** argv) {
  std::string images, labels, split = "train", out, dataset_dir, verify_dir, compress, image_dir;
  std::string npy, npz_key, npy_labels, npz_labels_key, layout, hdf5, hdf5_labels;
  int64_t shards = 0, test_shards = 0, seed = 0, center_crop = 0, channels = 0, threads = 0;
  double shard_mb = 256.0, test_fraction = 0.0;
  bool overwrite = false;
  std::vector<std::string> size;
  cli::CommandLine p("elbo-shard",
                     "Convert datasets into HDF5 shards plus manifest.yaml (see data_tools/README.md).\n"
                     "  one split:   elbo-shard INPUT [--split NAME] --out DIR, INPUT one of\n"
                     "               --images F [--labels F] (IDX), --image-dir DIR, --npy F, --hdf5 F:/path\n"
                     "  a dataset:   elbo-shard --dataset-dir DIR --out OUT\n"
                     "               (writes OUT/train and OUT/test from train-* and t10k-* files)\n"
                     "  any input with --test-fraction F writes OUT/train and OUT/test\n"
                     "  check:       elbo-shard --verify DIR");
  cli::add_text(p, "--images", &images, "FILE", "IDX images file (.gz or plain)");
  cli::add_text(p, "--labels", &labels, "FILE", "IDX labels file (optional)");
  cli::add_text(p, "--split", &split, "NAME", "split name stored in the shards (train | test | ...)");
  cli::add_text(p, "--dataset-dir", &dataset_dir, "DIR",
                "directory with train-*/t10k-* IDX files, e.g. /usr/share/datasets/fashion-mnist");
  cli::add_text(p, "--image-dir", &image_dir, "DIR",
                "folder of PNG / JPEG images: flat (no labels) or one subfolder per class (labels 0..K-1 by sorted "
                "name)");
  // Two values ("--size 64 64") or one ("--size 64x64").
  p.add_option("--size", size, "--image-dir: resize to cover H x W keeping the aspect ratio, then centre-crop")
      ->type_name("H W")
      ->expected(1, 2);
  cli::add_integer(p, "--center-crop", &center_crop, "S",
                   "--image-dir: take the centred S x S square first (before --size)", 1);
  cli::add_integer(p, "--channels", &channels, "C", "--image-dir: convert every image to 1 (gray) or 3 (RGB) channels",
                   1);
  cli::add_integer(p, "--threads", &threads, "N", "--image-dir: decoding threads (default: all cores)", 1);
  cli::add_text(p, "--npy", &npy, "FILE", "NumPy .npy (or .npz with --npz-key) of uint8 0..255 or floats in [0, 1]");
  cli::add_text(p, "--npz-key", &npz_key, "NAME", "--npy: the array of a .npz archive");
  cli::add_text(p, "--npy-labels", &npy_labels, "FILE",
                "--npy: labels, a 1-D integer .npy (or the .npz with --npz-labels-key)");
  cli::add_text(p, "--npz-labels-key", &npz_labels_key, "NAME",
                "--npy: the labels array of the .npz (or of --npy-labels)");
  cli::add_text(p, "--hdf5", &hdf5, "FILE:/PATH",
                "an HDF5 dataset of uint8 0..255 or floats in [0, 1], read in blocks");
  cli::add_text(p, "--hdf5-labels", &hdf5_labels, "/PATH", "--hdf5: an integer dataset of labels in the same file");
  cli::add_text(p, "--layout", &layout, "L",
                "--npy / --hdf5 with 4 dimensions: nhwc, nchw or auto (inferred from a 1 or 3)");
  cli::add_integer(p, "--num-shards", &shards, "N",
                   "number of shards (of the train split with --dataset-dir); default: by --shard-mb", 1);
  cli::add_integer(p, "--test-shards", &test_shards, "M",
                   "number of test shards with --dataset-dir / --test-fraction; default: by --shard-mb", 1);
  cli::add_number(p, "--shard-mb", &shard_mb, "MB",
                  "target pixel megabytes per shard when no shard count is given (default 256)", 1e-6);
  cli::add_text(p, "--compress", &compress, "KIND", "none (default), deflate or deflate=LEVEL (0..9; deflate = 4)");
  cli::add_number(p, "--test-fraction", &test_fraction, "F",
                  "split the input: a seeded random F of it goes to OUT/test, the rest to OUT/train", 0);
  cli::add_integer(p, "--seed", &seed, "S", "seed of --test-fraction (default 0)", 0);
  cli::add_text(p, "--out", &out, "DIR", "output directory");
  p.add_flag("--overwrite", overwrite, "replace a split already in the output directory");
  cli::add_text(p, "--verify", &verify_dir, "DIR",
                "recompute every shard's checksum and check it against DIR/manifest.yaml");
  if (const auto text = p.parse_args(std::vector<std::string>(argv + 1, argv + argc))) {
    std::fputs(text->c_str(), stdout);
    return 0;
  }
  if (!verify_dir.empty()) {
    if (!images.empty() || !dataset_dir.empty() || !image_dir.empty() || !npy.empty() || !hdf5.empty() || !out.empty())
      throw usage_error("--verify DIR checks a split and takes no input or --out");
    return verify(verify_dir);
  }
  if (out.empty()) throw usage_error("option --out is required (see --help)");
  const int inputs = !images.empty() + !dataset_dir.empty() + !image_dir.empty() + !npy.empty() + !hdf5.empty();
  if (inputs != 1)
    throw usage_error(
        "give one input: --images (IDX, one split), --dataset-dir (IDX train and test), "
        "--image-dir (a folder of images), --npy (NumPy) or --hdf5 (an HDF5 dataset)");
  if (npy.empty() && (!npz_key.empty() || !npy_labels.empty() || !npz_labels_key.empty()))
    throw usage_error("--npz-key, --npy-labels and --npz-labels-key apply to --npy only");
  if (hdf5.empty() && !hdf5_labels.empty()) throw usage_error("--hdf5-labels applies to --hdf5 only");
  if (npy.empty() && hdf5.empty() && !layout.empty()) throw usage_error("--layout applies to --npy and --hdf5 only");
  if (image_dir.empty() && (!size.empty() || center_crop > 0 || channels > 0 || threads > 0))
    throw usage_error("--size, --center-crop, --channels and --threads apply to --image-dir only");
  if (!dataset_dir.empty() && test_fraction > 0)
    throw usage_error("--dataset-dir has its own test split; --test-fraction is for single inputs");

  data::WriteOptions opt;
  opt.num_shards = static_cast<int>(shards);
  opt.shard_mb = shard_mb;
  opt.deflate_level = parse_compress(compress);
  opt.overwrite = overwrite;
  data::WriteOptions test_opt = opt;
  test_opt.num_shards = static_cast<int>(test_shards);

  if (!dataset_dir.empty()) {
    // Look up all four files before writing anything, in a fixed order for the messages.
    const std::string train_images = find_idx(dataset_dir, "train-images-idx3-ubyte");
    const std::string train_labels = find_idx(dataset_dir, "train-labels-idx1-ubyte");
    const std::string test_images = find_idx(dataset_dir, "t10k-images-idx3-ubyte");
    const std::string test_labels = find_idx(dataset_dir, "t10k-labels-idx1-ubyte");
    check_free(out, overwrite);
    auto train = idx_source(train_images, train_labels);
    auto test = idx_source(test_images, test_labels);
    write_pair(*train, *test, out, opt, test_opt);
    return 0;
  }
  std::unique_ptr<data::SampleSource> src;
  if (!image_dir.empty()) {
    data::ImageFolderOptions io;
    if (!size.empty()) std::tie(io.height, io.width) = parse_size(size);
    io.center_crop = static_cast<int>(center_crop);
    io.channels = static_cast<int>(channels);
    io.threads = static_cast<int>(threads);
    src = std::make_unique<data::ImageFolderSource>(image_dir, io);
  } else if (!npy.empty()) {
    src = data::ArraySampleSource::numpy(npy, npz_key, npy_labels, npz_labels_key, data::parse_layout(layout));
  } else if (!hdf5.empty()) {
    src = data::ArraySampleSource::hdf5(hdf5, hdf5_labels, data::parse_layout(layout));
  } else {
    src = idx_source(images, labels);
  }
  if (test_fraction > 0) {
    check_free(out, overwrite);
    auto parts = data::split_indices(src->size(), test_fraction, static_cast<uint64_t>(seed));
    data::SubsetSource train(*src, std::move(parts[0])), test(*src, std::move(parts[1]));
    write_pair(train, test, out, opt, test_opt);
  } else {
    write_one(*src, out, opt, split);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "elbo-shard: %s\n", e.what());
    return e.kind() == ErrorKind::Usage ? 2 : 1;
  } catch (const std::exception& e) {  // std::filesystem and allocation failures
    std::fprintf(stderr, "elbo-shard: %s\n", e.what());
    return 1;
  }
}
