// Image files as dataset samples: PNG (libpng) and JPEG (libjpeg-turbo) decoding, and
// the geometry elbo-shard applies (channel conversion, centre crop, resize).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace elbo::data {

// 8-bit pixels, rows top to bottom, channels interleaved: (height, width, channels).
struct Pixels {
  int width = 0, height = 0, channels = 0;  // channels: 1 (gray) or 3 (RGB)
  std::vector<uint8_t> data;
};

// Decodes a PNG or JPEG file (told apart by its first bytes, not its name) in its own
// colour model: gray (also gray + alpha) -> 1 channel, RGB / palette / RGBA / YCbCr -> 3.
// Alpha is dropped; 16-bit PNG samples keep their high byte. Corrupt or truncated data
// (including what libjpeg only warns about) is a Data error naming the file.
Pixels decode_image(const std::string& path);

// Gray -> RGB repeats the value; RGB -> gray is ITU-R 601-2 luma in 16-bit fixed point,
// (19595 R + 38470 G + 7471 B + 32768) >> 16, as PIL's convert("L").
Pixels convert_channels(const Pixels& in, int channels);

// The centred S x S square, rows from (h - S) / 2 and columns from (w - S) / 2 (floor).
// Throws a Data error naming `what` when the image is smaller than S.
Pixels center_crop(const Pixels& in, int size, const std::string& what);

// Resizes to (height, width) with an antialiased bilinear (triangle) filter whose
// support widens with the downscale factor, horizontally first, in the 22-bit fixed
// point of PIL's Image.resize(..., BILINEAR): the same bytes as PIL for 8-bit images.
Pixels resize_bilinear(const Pixels& in, int height, int width);

// elbo-shard's --size policy: scale so that the image covers (height, width) keeping
// its aspect ratio (the shorter side, relative to the target, lands on the target:
// s = max(height / h, width / w), new size floor(h * s + 0.5) x floor(w * s + 0.5)),
// then take the centred (height, width) window, offsets floored as in center_crop.
Pixels resize_cover_crop(const Pixels& in, int height, int width);

}  // namespace elbo::data
