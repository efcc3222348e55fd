// PNG and JPEG decoding through libpng and libjpeg-turbo, plus channel conversion,
// centre crop and PIL-compatible bilinear resizing for elbo-shard --image-dir.
#include "elbo/data/image_decode.hpp"

// clang-format off
#include <cstdio>  // jpeglib.h needs FILE and size_t first
#include <csetjmp>
#include <jpeglib.h>
#include <png.h>
// clang-format on

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "elbo/util/error.hpp"

namespace elbo::data {

namespace {

struct File {
  FILE* f = nullptr;
  ~File() {
    if (f != nullptr) std::fclose(f);
  }
};

// libpng and libjpeg report errors through callbacks that must not return: they record
// the message and longjmp back to the setjmp in the decode function. The decode
// functions declare every C++ object before their setjmp, so the jump skips no
// destructor, and they write results only through pointers.
struct DecodeError {
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + 64] = {};
};

[[noreturn]] void on_png_error(png_structp png, png_const_charp msg) {
  auto* e = static_cast<DecodeError*>(png_get_error_ptr(png));
  std::snprintf(e->message, sizeof(e->message), "%s", msg);
  std::longjmp(e->jump, 1);
}
void on_png_warning(png_structp, png_const_charp) {}

bool decode_png(FILE* f, Pixels* out, std::vector<png_bytep>* rows, DecodeError* err) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, err, on_png_error, on_png_warning);
  png_infop info = png != nullptr ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    std::snprintf(err->message, sizeof(err->message), "libpng could not allocate its state");
    return false;
  }
  if (setjmp(err->jump)) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  png_init_io(png, f);
  png_read_info(png, info);
  const int type = png_get_color_type(png, info);
  // Everything to 8-bit gray or RGB: palettes and low bit depths expanded, 16-bit
  // samples reduced to their high byte, alpha (and tRNS transparency) dropped.
  png_set_expand(png);
  png_set_strip_16(png);
  png_set_strip_alpha(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = static_cast<int>(png_get_image_width(png, info));
  out->height = static_cast<int>(png_get_image_height(png, info));
  out->channels = (type & PNG_COLOR_MASK_COLOR) != 0 ? 3 : 1;  // palette images carry the color bit
  const size_t stride = png_get_rowbytes(png, info);
  if (stride != static_cast<size_t>(out->width) * out->channels) {
    std::snprintf(err->message, sizeof(err->message), "unexpected row size %zu after conversion", stride);
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  out->data.resize(stride * out->height);
  rows->resize(static_cast<size_t>(out->height));
  for (int y = 0; y < out->height; ++y) (*rows)[size_t(y)] = out->data.data() + size_t(y) * stride;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

struct JpegErrorManager {
  jpeg_error_mgr pub;  // first: libjpeg hands back a pointer to it
  DecodeError* err;
};

[[noreturn]] void on_jpeg_error(j_common_ptr cinfo) {
  auto* m = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  char buf[JMSG_LENGTH_MAX] = {};
  (*cinfo->err->format_message)(cinfo, buf);
  std::snprintf(m->err->message, sizeof(m->err->message), "%s", buf);
  std::longjmp(m->err->jump, 1);
}

// libjpeg goes on after corrupt data with a warning (msg_level -1) and gray filler;
// a dataset must not silently hold such an image, so a warning is an error here.
void on_jpeg_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) on_jpeg_error(cinfo);
}

bool decode_jpeg(FILE* f, Pixels* out, DecodeError* err) {
  jpeg_decompress_struct cinfo;
  JpegErrorManager jerr;
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = on_jpeg_error;
  jerr.pub.emit_message = on_jpeg_message;
  jerr.err = err;
  if (setjmp(err->jump)) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, f);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    std::snprintf(err->message, sizeof(err->message), "CMYK JPEG images are not supported");
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  cinfo.out_color_space = cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out->width = static_cast<int>(cinfo.output_width);
  out->height = static_cast<int>(cinfo.output_height);
  out->channels = cinfo.output_components;
  const size_t stride = static_cast<size_t>(out->width) * out->channels;
  out->data.resize(stride * out->height);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out->data.data() + size_t(cinfo.output_scanline) * stride;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// PIL's fixed point for 8-bit resampling (Resample.c): 32 - 8 - 2 bits.
constexpr int kPrecisionBits = 22;

struct Taps {
  std::vector<int> first, count;  // per output pixel: first input index, number of taps
  std::vector<int32_t> weights;   // (out, ksize), fixed point
  int ksize = 0;
};

// PIL's precompute_coeffs with the triangle filter (support 1), then its 8-bit
// normalization to fixed point.
Taps bilinear_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(size_t(out_size));
  t.count.resize(size_t(out_size));
  t.weights.assign(size_t(out_size) * t.ksize, 0);
  std::vector<double> k(size_t(t.ksize));
  const double ss = 1.0 / filterscale;
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation, as C's cast in PIL
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double total = 0.0;
    int x = 0;
    for (; x < xmax; ++x) {
      double v = (x + xmin - center + 0.5) * ss;
      v = v < 0 ? -v : v;
      const double w = v < 1.0 ? 1.0 - v : 0.0;
      k[size_t(x)] = w;
      total += w;
    }
    for (x = 0; x < xmax; ++x)
      if (total != 0.0) k[size_t(x)] /= total;
    for (; x < t.ksize; ++x) k[size_t(x)] = 0;
    t.first[size_t(xx)] = xmin;
    t.count[size_t(xx)] = xmax;
    for (x = 0; x < t.ksize; ++x) {
      const double kk = k[size_t(x)] * (1 << kPrecisionBits);
      t.weights[size_t(xx) * t.ksize + x] = static_cast<int32_t>(kk < 0 ? -0.5 + kk : 0.5 + kk);
    }
  }
  return t;
}

