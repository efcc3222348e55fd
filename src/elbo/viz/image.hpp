// Images users look at: grids of samples and reconstructions, written as PNG with
// libpng. Pixel values come in as floats in [0, 1] (Bernoulli means, Gaussian means
// clamped), one image per row of a (n, C*H*W) array in CHW order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace elbo::viz {

// 8-bit image, rows top to bottom, channels interleaved (gray: 1, RGB: 3).
struct Image {
  int width = 0, height = 0, channels = 1;
  std::vector<uint8_t> pixels;  // (height, width, channels)
};

// Tiles n images of shape (c, h, w) into `cols` columns (rows as needed) with a
// `pad`-pixel border of `background`. Values are clamped to [0, 1]; c must be 1 or 3.
Image tile(const float* images, int n, int c, int h, int w, int cols, int pad = 2, uint8_t background = 255);

// Inputs beside their reconstructions: a row of `cols` inputs, then a row of their
// reconstructions, and so on; a short last row is left blank on the right.
Image tile_pairs(const float* inputs, const float* reconstructions, int n, int c, int h, int w, int cols);

// Writes `img` to `path` through a temporary file and a rename, so a crash never
// leaves half a PNG; Io errors name the file.
void write_png(const std::string& path, const Image& img);

// The PNG file write_png would write, in memory (TensorBoard's image summaries).
std::string encode_png(const Image& img);

// Reading images back (PNG and JPEG, every colour model): data::decode_image
// (data/image_decode.hpp).

}  // namespace elbo::viz
