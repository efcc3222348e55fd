// Image folder trees -> samples: the file list and labels, then parallel decoding
// with a deterministic output order.
#include "elbo/data/image_folder.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

#include "elbo/data/image_decode.hpp"
#include "elbo/util/error.hpp"

namespace elbo::data {

namespace fs = std::filesystem;

namespace {

bool is_image_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

bool hidden(const fs::path& p) { return p.filename().string().starts_with("."); }

// Image files under `dir` (recursively when `recursive`), sorted bytewise by path.
std::vector<std::string> list_images(const fs::path& dir, bool recursive) {
  std::vector<std::string> out;
  std::error_code ec;
  auto add = [&](const fs::directory_entry& e) {
    if (e.is_regular_file() && is_image_name(e.path()) && !hidden(e.path())) out.push_back(e.path().string());
  };
  if (recursive) {
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec)) {
      if (hidden(it->path())) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      add(*it);
    }
  } else {
    for (const auto& e : fs::directory_iterator(dir, ec)) add(e);
  }
  if (ec) throw io_error(dir.string() + ": cannot list the folder: " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

ImageFolderSource::ImageFolderSource(const std::string& dir, const ImageFolderOptions& options)
    : m_dir(dir), m_opt(options) {
  if (!fs::is_directory(dir)) throw data_error(dir + ": image folder does not exist or is not a folder");
  if (options.channels != 0 && options.channels != 1 && options.channels != 3)
    throw usage_error("--channels must be 1 or 3");
  if ((options.height == 0) != (options.width == 0) || options.height < 0 || options.width < 0)
    throw usage_error("--size takes a positive height and width");
  std::vector<std::string> class_dirs;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && !hidden(e.path())) class_dirs.push_back(e.path().filename().string());
  std::sort(class_dirs.begin(), class_dirs.end());
  const std::vector<std::string> top = list_images(dir, false);
  if (class_dirs.empty()) {
    m_files = top;
  } else {
    if (!top.empty())
      throw data_error(top.front() + ": images at the top of " + dir +
                       " beside class folders (put every image in a class folder, or use a flat folder)");
    if (class_dirs.size() > 256) throw data_error(dir + ": " + std::to_string(class_dirs.size()) +
                                                  " class folders; labels are uint8 (at most 256 classes)");
    for (size_t k = 0; k < class_dirs.size(); ++k) {
      const std::vector<std::string> files = list_images(fs::path(dir) / class_dirs[k], true);
      if (files.empty())
        throw data_error((fs::path(dir) / class_dirs[k]).string() + ": class folder holds no PNG or JPEG image");
      m_files.insert(m_files.end(), files.begin(), files.end());
      m_labels.insert(m_labels.end(), files.size(), static_cast<uint8_t>(k));
    }
    m_classes = class_dirs;
  }
  if (m_files.empty()) throw data_error(dir + ": no PNG or JPEG images (.png, .jpg, .jpeg) in the folder");

  // The sample shape: the target size, or the first image's own.
  const Pixels first = decode_image(m_files.front());
  const int c = options.channels != 0 ? options.channels : first.channels;
  int h = first.height, w = first.width;
  if (options.center_crop > 0) h = w = options.center_crop;
  if (options.height > 0) {
    h = options.height;
    w = options.width;
  }
  m_convert = options.height > 0 || options.channels != 0;
  m_shape = {uint32_t(c), uint32_t(h), uint32_t(w)};
}

void ImageFolderSource::decode_one(int64_t index, uint8_t* out) const {
  const std::string& path = m_files[size_t(index)];
  const std::string where = path + " (sample " + std::to_string(index) + ")";
  Pixels p;
  try {
    p = decode_image(path);
  } catch (const Error& e) {  // "<path>: why" -> "<path> (sample i): why"
    const std::string what = e.what();
    throw Error(e.kind(), what.starts_with(path) ? where + what.substr(path.size()) : where + ": " + what);
  }
  const auto [C, H, W] = m_shape;
  if (p.channels != int(C)) {
    if (!m_convert)
      throw data_error(where + ": " + std::to_string(p.channels) + " channel(s), the first image " + m_files.front() +
                       " has " + std::to_string(C) + " (pass --channels or --size to convert)");
    p = convert_channels(p, int(C));
  }
  if (m_opt.center_crop > 0) p = center_crop(p, m_opt.center_crop, where);
  if (m_opt.height > 0) {
    p = resize_cover_crop(p, int(H), int(W));
  } else if (p.height != int(H) || p.width != int(W)) {
    throw data_error(where + ": " + std::to_string(p.height) + " x " + std::to_string(p.width) + " pixels, the first " +
                     "image " + m_files.front() + " has " + std::to_string(H) + " x " + std::to_string(W) +
                     " (pass --size H W to resize)");
  }
  // (H, W, C) interleaved -> (C, H, W) planes.
  const size_t plane = size_t(H) * W;
  for (size_t i = 0; i < plane; ++i)
    for (uint32_t ch = 0; ch < C; ++ch) out[ch * plane + i] = p.data[i * C + ch];
}

void ImageFolderSource::read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) {
  const size_t dim = size_t(m_shape[0]) * m_shape[1] * m_shape[2];
  const size_t n = indices.size();
  unsigned threads = m_opt.threads > 0 ? unsigned(m_opt.threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<size_t>(threads, n));
  std::atomic<size_t> next{0};
  std::mutex mu;
  size_t failed_at = n;  // position of the first failure, in input order
  std::exception_ptr failure;
  auto work = [&] {
    for (size_t k; (k = next.fetch_add(1)) < n;) {
      try {
        decode_one(indices[k], pixels + k * dim);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (k < failed_at) {
          failed_at = k;
          failure = std::current_exception();
        }
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
  if (labels != nullptr && has_labels())
    for (size_t k = 0; k < n; ++k) labels[k] = m_labels[size_t(indices[k])];
}

}  // namespace elbo::data
