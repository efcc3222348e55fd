// elbo-shard: IDX / IDX.gz files (MNIST, Fashion-MNIST) -> HDF5 shards + manifest.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "elbo/cli/args.hpp"
#include "elbo/data/idx.hpp"
#include "elbo/data/shards.hpp"
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

void shard_one(const std::string& images_path, const std::string& labels_path, const std::string& split, int shards,
               const std::string& out, bool overwrite) {
  data::IdxArray images = data::read_idx(images_path);
  data::IdxArray labels;
  if (!labels_path.empty()) labels = data::read_idx(labels_path);
  std::string source = images_path + (labels_path.empty() ? "" : ", " + labels_path);
  data::write_split(out, split, images, labels_path.empty() ? nullptr : &labels, shards, source, overwrite);
  std::printf("%s: %zu samples -> %d shard(s) in %s\n", split.c_str(), images.rows(), shards, out.c_str());
}

int run(int argc, char** argv) {
  std::string images, labels, split = "train", out, dataset_dir;
  int64_t shards = 1, test_shards = 1;
  bool overwrite = false;
  cli::ArgParser p("elbo-shard",
                   "Convert IDX / IDX.gz files (MNIST format) into HDF5 shards plus manifest.yaml.\n"
                   "  one split:   elbo-shard --images F [--labels F] --split train --num-shards N --out DIR\n"
                   "  a dataset:   elbo-shard --dataset-dir DIR --num-shards N [--test-shards M] --out OUT\n"
                   "               (writes OUT/train and OUT/test from train-* and t10k-* files)");
  p.string("--images", &images, "FILE", "IDX images file (.gz or plain)");
  p.string("--labels", &labels, "FILE", "IDX labels file (optional)");
  p.string("--split", &split, "NAME", "split name stored in the shards (train | test | ...)");
  p.string("--dataset-dir", &dataset_dir, "DIR", "directory with train-*/t10k-* IDX files, e.g. /usr/share/datasets/fashion-mnist");
  p.integer("--num-shards", &shards, "N", "number of shards (of the train split with --dataset-dir)", 1);
  p.integer("--test-shards", &test_shards, "M", "number of test shards with --dataset-dir", 1);
  p.string("--out", &out, "DIR", "output directory", true);
  p.flag("--overwrite", &overwrite, "replace a split already in the output directory");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!p.parse(args)) return 0;
  if (dataset_dir.empty() == images.empty())
    throw usage_error("elbo-shard: give either --images (one split) or --dataset-dir (train and test), not both");
  if (!dataset_dir.empty()) {
    // Look up all four files before writing anything, in a fixed order for the messages.
    const std::string train_images = find_idx(dataset_dir, "train-images-idx3-ubyte");
    const std::string train_labels = find_idx(dataset_dir, "train-labels-idx1-ubyte");
    const std::string test_images = find_idx(dataset_dir, "t10k-images-idx3-ubyte");
    const std::string test_labels = find_idx(dataset_dir, "t10k-labels-idx1-ubyte");
    shard_one(train_images, train_labels, "train", static_cast<int>(shards), (fs::path(out) / "train").string(),
              overwrite);
    shard_one(test_images, test_labels, "test", static_cast<int>(test_shards), (fs::path(out) / "test").string(),
              overwrite);
  } else {
    shard_one(images, labels, split, static_cast<int>(shards), out, overwrite);
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
  }
}
