// Grids of images and PNG files through libpng.
#include "elbo/viz/image.hpp"

#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"

namespace elbo::viz {

Image tile(const float* images, int n, int c, int h, int w, int cols, int pad, uint8_t background) {
  ELBO_ASSERT(n >= 1 && h >= 1 && w >= 1 && cols >= 1 && pad >= 0, "tile: empty grid");
  if (c != 1 && c != 3)
    throw data_error("cannot draw images with " + std::to_string(c) + " channels (PNG grids take 1 or 3)");
  cols = std::min(cols, n);
  const int rows = (n + cols - 1) / cols;
  Image img;
  img.channels = c;
  img.width = cols * w + (cols + 1) * pad;
  img.height = rows * h + (rows + 1) * pad;
  img.pixels.assign(static_cast<size_t>(img.width) * img.height * c, background);
  const size_t plane = static_cast<size_t>(h) * w;
  for (int k = 0; k < n; ++k) {
    const float* src = images + static_cast<size_t>(k) * c * plane;
    const int x0 = pad + (k % cols) * (w + pad), y0 = pad + (k / cols) * (h + pad);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x)
        for (int ch = 0; ch < c; ++ch) {
          float v = src[ch * plane + static_cast<size_t>(y) * w + x];
          v = std::isfinite(v) ? std::clamp(v, 0.0f, 1.0f) : 0.0f;
          img.pixels[(static_cast<size_t>(y0 + y) * img.width + (x0 + x)) * c + ch] =
              static_cast<uint8_t>(std::lround(v * 255.0f));
        }
  }
  return img;
}

Image tile_pairs(const float* inputs, const float* reconstructions, int n, int c, int h, int w, int cols) {
  ELBO_ASSERT(n >= 1 && cols >= 1, "tile_pairs: empty grid");
  cols = std::min(cols, n);
  const size_t D = static_cast<size_t>(c) * h * w;
  std::vector<float> grid;
  int tiles = 0;
  for (int row = 0; row < n; row += cols) {
    const int k = std::min(cols, n - row);
    for (const float* src : {inputs, reconstructions}) {
      grid.insert(grid.end(), src + row * D, src + (row + k) * D);
      grid.resize(grid.size() + (cols - k) * D, 1.0f);  // blank (white) tiles
      tiles += cols;
    }
  }
  return tile(grid.data(), tiles, c, h, w, cols);
}

namespace {

// libpng reports errors through a callback that must not return: it records the
// message and longjmps back to the setjmp in the function that called libpng. Those
// functions keep only trivially destructible locals, so the jump skips no destructor.
struct PngError {
  char message[256] = {};
};

[[noreturn]] void on_png_error(png_structp png, png_const_charp msg) {
  auto* e = static_cast<PngError*>(png_get_error_ptr(png));
  std::snprintf(e->message, sizeof(e->message), "%s", msg);
  png_longjmp(png, 1);
}
void on_png_warning(png_structp, png_const_charp) {}

struct File {
  FILE* f = nullptr;
  ~File() {
    if (f != nullptr) std::fclose(f);
  }
};

// libpng hands the encoded bytes to a write callback: into a FILE or a string.
void to_file(png_structp png, png_bytep data, size_t n) {
  if (std::fwrite(data, 1, n, static_cast<FILE*>(png_get_io_ptr(png))) != n) png_error(png, std::strerror(errno));
}
void to_string(png_structp png, png_bytep data, size_t n) {
  static_cast<std::string*>(png_get_io_ptr(png))->append(reinterpret_cast<const char*>(data), n);
}
void no_flush(png_structp) {}

bool encode(void* sink, png_rw_ptr write, const Image& img, PngError* err) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, err, on_png_error, on_png_warning);
  png_infop info = png != nullptr ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    std::snprintf(err->message, sizeof(err->message), "libpng could not allocate its state");
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_set_write_fn(png, sink, write, no_flush);
  png_set_IHDR(png, info, static_cast<png_uint_32>(img.width), static_cast<png_uint_32>(img.height), 8,
               img.channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const size_t stride = static_cast<size_t>(img.width) * img.channels;
  for (int y = 0; y < img.height; ++y) png_write_row(png, img.pixels.data() + y * stride);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

void check_image(const Image& img) {
  ELBO_ASSERT(img.channels == 1 || img.channels == 3, "PNG: 1 or 3 channels");
  ELBO_ASSERT(img.pixels.size() == static_cast<size_t>(img.width) * img.height * img.channels,
              "PNG: pixel count does not match the size");
}

}  // namespace

void write_png(const std::string& path, const Image& img) {
  check_image(img);
  const std::string tmp = path + ".tmp";
  {
    File out;
    out.f = std::fopen(tmp.c_str(), "wb");
    if (out.f == nullptr) throw io_error("cannot write " + path + ": " + std::strerror(errno));
    PngError err;
    if (!encode(out.f, to_file, img, &err)) {
      std::remove(tmp.c_str());
      throw io_error("cannot write " + path + ": libpng: " + err.message);
    }
    if (std::fflush(out.f) != 0 || std::ferror(out.f)) {
      const std::string why = std::strerror(errno);
      std::remove(tmp.c_str());
      throw io_error("cannot write " + path + ": " + why);
    }
  }
  rename_into_place(tmp, path);
}

std::string encode_png(const Image& img) {
  check_image(img);
  std::string bytes;
  PngError err;
  if (!encode(&bytes, to_string, img, &err))
    throw internal_error(std::string("PNG encoding failed: libpng: ") + err.message);
  return bytes;
}

}  // namespace elbo::viz
