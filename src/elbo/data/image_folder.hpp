// A folder tree of PNG / JPEG images as a SampleSource (elbo-shard --image-dir):
// class subfolders become labels, decoding runs on a pool of threads.
#pragma once

#include <string>
#include <vector>

#include "elbo/data/shard_writer.hpp"

namespace elbo::data {

struct ImageFolderOptions {
  int height = 0, width = 0;  // --size: 0 = keep the images' own size (all must agree)
  int center_crop = 0;        // --center-crop S, applied before --size; 0 = off
  int channels = 0;           // 1 | 3 convert to; 0 = the first image's
  int threads = 0;            // decoding threads; 0 = all cores
};

// The files: DIR/*.{png,jpg,jpeg} (a flat folder, no labels) or DIR/<class>/**/*.{png,...}
// (class folders sorted by name -> labels 0..K-1). Names compare bytewise; hidden
// entries (starting with '.') and other files are skipped. Samples are ordered by
// class, then by path. An empty tree, an empty class folder, or images both at the top
// and in class folders are Data errors naming the folder.
class ImageFolderSource : public SampleSource {
 public:
  ImageFolderSource(const std::string& dir, const ImageFolderOptions& options);

  int64_t size() const override { return static_cast<int64_t>(m_files.size()); }
  std::array<uint32_t, 3> shape() const override { return m_shape; }
  bool has_labels() const override { return !m_classes.empty(); }
  std::vector<std::string> class_names() const override { return m_classes; }
  std::string description() const override { return m_dir; }
  // Decodes `indices` on the thread pool into their slots (the order is the indices'
  // whatever the threads do); the first failing index (lowest) is the error thrown.
  void read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) override;

  const std::vector<std::string>& files() const { return m_files; }

 private:
  void decode_one(int64_t index, uint8_t* out) const;

  std::string m_dir;
  ImageFolderOptions m_opt;
  std::vector<std::string> m_files;
  std::vector<uint8_t> m_labels;
  std::vector<std::string> m_classes;
  std::array<uint32_t, 3> m_shape{};
  bool m_convert = false;  // --size or --channels given: other sizes / channel counts are converted
};

}  // namespace elbo::data