uint8_t clip8(int64_t v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

Pixels resample_horizontal(const Pixels& in, int width) {
  const Taps t = bilinear_taps(in.width, width);
  Pixels out{width, in.height, in.channels, {}};
  out.data.resize(size_t(width) * in.height * in.channels);
  const int c = in.channels;
  for (int y = 0; y < in.height; ++y) {
    const uint8_t* src = in.data.data() + size_t(y) * in.width * c;
    uint8_t* dst = out.data.data() + size_t(y) * width * c;
    for (int xx = 0; xx < width; ++xx) {
      const int32_t* w = t.weights.data() + size_t(xx) * t.ksize;
      for (int ch = 0; ch < c; ++ch) {
        int64_t acc = int64_t{1} << (kPrecisionBits - 1);
        for (int x = 0; x < t.count[size_t(xx)]; ++x) acc += int64_t(src[(t.first[size_t(xx)] + x) * c + ch]) * w[x];
        dst[xx * c + ch] = clip8(acc);
      }
    }
  }
  return out;
}

Pixels resample_vertical(const Pixels& in, int height) {
  const Taps t = bilinear_taps(in.height, height);
  Pixels out{in.width, height, in.channels, {}};
  const size_t row = size_t(in.width) * in.channels;
  out.data.resize(row * height);
  for (int yy = 0; yy < height; ++yy) {
    const int32_t* w = t.weights.data() + size_t(yy) * t.ksize;
    for (size_t i = 0; i < row; ++i) {
      int64_t acc = int64_t{1} << (kPrecisionBits - 1);
      for (int y = 0; y < t.count[size_t(yy)]; ++y) acc += int64_t(in.data[(t.first[size_t(yy)] + y) * row + i]) * w[y];
      out.data[size_t(yy) * row + i] = clip8(acc);
    }
  }
  return out;
}

Pixels crop(const Pixels& in, int top, int left, int height, int width) {
  Pixels out{width, height, in.channels, {}};
  const size_t row = size_t(width) * in.channels;
  out.data.resize(row * height);
  for (int y = 0; y < height; ++y)
    std::memcpy(out.data.data() + size_t(y) * row,
                in.data.data() + (size_t(top + y) * in.width + left) * in.channels, row);
  return out;
}

}  // namespace

Pixels decode_image(const std::string& path) {
  File in;
  in.f = std::fopen(path.c_str(), "rb");
  if (in.f == nullptr) throw io_error(path + ": cannot open: " + std::strerror(errno));
  unsigned char magic[8] = {};
  const size_t got = std::fread(magic, 1, sizeof(magic), in.f);
  std::rewind(in.f);
  Pixels out;
  std::vector<png_bytep> rows;
  DecodeError err;
  bool ok = false;
  if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) {
    ok = decode_png(in.f, &out, &rows, &err);
    if (!ok) throw data_error(path + ": corrupt PNG image (libpng: " + err.message + ")");
  } else if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
    ok = decode_jpeg(in.f, &out, &err);
    if (!ok) throw data_error(path + ": corrupt JPEG image (libjpeg: " + err.message + ")");
  } else {
    throw data_error(path + ": neither a PNG nor a JPEG file (by its first bytes)");
  }
  if (out.width < 1 || out.height < 1) throw data_error(path + ": image has no pixels");
  return out;
}

Pixels convert_channels(const Pixels& in, int channels) {
  ELBO_ASSERT(channels == 1 || channels == 3, "convert_channels: 1 or 3");
  if (in.channels == channels) return in;
  Pixels out{in.width, in.height, channels, {}};
  const size_t n = size_t(in.width) * in.height;
  out.data.resize(n * channels);
  if (channels == 3) {
    for (size_t i = 0; i < n; ++i) out.data[3 * i] = out.data[3 * i + 1] = out.data[3 * i + 2] = in.data[i];
  } else {
    for (size_t i = 0; i < n; ++i) {
      const uint32_t r = in.data[3 * i], g = in.data[3 * i + 1], b = in.data[3 * i + 2];
      out.data[i] = static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
    }
  }
  return out;
}

Pixels center_crop(const Pixels& in, int size, const std::string& what) {
  if (in.height < size || in.width < size)
    throw data_error(what + ": image of " + std::to_string(in.height) + " x " + std::to_string(in.width) +
                     " is smaller than --center-crop " + std::to_string(size));
  return crop(in, (in.height - size) / 2, (in.width - size) / 2, size, size);
}

Pixels resize_bilinear(const Pixels& in, int height, int width) {
  ELBO_ASSERT(height >= 1 && width >= 1, "resize_bilinear: empty target");
  Pixels out = in;
  if (width != in.width) out = resample_horizontal(out, width);
  if (height != in.height) out = resample_vertical(out, height);
  return out;
}

Pixels resize_cover_crop(const Pixels& in, int height, int width) {
  const double s = std::max(static_cast<double>(height) / in.height, static_cast<double>(width) / in.width);
  const int rh = std::max(height, static_cast<int>(std::floor(in.height * s + 0.5)));
  const int rw = std::max(width, static_cast<int>(std::floor(in.width * s + 0.5)));
  Pixels r = resize_bilinear(in, rh, rw);
  return crop(r, (rh - height) / 2, (rw - width) / 2, height, width);
}

}  // namespace elbo::data
